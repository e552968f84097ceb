"""Search, then simulate: rank candidate configurations with a policy's own analytic model, re-score the best
few with the discrete-event simulation, keep the fastest there.

The chosen plan carries `meta["search"]` (candidates, how many were simulated, wall time, the analytic and the
simulated estimate of the winner) and, when it was already simulated as planned, its engine record in
`meta["record"]`, so it is not simulated twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sim.cost import CostModel, RooflineCostModel, Work
from sim.engine import run_plan
from sim.errors import CapacityError, NoFeasibleConfig, SimInputError
from sim.metrics import plan_metrics
from sim.plan import OpKind, Payload, Plan, Stream
from sim.policies.base import PlanContext
from sim.specs import ModelSpec


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

    def copy(self, stream: Stream, nbytes: int, payload: Payload = Payload.NONE) -> float:
        return self.cm.seconds(OpKind.COPY, stream, 0, nbytes, payload) if nbytes else 0.0

    def expert_times(self, stream: Stream, model: ModelSpec, tokens: np.ndarray) -> np.ndarray:
        """Roofline seconds of one expert per element of `tokens` (rounded; 0 where no token is routed)."""
        t = np.rint(np.asarray(tokens, dtype=np.float64))
        bpp = model.bytes_per_param
        flops = 2.0 * t * model.expert_params
        nbytes = (model.expert_params + t * 2 * model.hidden_size) * bpp
        compute, memory, fixed = self.cm.roofs(OpKind.EXPERT, stream, 1, 1)
        # roofs() is linear in flops and bytes apart from the fixed overhead
        out = np.maximum(flops * compute, nbytes * memory) + fixed
        return np.where(t >= 1, out, 0.0)


def expected_counts(ctx: PlanContext) -> tuple[np.ndarray, np.ndarray]:
    """Tokens per expert per MoE layer: over the whole prefill, and per decode step on average."""
    tr, wl = ctx.trace, ctx.workload
    if wl.batch == tr.num_requests:
        prefill, decode = (c.astype(np.float64) for c in tr.phase_counts)
    else:
        requests = np.arange(wl.batch)
        prefill = tr.prefill_counts(requests).astype(np.float64)
        rows = [tr.decode_rows(t, requests) for t in range(1, wl.max_gen_len)]
        decode = tr.expert_counts(np.concatenate(rows) if rows else np.zeros(0, np.int64)).astype(np.float64)
    return prefill, decode / max(wl.max_gen_len - 1, 1)


RESCORE_DECODE_SAMPLE = 4  # decode steps the re-scoring simulations plan (evenly spaced; scaled to all)


def _simulated_total_s(plan: Plan, cost: CostModel, check: bool = False) -> tuple[float, Any]:
    record = run_plan(plan, cost, check=check)  # candidates built here skip the check; the chosen plan has it
    return plan_metrics(plan, record)["total_s"], record


def search_then_simulate(ctx: PlanContext, candidates: list[Candidate], build: Callable[[PlanContext, Any], Plan],
                         rescore: int, policy: str) -> Plan:
    """Simulate the `rescore` best-ranked candidates that fit in memory (on a sample of decode steps, scaled
    to the whole generation); rebuild the fastest for `ctx` and simulate it once more."""
    t0 = time.perf_counter()
    if not candidates:
        raise CapacityError(f"GPU ({ctx.system.gpu.name}) for {policy}: no configuration fits", 0,
                            ctx.system.gpu_usable_bytes, "every candidate of the search")
    ranked = sorted(candidates, key=lambda c: c.analytic_s)
    cost = ctx.cost or RooflineCostModel(ctx.system)  # re-score with the costs the result will be reported in
    sample = RESCORE_DECODE_SAMPLE if ctx.decode_sample <= 0 else min(ctx.decode_sample, RESCORE_DECODE_SAMPLE)
    probe_ctx = ctx.with_sample(sample)
    best: tuple[float, Candidate] | None = None
    simulated = 0
    last_error: Exception | None = None
    for cand in ranked:
        if simulated >= max(rescore, 1):
            break
        try:
            total, _ = _simulated_total_s(build(probe_ctx, cand.options), cost)
        except CapacityError as exc:  # the analytic memory model let through something the plan cannot hold
            last_error = exc
            continue
        simulated += 1
        if best is None or total < best[0]:
            best = (total, cand)
    if best is None:
        assert last_error is not None
        raise last_error
    probe_total, cand = best
    plan = build(ctx, cand.options)
    if probe_ctx.steps() == ctx.steps():
        total, record = probe_total, None
    else:
        total, record = _simulated_total_s(plan, cost, check=True)
    if record is not None:
        plan.meta["record"] = record
    plan.meta["search"] = {
        "candidates": len(candidates), "simulated": simulated, "rescore_decode_sample": sample,
        "search_s": time.perf_counter() - t0, "analytic_total_s": cand.analytic_s, "simulated_total_s": total,
        "analytic_detail": cand.detail,
    }
    return plan


def choose(ctx: PlanContext, candidates: list[Candidate], build: Callable[[PlanContext, Any], Plan], *,
           searched: bool, rescore: int, policy: str, explain_empty: Callable[[], None] | None = None) -> Plan:
    """Search-then-simulate when some knob is left to the search, else build the one candidate. With no
    candidate, `explain_empty` may raise an error naming the bytes; otherwise a generic one is raised."""
    if not candidates:
        if explain_empty is not None:
            explain_empty()
        raise NoFeasibleConfig(f"policy {policy}: no configuration fits its memory model on {ctx.system.name} "
                               f"({ctx.system.gpu_usable_bytes / 2**30:.1f} GiB of GPU memory)")
    if not searched:
        return fixed_then_simulate(ctx, candidates[0], build)
    return search_then_simulate(ctx, candidates, build, rescore, policy)


def fixed_then_simulate(ctx: PlanContext, cand: Candidate, build: Callable[[PlanContext, Any], Plan]) -> Plan:
    """Explicit knobs: no search, but report the analytic estimate next to the simulation."""
    plan = build(ctx, cand.options)
    plan.meta["search"] = {"candidates": 1, "simulated": 0, "search_s": 0.0, "analytic_total_s": cand.analytic_s,
                           "analytic_detail": cand.detail}
    return plan


def options_dict(options: Any) -> dict[str, Any]:
    return asdict(options)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise SimInputError(message)
