"""How a runtime launches the GPU's routed experts (`Plan.expert_kernels`): a kernel call per expert pays the
GPU's per-kernel cost per expert; one fused MoE call per layer pays none per expert (its kernels queue behind the
router's call). Recorded on the plan by each policy, kept by plan files, priced by the roofline."""

from __future__ import annotations

import dataclasses
import json

import pyarrow.parquet as pq
import pytest

from sim.api import simulate
from sim.cost import RooflineCostModel
from sim.errors import SimInputError
from sim.plan import OpKind, Stream, member_ops
from sim.plan_io import PLAN_FORMAT, load_plan, save_plan
from sim.policies import make_policy


def _gpu_expert_seconds(plan) -> list[tuple[float, float]]:
    """(priced seconds, roofline seconds without the fixed cost) of every GPU expert member of `plan`."""
    cost = RooflineCostModel(plan.system)
    cost.prepare(plan)
    out = []
    for op in plan.ops:
        if op.kind is OpKind.EXPERT and op.stream == Stream.GPU:
            for m in member_ops(op):
                compute, memory, _ = cost.roofs(m.kind, m.stream, m.flops, m.bytes)
                out.append((cost.op_time_ns(m) * 1e-9, max(compute, memory)))
    return out


def test_fused_experts_pay_no_kernel_call_each_and_per_expert_ones_do(tiny_model, paper_system):
    launch = paper_system.gpu.kernel_launch_s
    kw = dict(batch=8, prompt_len=6, gen_len=3, keep_plan=True,
              policy_options={"prefill_placement": "ggg", "decode_placement": "ggg", "resident_experts": "8",
                              "decode_micro_batch": "0", "prefill_micro_batch": "0"})
    fused = simulate(tiny_model, paper_system, "coxmoe", **kw)
    kw["policy_options"] = {**kw["policy_options"], "expert_kernels": "per_expert"}
    looped = simulate(tiny_model, paper_system, "coxmoe", **kw)
    assert fused.plan.expert_kernels == "fused" and looped.plan.expert_kernels == "per_expert"
    f, p = _gpu_expert_seconds(fused.plan), _gpu_expert_seconds(looped.plan)
    assert f and len(f) == len(p)
    assert all(t == pytest.approx(roof, abs=1e-9) for t, roof in f)
    assert all(t == pytest.approx(roof + launch, abs=1e-9) for t, roof in p)
    assert fused.decode_s < looped.decode_s


def test_a_dense_ffn_pays_its_own_kernels_under_either_style(paper_system):
    """A dense model's FFN is a one-expert MoE here: its GEMMs are kernels of their own, fused style or not."""
    from sim.specs import load_model

    opt = load_model("opt-6.7b")
    fused = simulate(opt, paper_system, "gpu-only", batch=4, prompt_len=8, gen_len=3, keep_plan=True)
    assert fused.plan.expert_kernels == "fused"
    launch = paper_system.gpu.kernel_launch_s
    assert all(t == pytest.approx(roof + launch, abs=1e-9) for t, roof in _gpu_expert_seconds(fused.plan))


@pytest.mark.parametrize("policy, style", [("gpu-only", "fused"), ("moe-lightning", "fused"), ("flexgen", "fused"),
                                           ("stream-experts", "fused"), ("coxmoe", "fused"),
                                           ("fiddler", "per_expert"), ("zero-inference", "per_expert"),
                                           ("moe-gen", "per_expert")])
def test_each_policy_records_how_its_runtime_launches_experts(tiny_model, paper_system, policy, style):
    r = simulate(tiny_model, paper_system, policy, batch=4, prompt_len=4, gen_len=2, keep_plan=True)
    assert r.plan.expert_kernels == style
    assert make_policy(policy, {}).expert_kernels == style


def test_plan_files_keep_the_style_and_refuse_a_bad_one(tiny_model, paper_system, tmp_path):
    r = simulate(tiny_model, paper_system, "moe-lightning", batch=4, prompt_len=4, gen_len=2, keep_plan=True)
    path = save_plan(r.plan, tmp_path / "plan.parquet")
    assert load_plan(path).expert_kernels == "fused"
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[PLAN_FORMAT.encode()])
    for value, ok in ((None, "per_expert"), ("grouped", None)):  # a file before the field; an unknown style
        changed = dict(meta)
        if value is None:
            changed.pop("expert_kernels")
        else:
            changed["expert_kernels"] = value
        out = tmp_path / f"plan_{value}.parquet"
        pq.write_table(table.replace_schema_metadata({PLAN_FORMAT.encode(): json.dumps(changed).encode()}), out)
        if ok:
            assert load_plan(out).expert_kernels == ok
        else:
            with pytest.raises(SimInputError, match="expert_kernels must be one of"):
                load_plan(out)
    with pytest.raises(SimInputError, match="expert_kernels must be one of"):
        dataclasses.replace(r.plan, expert_kernels="grouped").check()
    with pytest.raises(SimInputError, match="expert_kernels"):
        make_policy("coxmoe", {"expert_kernels": "grouped"})


