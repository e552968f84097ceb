"""Composed policies (sim/policies/compose.py): a schedule and a layout per phase become a plan through one
emitter that inserts a copy wherever data changes device, and static memory follows the placement."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from executor.interpret import PlanInterpreter
from executor.reference import reference_forward
from executor.run import execute_plan
from executor.weights import random_weights
from sim.cost import RooflineCostModel
from sim.engine import run_plan
from sim.plan import OpKind, Payload, Phase, Stream, member_ops
from sim.plan_verify import verify_assignments
from sim.policies import PlanContext, compose
from sim.policies.compose import Layout, Schedule, all_experts, compose_plan, cpu_static, gpu_static, no_experts
from sim.specs import ModelSpec
from sim.workload import Workload
from traces import SynthConfig, generate_trace

SPEC = ModelSpec(name="tiny", num_layers=2, hidden_size=64, vocab_size=97, num_attention_heads=4, num_kv_heads=2,
                 head_dim=16, num_experts=4, top_k=2, expert_intermediate_size=48)


def context(system, spec: ModelSpec = SPEC, prompts=(5, 3, 7, 4, 6), gens=(3, 2, 3, 3, 1)) -> PlanContext:
    prompts, gens = np.asarray(prompts), np.asarray(gens)
    trace = generate_trace(SynthConfig(spec.name, spec.num_moe_layers, spec.num_experts, spec.top_k, "zipf:1.0",
                                       0.0, 1), prompts, gens)
    return PlanContext(spec, system, Workload(prompts, gens), trace)


def split_layout(m: ModelSpec, placement: str) -> Layout:
    """Expert 0 resident, expert 1 fetched, the rest on the CPU, in every MoE layer."""
    rest = tuple(range(2, m.num_experts))
    return Layout(placement, ((0,),) * m.num_moe_layers, ((1,),) * m.num_moe_layers, (rest,) * m.num_moe_layers)


def test_module_batching_runs_each_expert_once_per_group_of_micro_batches(paper_system):
    """Expert batch 2 over three decode micro-batches: expert ops gather micro-batches {0, 1} and {2}; every
    assignment is computed once, the plan runs in both engines and matches the reference forward pass."""
    ctx = context(paper_system, gens=(3, 2, 3, 3, 3))
    schedule = Schedule.split(ctx, prefill_tokens=9, decode_micro_batch=2, expert_batch=2)
    assert len(schedule.decode) == 3
    layout = split_layout(SPEC, "gcg")
    plan = compose_plan(ctx, "composed", {}, schedule, layout, layout, {"gpu": {}, "cpu": {}}, kv_on_gpu=False)
    plan.check()
    verify_assignments(plan, ctx.trace)
    decode_experts = [op for op in plan.ops if op.kind is OpKind.EXPERT and op.phase is Phase.DECODE]
    grouped = [op for op in decode_experts if op.scope >= 0]
    assert grouped, "some expert ops should gather two micro-batches"
    first_two = np.concatenate(schedule.decode[:2])
    for op in grouped:  # the requests of micro-batches 0 and 1 still generating at the op's step
        scope = plan.scopes[op.scope]
        active = first_two[ctx.workload.gen_lens[first_two] > op.step]
        assert scope.step == op.step and np.array_equal(scope.requests, active)
    for op in decode_experts:  # the rest run on the last micro-batch alone
        assert op.scope >= 0 or op.micro_batch == 2
    # at most one op per (step, layer, expert, group): two groups
    per_key: dict[tuple, int] = {}
    for op in decode_experts:
        for member in member_ops(op):
            key = (op.step, op.layer, member.expert)
            per_key[key] = per_key.get(key, 0) + 1
    assert max(per_key.values()) <= 2
    run_plan(plan, RooflineCostModel(paper_system), check=True)
    weights = random_weights(SPEC, seed=3)
    got = PlanInterpreter(plan, weights, ctx.trace).run()
    want = reference_forward(weights, ctx.trace, ctx.workload)
    worst = max(float((got[k].float() - want[k].float()).norm() / want[k].float().norm()) for k in want)
    assert worst < 2e-2
    ran = execute_plan(plan, weights, ctx.trace, use_cuda=False).outputs  # threads per stream, measured times
    worst = max(float((ran[k].float() - want[k].float()).norm() / want[k].float().norm()) for k in want)
    assert worst < 2e-2


@pytest.mark.parametrize("placement", ["".join(p) for p in itertools.product("gc", repeat=3)])
def test_a_copy_is_inserted_exactly_where_data_changes_device(paper_system, placement):
    """Per decode micro-batch and layer: hidden states down when QKV runs on the CPU, QKV output across when
    attention runs elsewhere, attention output across when OP2 does, hidden states up for the GPU experts when
    the router ran on the CPU, down for E_C when it ran on the GPU, and E_C's outputs back up."""
    ctx = context(paper_system, prompts=(4, 4), gens=(3, 3))
    schedule = Schedule.split(ctx, prefill_tokens=64, decode_micro_batch=0)
    layout = split_layout(SPEC, placement)
    plan = compose_plan(ctx, "composed", {}, schedule, layout, layout, {"gpu": {}, "cpu": {}},
                        kv_on_gpu=placement[1] == "g")
    verify_assignments(plan, ctx.trace)
    x0, x1, x2 = placement
    cpu_routed = any(op.kind is OpKind.EXPERT and op.stream == Stream.CPU_EXPERTS and op.phase is Phase.DECODE
                     and op.step == 1 and op.layer == 0 for op in plan.ops)
    want = ((x0 == "c") + (x0 != x1) + (x1 != x2) + (x2 == "c")
            + (x2 == "g" and cpu_routed) + cpu_routed)
    got = [op for op in plan.ops if op.kind is OpKind.COPY and op.payload is Payload.ACTIVATIONS
           and op.phase is Phase.DECODE and op.step == 1 and op.layer == 0]
    assert len(got) == want, [(op.stream, op.bytes) for op in got]
    # a copy always goes from the device that made the data to the one that uses it
    by_id = {op.id: op for op in plan.ops}
    for copy in got:
        src = {by_id[d].stream for d in copy.deps}
        if copy.stream == Stream.D2H:
            assert src <= {Stream.GPU, Stream.H2D, Stream.H2D_ACT}
        else:
            assert src <= {Stream.CPU, Stream.CPU_EXPERTS, Stream.D2H}


