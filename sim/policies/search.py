"""Search, then simulate: rank candidate configurations with a policy's own analytic model, re-score the best
few with the discrete-event simulation, keep the fastest there.

The chosen plan carries `meta["search"]` (candidates, how many were simulated, wall time, the analytic and the
simulated estimate of the winner) and its engine record in `meta["record"]`, so it is not simulated twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sim.cost import RooflineCostModel, Work
from sim.engine import run_plan
from sim.errors import CapacityError, SimInputError
from sim.plan import OpKind, Plan, Stream
from sim.policies.base import PlanContext


@dataclass
class Candidate:
    """A fully specified option set and the analytic model's estimate of its total time."""

    options: Any
    analytic_s: float
    detail: dict[str, Any] = field(default_factory=dict)


class Analytic:
    """Seconds of ops and copies on this system, from the same roofline as the simulator's default costs."""

    def __init__(self, ctx: PlanContext):
        self.cm = RooflineCostModel(ctx.system)

    def t(self, kind: OpKind, stream: Stream, work: Work) -> float:
        return self.cm.seconds(kind, stream, work.flops, work.bytes)

    def copy(self, stream: Stream, nbytes: int) -> float:
        return self.cm.seconds(OpKind.COPY, stream, 0, nbytes) if nbytes else 0.0


def expected_counts(ctx: PlanContext) -> tuple[np.ndarray, np.ndarray]:
    """Tokens per expert per MoE layer: over the whole prefill, and per decode step on average."""
    tr, wl = ctx.trace, ctx.workload
    requests = np.arange(wl.batch)
    prefill = tr.expert_counts(tr.prefill_rows(requests)).astype(np.float64)
    steps = max(wl.max_gen_len - 1, 1)
    decode_rows = np.concatenate([tr.decode_rows(t, requests) for t in range(1, wl.max_gen_len)] or
                                 [np.zeros(0, dtype=np.int64)])
    decode = tr.expert_counts(decode_rows).astype(np.float64) / steps
    return prefill, decode


def search_then_simulate(ctx: PlanContext, candidates: list[Candidate], build: Callable[[Any], Plan],
                         rescore: int, policy: str) -> Plan:
    """Simulate the `rescore` best-ranked candidates that fit in memory; return the fastest plan."""
    t0 = time.perf_counter()
    if not candidates:
        raise CapacityError(f"GPU ({ctx.system.gpu.name}) for {policy}: no configuration fits", 0,
                            ctx.system.gpu_usable_bytes, "every candidate of the search")
    ranked = sorted(candidates, key=lambda c: c.analytic_s)
    cost = RooflineCostModel(ctx.system)
    best: tuple[float, Plan, Candidate] | None = None
    simulated = 0
    last_error: Exception | None = None
    for cand in ranked:
        if simulated >= max(rescore, 1):
            break
        try:
            plan = build(cand.options)
            record = run_plan(plan, cost)
        except CapacityError as exc:  # the analytic memory model let through something the plan cannot hold
            last_error = exc
            continue
        simulated += 1
        total = record.makespan_ns / 1e9
        plan.meta["record"] = record
        if best is None or total < best[0]:
            best = (total, plan, cand)
    if best is None:
        assert last_error is not None
        raise last_error
    total, plan, cand = best
    plan.meta["search"] = {
        "candidates": len(candidates), "simulated": simulated, "search_s": time.perf_counter() - t0,
        "analytic_total_s": cand.analytic_s, "simulated_total_s": total, "analytic_detail": cand.detail,
    }
    return plan


def fixed_then_simulate(ctx: PlanContext, cand: Candidate, build: Callable[[Any], Plan]) -> Plan:
    """Explicit knobs: no search, but report the analytic estimate next to the simulation."""
    plan = build(cand.options)
    plan.meta["search"] = {"candidates": 1, "simulated": 0, "search_s": 0.0, "analytic_total_s": cand.analytic_s,
                           "analytic_detail": cand.detail}
    return plan


def options_dict(options: Any) -> dict[str, Any]:
    return asdict(options)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise SimInputError(message)
