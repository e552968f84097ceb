"""Metrics of a run, defined once: the simulator and (later) the executor's measured records use these.

Throughput is generated tokens over prefill plus decode time. When a plan holds only a sample of the decode
steps (`Plan.decode_scale` > 1), decode time and decode busy time are scaled up to the whole generation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sim.engine import EngineRecord
from sim.plan import STREAMS, Phase, Plan


def plan_metrics(plan: Plan, record: EngineRecord) -> dict[str, Any]:
    """Phase times, busy time and busy fraction per stream of a simulated (or measured) plan."""
    n = len(plan.ops)
    is_prefill = np.fromiter((op.phase is Phase.PREFILL for op in plan.ops), dtype=bool, count=n)
    stream = np.fromiter((STREAMS.index(op.stream) for op in plan.ops), dtype=np.int64, count=n)
    prefill_ns = int(record.end_ns[is_prefill].max()) if is_prefill.any() else 0
    decode_ns = (record.makespan_ns - prefill_ns) * plan.decode_scale
    duration = (record.end_ns - record.start_ns).astype(np.float64)
    weight = np.where(is_prefill, 1.0, plan.decode_scale)
    busy = np.bincount(stream, weights=duration * weight, minlength=len(STREAMS)) if n else np.zeros(len(STREAMS))
    total_s = (prefill_ns + decode_ns) / 1e9
    busy_s = {str(s): float(busy[k]) / 1e9 for k, s in enumerate(STREAMS)}
    return {
        "prefill_s": prefill_ns / 1e9, "decode_s": decode_ns / 1e9, "total_s": total_s,
        "busy_s": busy_s, "busy_fraction": {k: (v / total_s if total_s else 0.0) for k, v in busy_s.items()},
    }


def throughput_tok_s(plan: Plan, metrics: dict[str, Any]) -> float:
    total = metrics["total_s"]
    return plan.workload.generated_tokens / total if total > 0 else 0.0