def test_static_memory_follows_the_placement(paper_system, tiny_mla_model):
    """QKV and O-projection weights sit where those ops run, the KV cache where decode attention runs; experts
    take VRAM only as residents and fetch buffers."""
    m = tiny_mla_model
    ctx = context(paper_system, spec=m)
    bpp = m.bytes_per_param
    gpu_all = gpu_static(ctx, "ggg", "ggg", 16, 16, resident=2, widest=3)
    gpu_none = gpu_static(ctx, "ccc", "ccc", 16, 16, resident=2, widest=3)
    moved = gpu_all["non_expert_weights"] - gpu_none["non_expert_weights"]
    assert moved == m.num_layers * (m.qkv_params + m.o_proj_params) * bpp
    # all on the GPU: every weight but the routed experts', the final norm included (it had been left out)
    assert gpu_all["non_expert_weights"] == m.non_expert_params * bpp
    assert "kv_cache" in gpu_all and "kv_cache" not in gpu_none
    assert gpu_all["resident_experts"] == 2 * m.num_moe_layers * m.expert_bytes
    assert gpu_all["expert_fetch_buffers"] == 2 * 3 * m.expert_bytes
    cpu_all = cpu_static(ctx, "ccc", "ccc")
    assert cpu_all["kv_cache"] == gpu_all["kv_cache"]
    assert cpu_all["non_expert_weights"] == m.num_layers * (m.qkv_params + m.o_proj_params + m.router_params) * bpp
    assert "non_expert_weights" not in cpu_static(ctx, "ggg", "ggg")
    assert cpu_static(ctx, "ggg", "gcg")["kv_cache"] == gpu_all["kv_cache"]


@pytest.mark.parametrize("pre,dec", [("ggg", "ggg"), ("gcg", "ccc"), ("cgc", "gcg")])
def test_gpu_static_is_linear_in_residents_and_fetch_buffers(paper_system, tiny_mla_model, pre, dec):
    """The search sizes a configuration from its memory with no residents or buffers and `gpu_static_slopes`
    (`CoxMoe.gpu_static_linear`): the total must be exactly that line at every resident and buffer count."""
    ctx = context(paper_system, spec=tiny_mla_model)
    per_resident, per_buffer = compose.gpu_static_slopes(tiny_mla_model)
    assert per_resident > 0 and per_buffer > 0
    base = sum(gpu_static(ctx, pre, dec, 16, 32, 0, 0).values())
    for resident, widest in itertools.product((0, 1, 3, tiny_mla_model.num_experts), (0, 1, 5)):
        total = sum(gpu_static(ctx, pre, dec, 16, 32, resident, widest).values())
        assert total == base + resident * per_resident + widest * per_buffer


def test_fetch_routed_copies_only_the_experts_a_step_chose(paper_system):
    """On-demand streaming: each layer visit copies the E_M experts its tokens chose, not all of E_M."""
    ctx = context(paper_system, prompts=(2,), gens=(3,))
    schedule = Schedule.split(ctx, prefill_tokens=64, decode_micro_batch=0, expert_batch=1)
    every, none = all_experts(SPEC), no_experts(SPEC)
    plans = {routed: compose_plan(ctx, "composed", {}, schedule, Layout("ggg", none, every, none, fetch_routed=routed),
                                  Layout("ggg", none, every, none, fetch_routed=routed), {"gpu": {}, "cpu": {}}, True)
             for routed in (False, True)}
    for routed, plan in plans.items():
        verify_assignments(plan, ctx.trace)
        for op in plan.ops:
            if op.kind is OpKind.COPY and op.payload is Payload.EXPERT_WEIGHTS:
                chose = {m.expert for e in plan.ops if e.kind is OpKind.EXPERT and e.phase is op.phase
                         and e.step == op.step and e.layer == op.layer for m in member_ops(e)}
                assert op.bytes == (len(chose) if routed else SPEC.num_experts) * SPEC.expert_bytes


