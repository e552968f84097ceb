"""One-at-a-time sensitivity of a simulated result to the numbers of its system spec (`coxmoe sensitivity`).

Each varied number (`--vary FIELD=V1,V2`, or by default every number whose source is marked [assumed] or
[borrowed], at half and twice its value within the field's range) is set alone (`--set`), the point is simulated
again (its policy's search included), and the throughput change is reported, largest first: a tornado table that
says which unmeasured constants a conclusion rests on. With `--against POLICY` the baseline runs under every
variant too and CoX-MoE's (or the chosen policy's) speedup is reported with it.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from sim.api import config_system, simulate
from sim.atomic_files import save_figure_file
from sim.config import SimConfig
from sim.errors import CapacityError, NoFeasibleConfig, RunTooLong, SimInputError
from sim.specs.hardware import SystemSpec
from sim.specs.overrides import SECTIONS, apply_system_settings

UNMEASURED_MARKS = ("[assumed]", "[borrowed]")
DEFAULT_FACTORS = (0.5, 2.0)
BOUNDED_SUFFIXES = ("efficiency", "ratio", "overlap")  # fractions: never above 1


def unmeasured_fields(system: SystemSpec) -> dict[str, float]:
    """Path -> value of every numeric field of `system` whose source is marked [assumed] or [borrowed]."""
    out: dict[str, float] = {}
    for section in ("", *SECTIONS):
        spec = system if not section else getattr(system, section, None)
        if spec is None:
            continue
        for name, source in sorted(getattr(spec, "sources", {}).items()):
            value = getattr(spec, name, None)
            if (isinstance(value, int | float) and not isinstance(value, bool)
                    and any(mark in source.lower() for mark in UNMEASURED_MARKS)):
                out[f"{section}.{name}" if section else name] = value
    return out


def default_values(path: str, value: float) -> list[float]:
    """Half and twice `value` (fractions capped at 1; whole numbers stay whole), without the value itself."""
    out = []
    for factor in DEFAULT_FACTORS:
        v = value * factor
        if path.endswith(BOUNDED_SUFFIXES):
            v = min(v, 1.0)
        if isinstance(value, int):
            v = int(v + 0.5)  # halves up (round() would take them to the even neighbour)
        if v != value and v not in out:
            out.append(v)
    return out


def parse_vary(items: Iterable[str] | None) -> dict[str, list[str]]:
    """['cpu.amx_efficiency=0.073,0.15'] -> {'cpu.amx_efficiency': ['0.073', '0.15']}; one-line errors."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        path, sep, values = item.partition("=")
        texts = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not path.strip() or not texts:
            raise SimInputError(f"--vary {item!r} must look like FIELD=V1[,V2,...]")
        listed = out.setdefault(path.strip(), [])
        repeated = next((t for t in texts if t in listed or texts.count(t) > 1), None)
        if repeated is not None:  # (compare refuses a repeated policy the same way)
            raise SimInputError(f"--vary {path.strip()}={repeated} is listed twice")
        listed.extend(texts)
    return out


def variants(config: SimConfig, vary: Mapping[str, list[str]] | None,
             skipped: list[str] | None = None) -> list[tuple[str, str]]:
    """(field path, value text) of every variant to simulate, each checked against the spec now (a bad one is
    refused before anything runs). A default variant --set cannot apply is left out and, with `skipped`, named
    there with the reason."""
    system = config_system(config)
    if vary:
        pairs = [(path, text) for path, texts in vary.items() for text in texts]
        for path, text in pairs:
            apply_system_settings(system, {path: text}, "--vary")
        return pairs
    pairs = []
    for path, value in unmeasured_fields(system).items():
        for v in default_values(path, value):
            try:  # e.g. a GPU number of a machine with several GPUs, which --set cannot reach alone
                apply_system_settings(system, {path: repr(v)})
            except SimInputError as exc:
                if skipped is not None:
                    skipped.append(f"{path}={v!r}: {exc}")
                continue
            pairs.append((path, repr(v)))
    if not pairs:
        raise SimInputError(f"system {system.name}: no number that --set can change is marked [assumed] or "
                            "[borrowed]; name the ones to vary with --vary FIELD=V1,V2")
    return pairs


