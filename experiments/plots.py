"""Figures drawn from simulator output (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sim.api import SimulationResult  # noqa: E402
from sim.atomic_files import save_figure_file  # noqa: E402
from sim.plan import STREAMS, OpKind, Phase, Plan, streams_of  # noqa: E402
from sim.timeline import track_name  # noqa: E402
from sim.topology import topology_of  # noqa: E402

STREAM_NAMES = frozenset(str(s) for s in STREAMS)  # the one-GPU machine's tracks are always drawn

KIND_COLORS = {
    OpKind.EMBED: "#bbbbbb", OpKind.QKV: "#4e79a7", OpKind.ATTENTION: "#f28e2b", OpKind.O_PROJ: "#76b7b2",
    OpKind.ROUTER: "#59a14f", OpKind.EXPERT: "#e15759", OpKind.SHARED_EXPERT: "#ff9da7",
    OpKind.DENSE_FFN: "#9c755f", OpKind.LM_HEAD: "#bab0ac", OpKind.COPY: "#b07aa1",
}


def _save(fig: plt.Figure, path: str | Path) -> None:
    """Save through a temporary file so an error never leaves a half-written image."""
    try:
        save_figure_file(fig, path, dpi=150, bbox_inches="tight")
    finally:
        plt.close(fig)


def middle_decode_step(plan: Plan) -> int | None:
    """The middle of the decode steps a plan simulates (the one figures show), or None without decode."""
    steps = sorted({op.step for op in plan.ops if op.phase is Phase.DECODE})
    return steps[len(steps) // 2] if steps else None


def plot_simulation(result: SimulationResult, path: str | Path) -> None:
    """Left: busy seconds per resource by op kind. Right: a Gantt chart of the middle decode step."""
    plan, rec = result.plan, result.record
    assert plan is not None and rec is not None, "simulate(..., keep_plan=True) keeps what this plot needs"
    dur = (rec.end_ns - rec.start_ns) / 1e9
    all_kinds = list(OpKind)
    kind_idx = np.fromiter((all_kinds.index(op.kind) for op in plan.ops), dtype=np.int64, count=len(plan.ops))
    used = set(streams_of(plan.ops))  # the machine's streams in its topology's order
    order = [s for s in topology_of(plan.system).stream_order() if s in used or s in STREAM_NAMES]
    index = {s: k for k, s in enumerate(order)}
    stream_idx = np.fromiter((index[op.stream] for op in plan.ops), dtype=np.int64, count=len(plan.ops))
    busy = np.bincount(kind_idx * len(order) + stream_idx, weights=dur,
                       minlength=len(all_kinds) * len(order)).reshape(len(all_kinds), len(order))
    fig, (ax_busy, ax_gantt) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    labels = [track_name(s, plan.system.cpu.has_amx) for s in order]
    left = np.zeros(len(order))
    for ki, kind in enumerate(all_kinds):
        widths = busy[ki]
        if widths.any():
            ax_busy.barh(labels, widths, left=left, color=KIND_COLORS[kind], label=str(kind))
            left += widths
    ax_busy.axvline(result.total_s, color="k", lw=0.8, ls="--")
    ax_busy.set_xlabel("busy time (s); dashed: end to end")
    ax_busy.invert_yaxis()
    ax_busy.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=5, frameon=False)
    ax_busy.set_title(f"{result.throughput_tok_s:.1f} tok/s, total {result.total_s:.2f} s", fontsize=10)

    middle = middle_decode_step(plan)
    phase, step = (Phase.DECODE, middle) if middle is not None else (Phase.PREFILL, 0)
    chosen = [op for op in plan.ops if op.phase is phase and op.step == step]
    t0 = min(rec.start_ns[op.id] for op in chosen)
    for op in chosen:
        y = index[op.stream]
        s = (rec.start_ns[op.id] - t0) / 1e6
        w = max((rec.end_ns[op.id] - rec.start_ns[op.id]) / 1e6, 1e-6)
        color = KIND_COLORS[op.kind]  # outlined, unsnapped: a sub-pixel op would vanish (experiments/gantt.py)
        ax_gantt.barh(y, w, left=s, color=color, edgecolor=color, linewidth=0.3, snap=False, height=0.7)
    ax_gantt.set_yticks(range(len(order)), labels)
    ax_gantt.invert_yaxis()
    ax_gantt.set_xlabel("time within the step (ms)")
    ax_gantt.set_title(f"{phase} step {step}: {result.model} on {result.system}, {result.policy}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
