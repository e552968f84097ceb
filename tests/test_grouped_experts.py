"""Grouped expert ops (issue 13): consecutive expert ops on one stream with the same dependencies and nothing
waiting between them are one op whose members the cost model prices one by one (alone in its resource group, the
group takes their summed time; sharing it, the engine runs each member at its own fair rate in turn). A grouped
plan must time exactly as the plan of one op per expert (`ungroup`), be checked, saved, verified against its
trace and executed member by member."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from schedules import run_both

from executor.reference import reference_forward
from executor.run import execute_plan
from executor.weights import random_weights
from sim.cost import GroupPrices, RooflineCostModel, op_time_ns
from sim.cost.framework import FrameworkCostModel, FrameworkFactors
from sim.engine import run_plan
from sim.errors import SimInputError
from sim.metrics import plan_metrics
from sim.plan import Op, OpKind, Phase, Plan, PlanBuilder, Stream, member_ops, ungroup
from sim.plan_io import load_plan, save_plan
from sim.plan_verify import verify_assignments
from sim.policies import PlanContext, make_policy
from sim.policies.layers import At, LayerEmitter
from sim.specs import ModelSpec, load_model, load_system
from sim.workload import Workload
from traces import SynthConfig, generate_trace

TINY = ModelSpec(name="tiny", num_layers=2, hidden_size=64, vocab_size=97, num_attention_heads=4, num_kv_heads=2,
                 head_dim=16, num_experts=8, top_k=2, expert_intermediate_size=48)


def tiny_case(system, policy="gpu-only", knobs=None):
    prompts, gens = np.array([5, 3, 7, 4, 6, 2]), np.array([3, 2, 4, 3, 2, 3])
    trace = generate_trace(SynthConfig("tiny", 2, 8, 2, "zipf:1.0", 0.0, 1), prompts, gens)
    workload = Workload(prompts, gens)
    plan = make_policy(policy, knobs or {}).build(PlanContext(TINY, system, workload, trace))
    return plan, trace, workload


def assert_times_as_ungrouped(plan: Plan, cost) -> None:
    """The grouped plan's record equals the ungrouped one's: each op (a group: its first member's start, its last
    member's end) at the same times, the same peaks, busy times and metrics."""
    flat = ungroup(plan)
    reference = run_plan(flat, cost, fast=False)
    grouped = run_both(plan, cost)
    first = last = 0
    for op in plan.ops:
        last = first + max(len(op.members), 1) - 1
        assert grouped.start_ns[op.id] == reference.start_ns[first], op
        assert grouped.end_ns[op.id] == reference.end_ns[last], op
        first = last + 1
    assert first == len(flat.ops)
    assert grouped.peak_bytes == reference.peak_bytes and grouped.busy_ns == reference.busy_ns
    assert plan_metrics(plan, grouped) == plan_metrics(flat, reference)


def test_the_emitter_groups_experts_with_the_same_deps_only():
    system = load_system("a100-80g-8452y")
    plan, trace, workload = tiny_case(system)
    emit = LayerEmitter(PlanContext(TINY, system, workload, trace), PlanBuilder())
    counts = np.array([3, 0, 2, 5, 1, 0, 4, 2])
    at = At(Phase.PREFILL, 0, 1, 0)
    router, fetch = 5, 9  # ids only: the emitter does not look them up
    last = emit.experts(Stream.GPU, at, counts, [0, 1, 2, 3, 6, 7], (router,),
                        ready=lambda e: fetch if e in (6, 7) else -1)
    ops = emit.b.ops
    assert last == len(ops) - 1 and len(ops) == 2  # (0, 2, 3) with the router only, (6, 7) also after the fetch
    assert [m[0] for m in ops[0].members] == [0, 2, 3] and ops[0].expert == -1 and ops[0].tokens == 10
    assert [m[0] for m in ops[1].members] == [6, 7] and ops[1].deps == (router, fetch)
    assert ops[0].deps == (router,)
    work = emit.w.expert
    assert ops[0].flops == sum(work(t)[0] for t in (3, 2, 5)) and ops[0].bytes == sum(work(t)[1] for t in (3, 2, 5))
    emit.experts(Stream.CPU_EXPERTS, at, counts, [0, 2], (router,))  # on a shared stream too
    assert [m[0] for m in ops[2].members] == [0, 2] and len(ops) == 3
    emit.experts(Stream.GPU, at, counts, [1, 6], (router,))  # one expert with tokens: a plain op
    assert ops[-1].expert == 6 and not ops[-1].members


@pytest.mark.parametrize("fetched,fetch", [({6, 7}, 9), (set(), 9), ({0, 2, 3, 6, 7}, 9), ({2, 6}, 9),
                                           ({2}, -1)])
def test_a_ready_that_answers_for_many_experts_builds_the_same_ops(fetched, fetch):
    """CoX-MoE's weights-ready look-up answers for an array of experts at once (`many`); the ops must equal
    those built by asking it expert by expert."""
    from sim.policies.compose import _WeightsReady

    system = load_system("a100-80g-8452y")
    _, trace, workload = tiny_case(system)
    counts = np.array([3, 0, 2, 5, 1, 0, 4, 2], dtype=np.uint16)  # count tables use narrow types
    weights = _WeightsReady(fetched, fetch)
    built = []
    for ready in (weights, lambda e: weights(e)):
        emit = LayerEmitter(PlanContext(TINY, system, workload, trace), PlanBuilder())
        emit.experts(Stream.GPU, At(Phase.DECODE, 1, 1, 0), counts, [0, 1, 2, 3, 6, 7], (5,), ready=ready)
        built.append(emit.b.ops)
    assert built[0] == built[1] and sum(max(len(op.members), 1) for op in built[0]) == 5
    assert all(type(v) is int for op in built[0] for m in op.members for v in m)  # plain ints, as plan files hold


@pytest.mark.parametrize("system,policy,knobs", [
    ("a100-80g-8452y", "gpu-only", {"prefill_tokens": "9", "decode_micro_batch": "2"}),
    ("a100-80g-8452y", "moe-lightning", {}),
    ("rtx6000ada-8452y", "coxmoe", {}),
    ("a100-80g-8452y-ndp8", "trimoe", {}),
    ("2x-h100-sxm-nvlink-8480", "expert-parallel", {}),
    # CPU experts share host DRAM with the copies and CPU attention: members run in turn at fair rates
    ("a100-80g-8452y", "fiddler", {}),
    ("a100-80g-8452y", "cpu-only", {}),
    ("a100-80g-8452y", "coxmoe", {"resident_experts": "2", "split": "cpu", "decode_placement": "gcg"}),
    ("a100-80g-8452y-ndp8", "ndp-experts", {}),
])
def test_a_grouped_plan_times_exactly_as_one_op_per_expert(system, policy, knobs):
    plan, trace, _ = tiny_case(load_system(system), policy, knobs)
    assert any(op.members for op in plan.ops)
    plan.check()
    verify_assignments(plan, trace)  # every member's assignments, once each
    cost = RooflineCostModel(plan.system)
    assert_times_as_ungrouped(plan, cost)
    # a runtime's factor rounds each op's stretched time: a group is the sum of its members' rounded times
    assert_times_as_ungrouped(plan, FrameworkCostModel(cost, FrameworkFactors(1.37, 2.11)))


def test_real_model_plans_group_and_keep_their_times(paper_system):
    """Qwen3-30B-A3B (128 experts, top-8) under three policies: far fewer ops, the same record."""
    from sim.api import resolve_routing

    model = load_model("qwen3-30b-a3b")
    wl, trace, _ = resolve_routing(model, 48, 40, 4, None, "zipf:1.0", 0)
    cost = RooflineCostModel(paper_system)
    for policy in ("coxmoe", "moe-lightning", "flexgen"):
        plan = make_policy(policy).build(PlanContext(model, paper_system, wl, trace))
        flat = ungroup(plan)
        assert len(plan.ops) * 4 < len(flat.ops), policy
        assert_times_as_ungrouped(plan, cost)


def test_cost_models_refuse_a_group_and_the_helper_sums_its_members(paper_system):
    plan, _, _ = tiny_case(paper_system)
    group = next(op for op in plan.ops if op.members)
    cost = RooflineCostModel(paper_system)
    with pytest.raises(ValueError, match="grouped expert op"):
        cost.op_time_ns(group)
    assert op_time_ns(cost, group) == sum(cost.op_time_ns(m) for m in member_ops(group))
    memo = GroupPrices(cost)  # the engine's: members priced once per shape
    for op in plan.ops:
        assert memo(op) == op_time_ns(cost, op)
        if op.members:  # the (time, usage) parts agree with the member ops' own prices and usages
            assert memo.parts(op) == [(cost.op_time_ns(m), cost.usage(m)) for m in member_ops(op)]
    assert memo.times_memo and memo.parts_memo
    assert [m.expert for m in member_ops(group)] == [m[0] for m in group.members]


def _with(plan: Plan, op: Op, **changes) -> Plan:
    ops = list(plan.ops)
    ops[op.id] = dataclasses.replace(op, **changes)
    return dataclasses.replace(plan, ops=ops)


def test_the_check_refuses_malformed_groups(paper_system):
    plan, _, _ = tiny_case(paper_system)
    group = next(op for op in plan.ops if op.members)
    m = group.members
    bad = {
        "needs kind expert and expert -1": dict(expert=m[0][0]),
        "two or more members": dict(members=m[:1], tokens=m[0][1], flops=m[0][2], bytes=m[0][3]),
        "appears twice": dict(members=(m[0], m[0]), tokens=2 * m[0][1], flops=2 * m[0][2], bytes=2 * m[0][3]),
        "members sum to": dict(tokens=group.tokens + 1),
        "needs an expert in": dict(members=((99, *m[0][1:]), *m[1:])),
    }
    for message, changes in bad.items():
        with pytest.raises(SimInputError, match=message):
            _with(plan, group, **changes).check()
    with pytest.raises(SimInputError, match="needs kind expert"):
        _with(plan, group, kind=OpKind.SHARED_EXPERT).check()


def test_members_seen_in_earlier_groups_still_face_each_groups_own_checks(paper_system):
    """Groups share their stored members: a later group made of members an earlier group holds is still refused
    for a repeated expert or sums that are not its own, and a member out of bounds is refused wherever it sits."""
    plan, _, _ = tiny_case(paper_system)
    groups = [op for op in plan.ops if op.members]
    assert len(groups) >= 2
    first, last = groups[0], groups[-1]
    m = first.members  # objects the check has bounded by the time it reaches the last group
    with pytest.raises(SimInputError, match="appears twice"):  # checked before the sums
        _with(plan, last, members=(m[0], m[0])).check()
    wrong = {"flops": last.flops + 1} if tuple(map(sum, list(zip(*m, strict=True))[1:])) == (
        last.tokens, last.flops, last.bytes) else {}
    with pytest.raises(SimInputError, match="members sum to"):
        _with(plan, last, members=m, **wrong).check()
    with pytest.raises(SimInputError, match="needs an expert in"):
        _with(plan, last, members=(*last.members[:-1], (99, *last.members[-1][1:]))).check()
    plan.check()  # unchanged, the plan passes


def test_verify_names_a_member_whose_tokens_are_wrong(paper_system):
    plan, trace, _ = tiny_case(paper_system)
    group = next(op for op in plan.ops if op.members)
    e, t, f, b = group.members[0]
    wrong = ((e, t + 1, f, b), *group.members[1:])
    with pytest.raises(SimInputError, match=f"expert {e} layer {group.layer} says {t + 1} tokens"):
        verify_assignments(_with(plan, group, members=wrong, tokens=group.tokens + 1), trace)


def test_a_grouped_plan_saves_and_loads(paper_system, tmp_path):
    plan, _, _ = tiny_case(paper_system)
    back = load_plan(save_plan(plan, tmp_path / "grouped.parquet"))
    assert [op.members for op in back.ops] == [op.members for op in plan.ops]
    assert back.ops == plan.ops


def test_a_plan_file_without_member_columns_loads_and_partial_ones_are_refused(paper_system, tmp_path):
    import pyarrow.parquet as pq

    plan, _, _ = tiny_case(paper_system)
    flat = ungroup(plan)
    path = save_plan(flat, tmp_path / "flat.parquet")
    table = pq.read_table(path)
    old = table.drop(["member_expert", "member_tokens", "member_flops", "member_bytes"])
    pq.write_table(old, tmp_path / "old.parquet")
    assert load_plan(tmp_path / "old.parquet").ops == flat.ops  # files written before groups existed
    pq.write_table(table.drop(["member_bytes"]), tmp_path / "partial.parquet")
    with pytest.raises(SimInputError, match="lacks member_bytes"):
        load_plan(tmp_path / "partial.parquet")


def test_the_executor_runs_a_group_member_by_member(paper_system):
    plan, trace, workload = tiny_case(paper_system)
    assert any(op.members for op in plan.ops)
    weights = random_weights(TINY, seed=3)
    want = reference_forward(weights, trace, workload)
    got = execute_plan(plan, weights, trace, use_cuda=False).outputs
    flat = execute_plan(ungroup(plan), weights, trace, use_cuda=False).outputs
    assert got.keys() == want.keys() == flat.keys()
    for k in want:
        assert np.array_equal(got[k].float().numpy(), flat[k].float().numpy())  # the same kernels in the same order
    worst = max(float((got[k].float() - want[k].float()).norm() / want[k].float().norm()) for k in want)
    assert worst < 2e-2


def test_the_executor_checks_each_members_tokens(paper_system):
    from executor.interpret import PlanInterpreter

    plan, trace, _ = tiny_case(paper_system)
    group = next(op for op in plan.ops if op.members)
    e, t, f, b = group.members[-1]
    wrong = _with(plan, group, members=(*group.members[:-1], (e, t + 1, f, b)), tokens=group.tokens + 1)
    with pytest.raises(ValueError, match=f"runs expert {e} on {t + 1} tokens; the trace routes {t}"):
        PlanInterpreter(wrong, random_weights(TINY, seed=3), trace).run()


def test_a_group_may_sum_past_the_per_op_work_limit(paper_system):
    """The 2^50 bound keeps one op's clock in range; a group's work is its members' sum, each bounded (review:
    DBRX's coalesced prefill at B=1024, prompt 1400, grouped nine fetched experts past 2^50 FLOPs)."""
    from sim.plan import MAX_OP_WORK

    plan, _, _ = tiny_case(paper_system)
    group = next(op for op in plan.ops if op.members)
    big = MAX_OP_WORK // 2 + 1
    members = tuple((e, t, big, b) for e, t, _, b in group.members)
    huge = _with(plan, group, members=members, flops=big * len(members))
    huge.check()
    cost = RooflineCostModel(paper_system)
    assert op_time_ns(cost, huge.ops[group.id]) == sum(cost.op_time_ns(m) for m in member_ops(huge.ops[group.id]))
    with pytest.raises(SimInputError, match="work in"):
        _with(plan, group, members=((group.members[0][0], 1, MAX_OP_WORK + 1, 0), *group.members[1:]),
              flops=MAX_OP_WORK + 1 + sum(m[2] for m in group.members[1:]),
              tokens=1 + sum(m[1] for m in group.members[1:]), bytes=sum(m[3] for m in group.members[1:])).check()


def test_the_memory_guard_charges_a_groups_members(paper_system, monkeypatch):
    """Members cost memory as ops do (about 150 bytes each): a plan whose ops fit but whose members do not is
    refused while it is built."""
    import math

    import sim.plan as plan_module
    from traces.limits import MEMBER_OP_SHARE, ResourceLimitError

    plan, _, _ = tiny_case(paper_system)
    members = sum(len(op.members) for op in plan.ops)
    assert members
    load = len(plan.ops) + members * MEMBER_OP_SHARE
    monkeypatch.setattr(plan_module, "max_ops", lambda: math.ceil(load))
    again, _, _ = tiny_case(paper_system)
    assert len(again.ops) == len(plan.ops)
    monkeypatch.setattr(plan_module, "max_ops", lambda: len(plan.ops) + 1)  # the ops alone would fit
    with pytest.raises(ResourceLimitError, match="a grouped op's expert"):
        tiny_case(paper_system)


def test_member_columns_must_hold_integers(paper_system, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    plan, _, _ = tiny_case(paper_system)
    table = pq.read_table(save_plan(plan, tmp_path / "p.parquet"))
    k = table.column_names.index("member_expert")
    floats = pa.array([[float(v) + 0.5 for v in row] for row in table["member_expert"].to_pylist()],
                      pa.list_(pa.float64()))
    pq.write_table(table.set_column(k, "member_expert", floats), tmp_path / "f.parquet")
    with pytest.raises(SimInputError, match="other than integers"):
        load_plan(tmp_path / "f.parquet")


def test_members_on_a_shared_stream_run_at_their_own_rates(paper_system):
    """A CPU expert group while copies draw host DRAM: each member's usage differs (its tokens), and the group's
    end equals the ungrouped ops' under contention, not their summed standalone times."""
    plan, _, _ = tiny_case(paper_system, "coxmoe", {"resident_experts": "2", "split": "cpu",
                                                    "decode_placement": "gcg"})
    cost = RooflineCostModel(plan.system)
    groups = [op for op in plan.ops if op.members and op.stream == Stream.CPU_EXPERTS]
    assert groups
    rec = run_plan(plan, cost)
    slowed = [op for op in groups if rec.end_ns[op.id] - rec.start_ns[op.id] > op_time_ns(cost, op)]
    assert slowed, "some CPU group should share host DRAM with a copy or attention"
    assert_times_as_ungrouped(plan, cost)