def _point(config: SimConfig, settings: Mapping[str, str], policy: str | None = None) -> dict[str, Any]:
    """One variant's result; a machine that cannot hold the point (the search finds nothing that fits), or whose
    run would outlast the engine's clock (a rate near zero), is a row of NaN with the reason, not the end of the
    run."""
    changed = {"system_settings": {**config.system_settings, **settings}}
    if policy is not None:
        changed.update(policy=policy, policy_options={})
    try:
        r = simulate(dataclasses.replace(config, **changed))
    except (CapacityError, NoFeasibleConfig, RunTooLong) as exc:
        return {"throughput_tok_s": np.nan, "total_s": np.nan, "prefill_s": np.nan, "decode_s": np.nan,
                "note": " ".join(str(exc).split())}
    return {"throughput_tok_s": r.throughput_tok_s, "total_s": r.total_s, "prefill_s": r.prefill_s,
            "decode_s": r.decode_s, "note": ""}


def run_sensitivity(config: SimConfig, vary: Mapping[str, list[str]] | None = None, against: str | None = None,
                    progress: bool = True, rank_by: str = "throughput") -> pd.DataFrame:
    """One row for the base point, then one per variant, largest change first (of throughput, or with
    `rank_by="speedup"` of the speedup over `against`; variants that do not fit last): the value, the field's
    source, throughput and its change, and with `against` the baseline's throughput and the speedup. Default
    variants left out are listed in `table.attrs["skipped"]`."""
    if rank_by not in ("throughput", "speedup") or (rank_by == "speedup" and not against):
        raise SimInputError("--rank-by speedup needs --against POLICY" if rank_by == "speedup"
                            else f"--rank-by must be throughput or speedup, got {rank_by!r}")
    skipped: list[str] = []
    pairs = variants(config, vary, skipped)
    system = config_system(config)
    rows = []
    jobs = [("", "")] + pairs
    for path, text in tqdm(jobs, desc="sensitivity", unit="point", disable=not progress):
        settings = {path: text} if path else {}
        row: dict[str, Any] = {"field": path or "(base)", "value": text, **_point(config, settings)}
        if not path and not np.isfinite(row["throughput_tok_s"]):  # before any variant runs (minutes at scale)
            raise SimInputError(f"the base point does not run: {row['note']}")
        if path:
            section, _, name = path.rpartition(".")
            spec = getattr(system, section) if section else system
            row["was"] = repr(getattr(spec, name))  # as text: whole numbers stay whole beside fractions
            row["source"] = spec.sources.get(name, "")
        if against:
            other = _point(config, settings, against)
            row["against_tok_s"] = other["throughput_tok_s"]
            row["speedup"] = row["throughput_tok_s"] / row["against_tok_s"]
            row["note"] = "; ".join(filter(None, (row["note"], other["note"] and f"{against}: {other['note']}")))
        rows.append(row)
    df = pd.DataFrame(rows)
    base = df.iloc[0]
    df["change"] = df["throughput_tok_s"] / base["throughput_tok_s"] - 1
    if against:
        df["speedup_change"] = df["speedup"] / base["speedup"] - 1
    key = "speedup_change" if rank_by == "speedup" else "change"
    rest = df.iloc[1:].assign(_order=lambda d: -d[key].abs()).sort_values("_order", kind="stable",
                                                                          na_position="last")
    table = pd.concat([df.iloc[:1], rest.drop(columns="_order")], ignore_index=True)
    table.attrs["skipped"] = skipped
    table.attrs["rank_by"] = key
    return table


AXIS_LABELS = {"change": "throughput change against the base point (%)",
               "speedup_change": "change of the speed-up over {against} against the base point (%)"}


def tornado_plot(table: pd.DataFrame, path: Path, title: str, against: str | None = None) -> Path:
    """Horizontal bars of the change the table is ranked by (throughput, or the speed-up over `against`) per
    variant, largest at the top; a variant that does not run is a labelled row with no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = table.attrs.get("rank_by", "change")
    rows = table.iloc[1:].iloc[::-1]
    labels = [f"{f} = {v}" for f, v in zip(rows["field"], rows["value"], strict=True)]
    values = 100 * rows[key].to_numpy(dtype=float)
    ran = np.isfinite(values)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    ypos = np.arange(len(rows))
    ax.barh(ypos, np.where(ran, values, 0.0), color=["#c0392b" if c < 0 else "#2471a3" for c in values])
    ax.set_yticks(ypos, labels)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    for y in ypos[~ran]:
        ax.text(0, y, "  does not run", va="center", ha="left", fontsize=8, color="#555555")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(AXIS_LABELS[key].format(against=against or "the other policy"))
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)
    fig.tight_layout()
    try:
        save_figure_file(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path