@pytest.mark.parametrize("home", [Stream.GPU, Stream.CPU])
@pytest.mark.parametrize("placement", ["ggg", "gcg", "cgc", "ccc"])
def test_data_crosses_devices_only_through_copies(paper_system, tiny_mla_model, placement, home):
    """Whatever the layout and wherever the residual lives, a compute op waits on compute ops of its own device
    only: data made elsewhere reaches it through a copy (hidden states, attention outputs, expert outputs)."""
    m = tiny_mla_model
    ctx = context(paper_system, spec=m, prompts=(4, 6, 5), gens=(3, 3, 2))
    schedule = Schedule.split(ctx, prefill_tokens=64, decode_micro_batch=2, expert_batch=1)
    rest = tuple(range(2, m.num_experts))
    layout = Layout(placement, ((0,),) * m.num_moe_layers, ((1,),) * m.num_moe_layers,
                    (rest,) * m.num_moe_layers, home=home)
    plan = compose_plan(ctx, "composed", {}, schedule, layout, layout, {"gpu": {}, "cpu": {}},
                        kv_on_gpu=placement[1] == "g")
    plan.check()
    verify_assignments(plan, ctx.trace)
    by_id = {op.id: op for op in plan.ops}
    cpu_side = {Stream.CPU, Stream.CPU_EXPERTS}
    for op in plan.ops:
        if op.kind is OpKind.COPY:
            continue
        for d in op.deps:
            dep = by_id[d]
            if dep.kind is not OpKind.COPY:
                assert (op.stream in cpu_side) == (dep.stream in cpu_side), (op.kind, op.stream, dep.kind, dep.stream)
    shared = [op for op in plan.ops if op.kind is OpKind.SHARED_EXPERT]
    assert shared and all(op.deps for op in shared) and {op.stream for op in shared} == {home}
    run_plan(plan, RooflineCostModel(paper_system), check=True)


def test_coxmoe_split_tokens_shares_an_expert_between_gpu_and_cpu(paper_system):
    """split_tokens=on: per layer one expert's tokens in eighths, some on the GPU and the rest on the CPU lane;
    together they are the expert's tokens, every assignment is computed once, and both executors match the
    reference forward pass."""
    from sim.policies import make_policy

    ctx = context(paper_system, prompts=(5, 3, 7, 4, 6), gens=(3, 2, 3, 3, 3))
    # a kernel call per GPU expert: the tiny model's GPU experts then cost enough for a split to pay; all four
    # experts resident (the search, since it also ranks fewer residents, keeps two and leaves nothing to split)
    plan = make_policy("coxmoe", {"split_tokens": "on", "expert_kernels": "per_expert",
                                  "resident_experts": "4"}).build(ctx)
    assert sum(sum(v) for v in plan.knobs["split_experts_per_layer"].values()) > 0
    plan.check()
    verify_assignments(plan, ctx.trace)
    shards = [op for op in plan.ops if op.kind is OpKind.EXPERT and op.scope >= 0 and plan.scopes[op.scope].shards > 1]
    assert {op.stream for op in shards} == {Stream.GPU, Stream.CPU_EXPERTS}
    by_visit: dict[tuple, dict] = {}
    parts: dict[tuple, dict] = {}  # shard indices per side
    for op in shards:
        assert not op.members  # a shard is one expert's
        assert plan.scopes[op.scope].shards == 8  # eighths
        visit = (op.phase, op.step, op.layer, op.expert)
        sides = by_visit.setdefault(visit, {})
        sides[op.stream] = sides.get(op.stream, 0) + op.tokens
        parts.setdefault(visit, {}).setdefault(op.stream, []).append(plan.scopes[op.scope].shard)
    for (phase, step, layer, expert), sides in by_visit.items():
        assert Stream.GPU in sides  # the first shards (the larger ones) run on the GPU, the rest on the CPU lane
        on = parts[(phase, step, layer, expert)]
        assert max(on[Stream.GPU]) < min(on.get(Stream.CPU_EXPERTS, [8]))
        whole = [op for op in plan.ops if op.kind is OpKind.EXPERT and op.scope < 0 for m in member_ops(op)
                 if (op.phase, op.step, op.layer, m.expert) == (phase, step, layer, expert)]
        assert not whole  # a split expert runs as shards only
    weights = random_weights(SPEC, seed=3)
    want = reference_forward(weights, ctx.trace, ctx.workload)
    for got in (PlanInterpreter(plan, weights, ctx.trace).run(),
                execute_plan(plan, weights, ctx.trace, use_cuda=False).outputs):
        worst = max(float((got[k].float() - want[k].float()).norm() / want[k].float().norm()) for k in want)
        assert worst < 2e-2
    off = make_policy("coxmoe", {"split_tokens": "off"}).build(ctx)
    assert "split_experts_per_layer" not in off.knobs and not any(op.scope >= 0 for op in off.ops)
