"""Metrics of a run, defined once: the simulator and (later) the executor's measured records use these.

Throughput is generated tokens over prefill plus decode time. When a plan holds only a sample of the decode
steps (`Plan.decode_scale` > 1), decode time and the busy time after prefill are scaled up to the whole generation.
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, is_
from typing import Any

import numpy as np

from sim.engine import EngineRecord
from sim.op_table import PHASES
from sim.plan import Phase, Plan
from sim.topology import topology_of
from traces.format import count_dtype

_PHASE, _STREAM = attrgetter("phase"), attrgetter("stream")


def plan_metrics(plan: Plan, record: EngineRecord) -> dict[str, Any]:
    """Phase times, busy time and busy fraction per stream of a simulated (or measured) plan."""
    order = topology_of(plan.system).stream_order()
    table = plan.columns
    if table is not None:  # a policy's plan: its columns
        n = len(table)
        is_prefill = table.phase == PHASES.index(Phase.PREFILL)
        stream = table.stream_positions(order)
    else:  # C-level passes (no Python frame per op)
        index = {st: k for k, st in enumerate(order)}
        ops, n = plan.ops, len(plan.ops)
        is_prefill = np.fromiter(map(is_, map(_PHASE, ops), repeat(Phase.PREFILL)), dtype=bool, count=n)
        stream = np.fromiter(map(index.__getitem__, map(_STREAM, ops)), dtype=count_dtype(len(order)), count=n)
    prefill_ns = int(record.end_ns[is_prefill].max()) if is_prefill.any() else 0
    decode_ns = (record.makespan_ns - prefill_ns) * plan.decode_scale
    # Busy time inside the prefill window counts once, inside the sampled decode window `decode_scale` times (as
    # the windows' wall times do), so a decode op that starts while prefill still runs never makes a stream busier
    # than the run is long.
    # in_prefill + (end - start - in_prefill) * decode_scale, computed in place: three arrays of a float an op, not
    # seven (the peak of a Qwen3-30B-A3B B=4096 point came here); the same operations in the same order
    start, end = record.start_ns.astype(np.float64), record.end_ns.astype(np.float64)
    in_prefill = np.minimum(end, prefill_ns)
    in_prefill -= start
    np.clip(in_prefill, 0.0, None, out=in_prefill)
    weighted = np.subtract(end, start, out=end)
    del end
    weighted -= in_prefill
    weighted *= plan.decode_scale
    weighted += in_prefill
    busy = np.bincount(stream, weights=weighted, minlength=len(order)) if n else np.zeros(len(order))
    total_s = (prefill_ns + decode_ns) / 1e9
    busy_s = {str(s): float(busy[k]) / 1e9 for k, s in enumerate(order)}
    return {
        "prefill_s": prefill_ns / 1e9, "decode_s": decode_ns / 1e9, "total_s": total_s,
        "busy_s": busy_s, "busy_fraction": {k: (v / total_s if total_s else 0.0) for k, v in busy_s.items()},
    }


def throughput_tok_s(plan: Plan, metrics: dict[str, Any]) -> float:
    total = metrics["total_s"]
    return plan.workload.generated_tokens / total if total > 0 else 0.0


def op_class(op) -> str:
    """Validation groups ops by what dominates their cost: experts per device, attention, copies, the rest."""
    from sim.plan import OpKind

    if op.kind is OpKind.EXPERT:
        if op.stream in ("cpu", "cpu_experts"):
            return "cpu_experts"
        return "ndp_experts" if op.stream == "ndp" else "gpu_experts"
    if op.kind is OpKind.ATTENTION:
        return "attention"
    if op.kind is OpKind.COPY:
        return "copies"
    return "other"


# Class suffixes for ops whose measured times are not the modelled unit's (a run without CUDA): their classes stand
# apart, without an error, each with what the CLI says of it.
GPU_ON_CPU = " (GPU role, run on the CPU)"
UNTIMED_COPY = " (no CUDA: not copied)"
APART = {GPU_ON_CPU: "CPU time against a GPU prediction", UNTIMED_COPY: "the copies did not run"}


def class_of(op, apart: dict[str, str]) -> str:
    """`op_class`, with the suffix `apart` gives the op's stream (none for most streams)."""
    return op_class(op) + apart.get(op.stream, "")


def compare_records(plan: Plan, measured: EngineRecord, predicted: EngineRecord,
                    apart: dict[str, str] | None = None) -> dict[str, Any]:
    """Predicted against measured: summed op time per class and end-to-end, each with its relative error. Ops of
    the streams `apart` names (stream -> a suffix of APART: a GPU's streams run on the CPU, copies not run, for
    lack of CUDA) form classes of their own without an error: such a time against a GPU's or a link's prediction
    is no error of the cost model's."""
    apart = apart or {}
    classes = [class_of(op, apart) for op in plan.ops]
    m_dur = (measured.end_ns - measured.start_ns).astype(np.float64)
    p_dur = (predicted.end_ns - predicted.start_ns).astype(np.float64)
    out: dict[str, Any] = {"classes": {}}
    for c in sorted(set(classes)):
        mask = np.fromiter((k == c for k in classes), dtype=bool, count=len(classes))
        m, p = float(m_dur[mask].sum()) / 1e9, float(p_dur[mask].sum()) / 1e9
        out["classes"][c] = {"ops": int(mask.sum()), "measured_s": m, "predicted_s": p,
                             "error": (p / m - 1.0) if m > 0 and not c.endswith(tuple(APART)) else None}
    mm, pm = plan_metrics(plan, measured), plan_metrics(plan, predicted)
    out["end_to_end"] = {k: {"measured": mm[k], "predicted": pm[k], "error": (pm[k] / mm[k] - 1.0) if mm[k] else None}
                         for k in ("prefill_s", "decode_s", "total_s")}
    ratio = np.where(m_dur > 0, p_dur / np.maximum(m_dur, 1), np.nan)
    out["per_op_median_abs_error"] = float(np.nanmedian(np.abs(ratio - 1.0))) if len(ratio) else None
    return out
