"""Search, then simulate: rank a policy's candidate configurations by its own analytic model, re-score the best
few with the discrete-event simulation (through a callback that carries the run's cost model), keep the fastest.
Where a policy names candidate families, the re-scored few are the best of distinct families (e.g. CoX-MoE's
decode configurations) rather than the winner's near-copies that differ in a knob the model already ranks well.

Sits above the policies: a policy declares its `SearchSpace` (`sim/policies/analytic.py`) and this module picks.
`plan_policy` returns a typed `Planned`: the plan, its engine record when the search already simulated it as
planned (so it is not simulated twice), and a `SearchReport`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sim.cost import RooflineCostModel
from sim.engine import EngineRecord, run_plan
from sim.errors import CapacityError, NoFeasibleConfig
from sim.metrics import plan_metrics
from sim.plan import Plan
from sim.policies.analytic import Candidate, SearchSpace
from sim.policies.base import PlanContext, Policy

RESCORE_DECODE_SAMPLE = 4  # decode steps the re-scoring simulations plan (evenly spaced; scaled to all)

# Simulate a plan with the run's cost model; `check` asks for Plan.check first (the chosen plan gets it).
Simulate = Callable[[Plan, bool], EngineRecord]


@dataclass(frozen=True)
class SearchReport:
    """How the plan was chosen: candidates ranked, how many were simulated (on how many decode steps), the
    wall time, and the winner's analytic and simulated total seconds (simulated: None when the knobs were given)."""

    candidates: int
    simulated: int
    rescore_decode_sample: int | None
    search_s: float
    analytic_total_s: float
    simulated_total_s: float | None = None
    analytic_detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Planned:
    """A policy's plan for a context, with its engine record if the search already ran it (same cost model,
    same decode steps) and the search's report (None for a policy without a search)."""

    plan: Plan
    record: EngineRecord | None = None
    search: SearchReport | None = None
    metrics: dict[str, Any] | None = None  # `plan_metrics(plan, record)` where the search computed it


def simulate_with(ctx: PlanContext) -> Simulate:
    """The default callback: the context's cost model (the roofline when it has none)."""
    cost = ctx.cost or RooflineCostModel(ctx.system)
    return lambda plan, check: run_plan(plan, cost, check=check)


def plan_policy(policy: Policy, ctx: PlanContext, simulate: Simulate | None = None) -> Planned:
    """The policy's plan for `ctx`: built directly, or chosen from its search space by `simulate` (default: the
    context's cost model)."""
    space = policy.search_space(ctx)
    if space is None:
        return Planned(policy.build(ctx))
    simulate = simulate or simulate_with(ctx)
    if not space.candidates:
        if space.explain_empty is not None:
            space.explain_empty()
        raise NoFeasibleConfig(f"policy {policy.name}: no configuration fits its memory model on {ctx.system.name} "
                               f"({ctx.system.gpu_usable_bytes / 2**30:.1f} GiB of GPU memory)")
    if not space.searched:
        cand = space.candidates[0]
        return Planned(space.build(ctx, cand.options), None,
                       SearchReport(1, 0, None, 0.0, cand.analytic_s, analytic_detail=cand.detail))
    return _search_then_simulate(ctx, space, simulate, policy.name)


def _total_s(plan: Plan, record: EngineRecord) -> float:
    return plan_metrics(plan, record)["total_s"]


def _search_then_simulate(ctx: PlanContext, space: SearchSpace, simulate: Simulate, policy: str) -> Planned:
    """Simulate the `rescore` best-ranked candidates that fit in memory (the best of each family first; on a
    sample of decode steps, scaled to the whole generation); rebuild the fastest for `ctx` and simulate it once
    more."""
    t0 = time.perf_counter()
    ranked = space.rescore_order()
    sample = RESCORE_DECODE_SAMPLE if ctx.decode_sample <= 0 else min(ctx.decode_sample, RESCORE_DECODE_SAMPLE)
    probe_ctx = ctx.with_sample(sample)
    scored: list[tuple[float, int, Candidate]] = []  # (total, ops, candidate) of each simulated candidate
    last_error: Exception | None = None
    for cand in ranked:
        if len(scored) >= max(space.rescore, 1):
            break
        try:
            probe = space.build(probe_ctx, cand.options)
            total = _total_s(probe, simulate(probe, False))  # candidates skip the check; the chosen plan has it
        except CapacityError as exc:  # the analytic memory model let through something the plan cannot hold
            last_error = exc
            continue
        scored.append((total, probe.num_ops, cand))
    probe = None  # the last candidate's plan goes before the chosen one is built (Qwen3 B=4096: 9 MB less held)
    if not scored:
        if last_error is None:
            raise CapacityError(f"GPU ({ctx.system.gpu.name}) for {policy}: no configuration fits", 0,
                                ctx.system.gpu_usable_bytes, "every candidate of the search")
        raise last_error
    fastest = min(t for t, _, _ in scored)
    probe_total, _, cand = min((s for s in scored if s[0] <= fastest * (1 + space.tie_share)),
                               key=lambda s: (s[1], s[0]))  # the fewest ops among the tied, then the faster
    simulated = len(scored)
    plan = space.build(ctx, cand.options)
    record = metrics = None
    total = probe_total
    if probe_ctx.steps() != ctx.steps():
        record = simulate(plan, True)
        metrics = plan_metrics(plan, record)
        total = metrics["total_s"]
    report = SearchReport(len(space.candidates), simulated, sample, time.perf_counter() - t0, cand.analytic_s, total,
                          cand.detail)
    return Planned(plan, record, report, metrics)