def test_a_profile_cost_model_reused_across_styles_prices_each_plan_in_its_own(tmp_path, tiny_model, paper_system):
    """A ProfileCostModel shared by a fused and a per-expert plan drops the roofline prices it cached for the
    other style (its GPU experts fall back to the roofline: the profile has CPU rows only)."""
    from test_calibration import write_profile  # pytest puts tests/ on the path

    from sim.cost.profile import ProfileCostModel
    from sim.engine import run_plan

    rows = [{"device": "cpu", "kind": "expert", "tokens": t, "kv": 0, "median_s": s}
            for t, s in ((1, 1e-3), (16, 4e-3))]
    prof = write_profile(tmp_path / "p", tiny_model, rows)
    opts = {"prefill_placement": "ggg", "decode_placement": "ggg", "resident_experts": "8",
            "decode_micro_batch": "0", "prefill_micro_batch": "0"}
    plans = {k: simulate(tiny_model, paper_system, "coxmoe", batch=8, prompt_len=6, gen_len=3, keep_plan=True,
                         policy_options={**opts, "expert_kernels": k}).plan for k in ("fused", "per_expert")}
    plans["fused_cpu"] = simulate(tiny_model, paper_system, "fiddler", batch=8, prompt_len=6, gen_len=3,
                                  keep_plan=True, policy_options={"resident_experts": "2", "cpu_moe": "fused",
                                                                  "cpu_max_tokens": "100000"}).plan
    shared = ProfileCostModel(paper_system, prof, tiny_model)
    for first, second in (("fused", "per_expert"), ("per_expert", "fused"), ("fused", "fused_cpu"),
                          ("fused_cpu", "fused")):
        run_plan(plans[first], shared)
        again = run_plan(plans[second], shared).end_ns
        fresh = run_plan(plans[second], ProfileCostModel(paper_system, prof, tiny_model)).end_ns
        assert (again == fresh).all()
    with pytest.raises(SimInputError, match="expert_kernels must be one of"):
        RooflineCostModel(paper_system).use_expert_kernels("grouped")


def test_the_staging_half_of_a_pageable_copy_never_outruns_host_dram(paper_system):
    from sim.specs.overrides import apply_system_settings

    fast = apply_system_settings(paper_system, {"link.h2d_bytes_per_s": "1000e9", "link.h2d_efficiency": "1.0",
                                                "link.pageable_ratio": "1.0"})
    cost = RooflineCostModel(fast)
    nbytes = 10**10  # read and written: half of it moves
    assert cost.staging_seconds(nbytes) >= nbytes / cost.cpu_bw * (1 - 1e-12)


def _cpu_expert_members(plan):
    return [m for op in plan.ops if op.kind is OpKind.EXPERT and op.stream == Stream.CPU_EXPERTS
            for m in member_ops(op)]


def test_a_fused_cpu_moe_call_ships_each_token_once_and_pays_no_dispatch_per_expert(tiny_model, paper_system):
    """Fiddler's loop (`cpu_moe=per_expert`) ships each routed (token, expert) pair's hidden state and pays the
    CPU's dispatch per expert; KTransformers' CPU MoE operator (`cpu_moe=fused`, plan style `fused_cpu`) ships
    each token's hidden state once each way and pays none per expert, the experts' own work unchanged."""
    kw = dict(batch=4, prompt_len=6, gen_len=3, keep_plan=True)
    opts = {"resident_experts": "0", "cpu_max_tokens": "100000", "attention": "gpu"}
    loop = simulate(tiny_model, paper_system, "fiddler", policy_options=opts, **kw)
    call = simulate(tiny_model, paper_system, "fiddler", policy_options={**opts, "cpu_moe": "fused"}, **kw)
    assert loop.plan.expert_kernels == "per_expert" and call.plan.expert_kernels == "fused_cpu"
    lm, cm = _cpu_expert_members(loop.plan), _cpu_expert_members(call.plan)
    assert lm and [(m.tokens, m.flops, m.bytes) for m in lm] == [(m.tokens, m.flops, m.bytes) for m in cm]
    dispatch = paper_system.cpu.op_overhead_s
    for plan, extra in ((loop.plan, dispatch), (call.plan, 0.0)):
        cost = RooflineCostModel(plan.system)
        cost.prepare(plan)
        for m in _cpu_expert_members(plan):
            compute, memory, _ = cost.roofs(m.kind, m.stream, m.flops, m.bytes)
            assert cost.op_time_ns(m) * 1e-9 == pytest.approx(cost.busy(m.kind, m.stream, compute, memory) + extra,
                                                               abs=1e-9)
    hidden = tiny_model.hidden_size * tiny_model.bytes_per_param

    def shipped(plan, stream):
        return sum(op.bytes for op in plan.ops if op.kind is OpKind.COPY and op.stream == stream)

    prompt_tokens = 4 * 6
    routed_pairs = prompt_tokens * tiny_model.top_k * tiny_model.num_moe_layers  # prefill, every expert on the CPU
    assert tiny_model.top_k > 1
    for stream in (Stream.D2H, Stream.H2D_ACT):
        prefill = [op for op in call.plan.ops if op.kind is OpKind.COPY and op.stream == stream and op.step == 0]
        assert sum(op.bytes for op in prefill) == prompt_tokens * tiny_model.num_moe_layers * hidden
        assert shipped(loop.plan, stream) > shipped(call.plan, stream)
        assert sum(op.bytes for op in loop.plan.ops if op.kind is OpKind.COPY and op.stream == stream
                   and op.step == 0) == routed_pairs * hidden
    assert call.decode_s < loop.decode_s and call.prefill_s < loop.prefill_s
    with pytest.raises(SimInputError, match="cpu_moe"):
        make_policy("fiddler", {"cpu_moe": "grouped"})
    assert make_policy("fiddler", {"cpu_moe": "fused"}).expert_kernels == "fused_cpu"


