"""One paper style for every reproduced figure: fonts, sizes, policy colours, and PNG + PDF + CSV written
atomically (an interrupted run never leaves a half-written file) with reproducible bytes (`sim.atomic_files`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from sim.atomic_files import save_figure_file, write_atomic, write_atomic_text  # noqa: E402
from sim.policies import POLICIES  # noqa: E402

POLICY_COLORS = {name: cls.color for name, cls in POLICIES.items()}  # each policy class names its own
POLICY_LABELS = {name: cls.label for name, cls in POLICIES.items()}
MODEL_LABELS = {"mixtral-8x7b": "Mixtral-8x7B", "deepseek-v2-lite": "DeepSeek-V2-Lite",
                "qwen3-30b-a3b": "Qwen3-30B-A3B"}
SYSTEM_LABELS = {"rtx6000ada-8452y": "(I) RTX 6000 Ada", "a100-80g-8452y": "(II) A100 80GB",
                 "h100-80g-8452y": "(III) H100 80GB"}
PAPER_RC = {
    "font.family": "DejaVu Sans", "font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7, "legend.frameon": False,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "axes.grid.axis": "y",
    "grid.linewidth": 0.4, "grid.alpha": 0.5, "axes.linewidth": 0.6, "lines.linewidth": 1.2,
    "savefig.dpi": 200, "pdf.fonttype": 42, "ps.fonttype": 42,
}


# Distinct colours for categories with no colour of their own (systems, kernel sets): a fixed start, then
# matplotlib's tab20, then round again, so a sixth (or twenty-first) category is drawn, never dropped.
_PALETTE = ("#2e86c1", "#c0392b", "#27ae60", "#8e44ad", "#d35400")
# Markers that take a face colour (a hollow point is drawn by its edge, which "x" or "+" do not have).
FILLED_MARKERS = ("o", "s", "D", "^", "v", "<", ">", "p", "h", "*", "P", "X", "8", "d", "H")


def palette(keys: Iterable[str]) -> dict[str, str]:
    """A colour for each key, in order, for any number of keys."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    extra = [to_hex(c) for c in colormaps["tab20"].colors]
    colors = [*_PALETTE, *(c for c in extra if c not in _PALETTE)]
    return {key: colors[i % len(colors)] for i, key in enumerate(dict.fromkeys(keys))}


def markers_for(keys: Iterable[str], known: dict[str, str]) -> dict[str, str]:
    """A filled-capable marker for each key: `known` where it names one, the next unused marker otherwise."""
    out = {k: known[k] for k in dict.fromkeys(keys) if k in known}
    spare = [m for m in FILLED_MARKERS if m not in known.values()] or list(FILLED_MARKERS)
    for i, key in enumerate(k for k in dict.fromkeys(keys) if k not in known):
        out[key] = spare[i % len(spare)]
    return out


@contextmanager
def paper_style() -> Iterator[None]:
    with plt.rc_context(PAPER_RC):
        yield


def save_figure(fig: plt.Figure, out: Path, stem: str) -> list[Path]:
    """`stem`.png and `stem`.pdf in `out`; closes the figure."""
    try:
        return [save_figure_file(fig, out / f"{stem}.{ext}", bbox_inches="tight") for ext in ("png", "pdf")]
    finally:
        plt.close(fig)


def save_csv(df: pd.DataFrame, out: Path, stem: str) -> Path:
    return write_atomic(out / f"{stem}.csv", lambda tmp: df.to_csv(tmp, index=False))


def save_text(text: str, path: Path) -> Path:
    return write_atomic_text(path, text)
