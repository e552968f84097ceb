"""Proof that a plan computes what its routing trace asks: every token's k expert assignments, at every step the
plan holds, exactly once, including assignments of one expert split between ops (scope shards).

It also refuses an expert op nothing waits for (no op depends on it and none follows it on its stream): its
output would never reach the next layer. Ordering beyond that is not proven: the policy's dependencies (or an
op's stream order) must make its consumers wait.

`Plan.check()` is the cheap per-op check that runs before every simulation; this one replays the trace and is
run on demand (tests, `coxmoe run-plan PLAN --verify TRACE`). Each expert op's assignments are the ones the executor
computes: its scope's token rows in request order, the (row, slot) pairs routed to its expert in row-major
order, and of those the op's shard (contiguous parts, sizes as `np.array_split`); a grouped op's, those of each
member expert.
"""

from __future__ import annotations

import numpy as np

from sim.errors import SimInputError
from sim.plan import OpKind, Phase, Plan, member_ops, shard_bounds
from traces import RoutingTrace


def scope_rows(plan: Plan, trace: RoutingTrace, phase: Phase, step: int, requests: np.ndarray) -> np.ndarray:
    """Token rows of `requests` at (phase, step), in request order (prompt positions in prefill)."""
    return trace.prefill_rows(requests) if phase is Phase.PREFILL else trace.decode_rows(step, requests)


def shard_assignments(plan: Plan, trace: RoutingTrace, op) -> tuple[np.ndarray, np.ndarray]:
    """(rows, slots) of the assignments an expert op computes (see the module docstring)."""
    requests, shard, shards = plan.scope_of(op)
    rows = scope_rows(plan, trace, op.phase, op.step, requests)
    li = plan.model.moe_index(op.layer)
    t, j = np.nonzero(trace.experts[rows, li] == op.expert)
    if shards > 1:
        lo, hi = shard_bounds(t.size, shard, shards)
        t, j = t[lo:hi], j[lo:hi]
    return rows[t], j


def padded_positions(plan: Plan, op, routed: int) -> bool:
    """Whether expert op `op`, whose scope routes `routed` tokens to it, counts FlexGen's padded positions besides:
    only a dense model's FFN in one-expert form, in prefill, over exactly its scope's requests at the longest
    prompt (FlexGen pads prompts; every position goes through that FFN)."""
    if plan.model.has_router or op.phase is not Phase.PREFILL or op.tokens <= routed:
        return False
    requests = plan.scope_of(op)[0]
    return op.tokens == requests.size * int(plan.workload.prompt_lens.max())


def verify_assignments(plan: Plan, trace: RoutingTrace) -> None:
    """Raise SimInputError naming the first assignment computed twice, never, or by an op whose token count
    disagrees with its shard."""
    m, wl, h = plan.model, plan.workload, trace.header
    if not trace.has_prompt_rows:
        raise SimInputError("plan verification needs every prompt token's experts; the trace keeps its prompts as "
                            "per-request counts (write a full one with `coxmoe trace gen`)")
    if (h.num_layers, h.num_experts, h.top_k) != (m.num_moe_layers, m.num_experts, m.top_k):
        raise SimInputError(f"the trace is for {h.num_layers} MoE layers x {h.num_experts} experts, top-{h.top_k}; the "
                            f"plan's model {m.name} has {m.num_moe_layers} x {m.num_experts}, top-{m.top_k}")
    n = wl.batch
    if trace.num_requests < n or not (np.array_equal(trace.prompt_lens[:n], wl.prompt_lens)
                                      and np.array_equal(trace.gen_lens[:n], wl.gen_lens)):
        raise SimInputError(f"the trace's requests do not match the plan's workload ({n} requests and their prompt "
                            "and generation lengths): not the trace the plan was built from")
    hits = np.zeros((trace.num_tokens, m.num_moe_layers, m.top_k), dtype=np.int16)
    steps: set[tuple[Phase, int]] = set()
    for op in plan.ops:
        if op.kind is OpKind.ROUTER:
            steps.add((op.phase, op.step))
        if op.kind is not OpKind.EXPERT:
            continue
        for member in member_ops(op):  # a grouped op computes each of its experts' assignments
            rows, slots = shard_assignments(plan, trace, member)
            if rows.size != member.tokens and not padded_positions(plan, member, rows.size):
                raise SimInputError(f"plan op {op.id}: expert {member.expert} layer {op.layer} says {member.tokens} "
                                    f"tokens; its scope routes {rows.size} there")
            np.add.at(hits, (rows, m.moe_index(op.layer), slots), 1)
    awaited = {d for op in plan.ops for d in op.deps}
    last_on_stream = {op.stream: op.id for op in plan.ops}
    for op in plan.ops:
        if op.kind is OpKind.EXPERT and op.id not in awaited and last_on_stream[op.stream] == op.id:
            what = f"experts {', '.join(str(e) for e, *_ in op.members)}" if op.members else f"expert {op.expert}"
            raise SimInputError(f"plan op {op.id}: {what} layer {op.layer} on {op.stream}: nothing waits "
                                "for its output (no op depends on it, none follows it on its stream)")
    every = np.arange(plan.workload.batch)
    expected = np.zeros(trace.num_tokens, dtype=bool)
    for phase, step in steps:
        expected[scope_rows(plan, trace, phase, step, every)] = True
    twice = np.argwhere(hits > 1)
    if twice.size:
        row, layer, slot = twice[0]
        raise SimInputError(f"token row {row}, MoE layer {layer}, slot {slot}: computed {hits[row, layer, slot]} "
                            "times")
    missing = np.argwhere(expected[:, None, None] & (hits == 0))
    if missing.size:
        row, layer, slot = missing[0]
        raise SimInputError(f"token row {row}, MoE layer {layer}, slot {slot} (expert "
                            f"{trace.experts[row, layer, slot]}): never computed")
    stray = np.argwhere(~expected[:, None, None] & (hits > 0))
    if stray.size:
        raise SimInputError(f"token row {stray[0][0]}: computed at a step the plan does not run")