def test_a_fused_cpu_call_leaves_the_gpu_experts_a_kernel_call_each(tiny_model, paper_system):
    """Under `fused_cpu` only the CPU's experts lose their per-op cost: Fiddler's and KTransformers' resident GPU
    experts still run one kernel call each."""
    opts = {"resident_experts": "2", "cpu_max_tokens": "100000", "attention": "gpu", "cpu_moe": "fused"}
    r = simulate(tiny_model, paper_system, "fiddler", batch=4, prompt_len=6, gen_len=3, keep_plan=True,
                 policy_options=opts)
    assert r.plan.expert_kernels == "fused_cpu"
    gpu = _gpu_expert_seconds(r.plan)
    launch = paper_system.gpu.kernel_launch_s
    assert gpu and all(t == pytest.approx(roof + launch, abs=1e-9) for t, roof in gpu)


def test_the_cpu_style_is_no_option_of_the_gpu_kernel_policies():
    """`expert_kernels` of the CoX-MoE family chooses how the GPU's experts launch (fused | per_expert); the CPU's
    one-call style belongs to a runtime that has one (fiddler's `cpu_moe`)."""
    for policy in ("coxmoe", "moe-gen"):
        with pytest.raises(SimInputError, match="expert_kernels"):
            make_policy(policy, {"expert_kernels": "fused_cpu"})


def test_fiddler_fetches_into_its_one_placeholder(tiny_model, paper_system):
    """Fiddler's release copies a fetched expert into its one GPU placeholder (`expert_placeholder`), so each fetch
    waits for the previous fetched expert's compute, and its GPU memory holds one expert's worth of fetch pool."""
    opts = {"resident_experts": "0", "cpu_max_tokens": "0", "attention": "gpu"}  # every active expert fetched
    r = simulate(tiny_model, paper_system, "fiddler", batch=4, prompt_len=6, gen_len=2, keep_plan=True,
                 policy_options=opts)
    plan = r.plan
    assert plan.static_memory["gpu"]["expert_fetch_pool"] == tiny_model.expert_bytes
    fetches = [op for op in plan.ops if op.kind is OpKind.COPY and op.stream == Stream.H2D
               and op.bytes == tiny_model.expert_bytes]
    computed = {op.id: op for op in plan.ops if op.kind is OpKind.EXPERT and op.stream == Stream.GPU}
    assert len(fetches) > 2
    for before, after in zip(fetches[:-1], fetches[1:], strict=True):
        ran = [i for i, op in computed.items() if before.id in op.deps]  # the expert computed from `before`
        assert ran and max(ran) in after.deps


def test_a_profile_without_cpu_expert_rows_reprices_cpu_experts_when_the_cpu_style_changes(tmp_path, tiny_model,
                                                                                           paper_system):
    """A ProfileCostModel whose profile has no CPU expert rows prices them with its roofline: shared by a
    per-expert and a fused-CPU plan, it drops the prices it cached for the other (the GPU style is the same)."""
    from test_calibration import write_profile  # pytest puts tests/ on the path

    from sim.cost.profile import ProfileCostModel
    from sim.engine import run_plan

    rows = [{"device": "cpu", "kind": "attention", "tokens": b, "kv": kv, "median_s": 1e-4 * b * kv}
            for b in (1, 4) for kv in (16, 64)]
    prof = write_profile(tmp_path / "p", tiny_model, rows)
    opts = {"resident_experts": "0", "cpu_max_tokens": "100000", "attention": "gpu"}
    plans = {k: simulate(tiny_model, paper_system, "fiddler", batch=8, prompt_len=6, gen_len=3, keep_plan=True,
                         policy_options={**opts, "cpu_moe": k}).plan for k in ("per_expert", "fused")}
    shared = ProfileCostModel(paper_system, prof, tiny_model)
    for first, second in (("per_expert", "fused"), ("fused", "per_expert")):
        run_plan(plans[first], shared)
        again = run_plan(plans[second], shared).end_ns
        fresh = run_plan(plans[second], ProfileCostModel(paper_system, prof, tiny_model)).end_ns
        assert (again == fresh).all()
