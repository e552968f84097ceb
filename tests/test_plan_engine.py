"""Plans and the SimPy engine: conservation, ordering, capacity, determinism, exact roofline times."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sim.api import resolve_routing, simulate, simulate_plan
from sim.cost import RooflineCostModel
from sim.engine import run_plan
from sim.errors import CapacityError, SimInputError
from sim.plan import OpKind, Phase, Plan, PlanBuilder, Stream, member_ops
from sim.plan_verify import scope_rows, verify_assignments
from sim.policies import POLICIES, PlanContext, make_policy
from sim.specs import load_system
from sim.topology import topology_of
from sim.workload import Workload

# Every registered policy with each option set it names as exercising its branches (Policy.example_options).
POLICY_CASES = [(name, opts) for name, cls in POLICIES.items() for opts in cls.example_options]


def system_for(policy: str, paper_system):
    """The paper's A100 machine, or the machine shape the policy needs (two GPUs, a near-memory DIMM tier)."""
    needs = POLICIES[policy].example_system
    return load_system(needs) if needs else paper_system


def test_every_registered_policy_is_covered_here_and_labelled():
    """The registry is the one list of policies: a new one is in these plan tests through its example options,
    and names how reports show it."""
    assert {name for name, _ in POLICY_CASES} == set(POLICIES)
    assert all(cls.example_options for cls in POLICIES.values())
    for cls in POLICIES.values():
        assert cls.label and cls.color.startswith("#") and len(cls.color) == 7, cls.name
    assert len({cls.color for cls in POLICIES.values()}) == len(POLICIES)  # distinguishable in every plot


def build(model, system, policy, opts, batch=10, prompt=7, gen=5, routing="zipf:1.0", seed=0, lens=None):
    if lens is None:
        wl, tr, _ = resolve_routing(model, batch, prompt, gen, None, routing, seed)
    else:
        from traces import SynthConfig, generate_trace
        p, g = lens
        tr = generate_trace(SynthConfig(model.name, model.num_moe_layers, model.num_experts, model.top_k,
                                        routing, 0.0, seed), p, g)
        wl = Workload(np.asarray(p, dtype=np.int64), np.asarray(g, dtype=np.int64))
    return make_policy(policy, opts).build(PlanContext(model, system, wl, tr)), tr


@pytest.mark.parametrize("policy, opts", POLICY_CASES)
@pytest.mark.parametrize("which", ["tiny_model", "tiny_mla_model"])
def test_every_assignment_is_computed_exactly_once(request, paper_system, policy, opts, which):
    model = request.getfixturevalue(which)
    lens = (np.array([3, 9, 5, 7, 4, 6, 8, 2, 5, 6]), np.array([5, 1, 4, 5, 2, 5, 3, 5, 5, 4]))
    plan, tr = build(model, system_for(policy, paper_system), policy, opts, lens=lens)
    plan.validate()
    verify_assignments(plan, tr)  # per scope: each token's k assignments once, at every step the plan runs
    L, E = model.num_moe_layers, model.num_experts
    got = np.zeros((L, E), dtype=np.int64)
    per_visit: dict[tuple, int] = {}
    tokens_in: dict[tuple, int] = {}
    for op in plan.ops:
        if op.kind is OpKind.EXPERT:
            for member in member_ops(op):  # a grouped op's experts, each with its tokens
                got[model.moe_index(op.layer), member.expert] += member.tokens
            key = (op.phase, op.step, op.layer, op.micro_batch)
            per_visit[key] = per_visit.get(key, 0) + op.tokens
        elif op.kind is OpKind.ROUTER:  # the real tokens it routes; its op counts FlexGen's padded positions too
            requests = plan.scope_of(op)[0]
            routed = scope_rows(plan, tr, op.phase, op.step, requests).size
            padded = policy == "flexgen" and op.phase is Phase.PREFILL
            assert op.tokens == (requests.size * int(lens[0].max()) if padded else routed)
            tokens_in[(op.phase, op.step, op.layer, op.micro_batch)] = routed
    np.testing.assert_array_equal(got, tr.expert_counts(np.arange(tr.num_tokens)))
    visits = {k[:3] for k in tokens_in}
    assert {k[:3] for k in per_visit} == visits
    for v in visits:  # per (phase, step, layer): every routed token's k assignments, once
        assert sum(t for k, t in per_visit.items() if k[:3] == v) == model.top_k * sum(
            t for k, t in tokens_in.items() if k[:3] == v)
    # An expert runs at most once per (step, layer, micro-batch, shard of its tokens), on one device.
    seen = [(op.phase, op.step, op.layer, op.micro_batch, m.expert, plan.scope_of(op)[1:]) for op in plan.ops
            if op.kind is OpKind.EXPERT for m in member_ops(op)]
    assert len(seen) == len(set(seen))
    # Every generated token: one LM head row per request per step.
    lm = sum(op.tokens for op in plan.ops if op.kind is OpKind.LM_HEAD)
    assert lm == plan.workload.generated_tokens


@pytest.mark.parametrize("policy, opts", POLICY_CASES)
def test_engine_respects_streams_deps_and_capacity(tiny_model, paper_system, policy, opts):
    system = system_for(policy, paper_system)
    plan, _ = build(tiny_model, system, policy, opts)
    rec = run_plan(plan, RooflineCostModel(system))
    assert (rec.end_ns >= rec.start_ns).all()
    for op in plan.ops:
        for d in op.deps:
            assert rec.start_ns[op.id] >= rec.end_ns[d]
    topo = topology_of(system)
    assert {op.stream for op in plan.ops} <= set(topo.streams)
    for stream in topo.streams:
        ids = [op.id for op in plan.ops if op.stream == stream]
        starts, ends = rec.start_ns[ids], rec.end_ns[ids]
        assert (starts[1:] >= ends[:-1]).all(), f"{stream} ran two ops at once"
    for pool, capacity in topo.pools.items():
        assert rec.peak_bytes[pool] <= capacity
    busy = sum(rec.busy_ns.values())
    assert busy == int((rec.end_ns - rec.start_ns).sum())


def test_roofline_times_are_exact_on_a_hand_built_plan(tiny_model, paper_system):
    b = PlanBuilder()
    gemm = b.add(OpKind.EXPERT, Stream.GPU, Phase.DECODE, 1, 0, tokens=4, flops=10**12, nbytes=10**6)
    copy = b.add(OpKind.COPY, Stream.H2D, Phase.DECODE, 1, 0, nbytes=2 * 10**9)
    cpu = b.add(OpKind.EXPERT, Stream.CPU, Phase.DECODE, 1, 0, tokens=4, flops=10**9, nbytes=10**10,
                deps=(gemm, copy))
    wl = Workload.uniform(4, 1, 2)  # four requests: the expert ops' four decode tokens
    plan = Plan("hand", {}, tiny_model, paper_system, wl, b.ops, {"gpu": {}, "cpu": {}})
    rec = run_plan(plan, RooflineCostModel(paper_system))
    g, c, link = paper_system.gpu, paper_system.cpu, paper_system.link
    t_gemm = int(np.ceil((1e12 / (g.bf16_flops_per_s * g.gemm_efficiency) + g.kernel_launch_s) * 1e9))
    t_copy = int(np.ceil((2e9 / (link.h2d_bytes_per_s * link.h2d_efficiency) + link.latency_s) * 1e9))
    t_cpu = int(np.ceil((1e10 / (c.dram_bytes_per_s * c.dram_efficiency) + c.op_overhead_s) * 1e9))
    assert rec.start_ns.tolist() == [0, 0, max(t_gemm, t_copy)]
    assert rec.end_ns.tolist() == [t_gemm, t_copy, max(t_gemm, t_copy) + t_cpu]
    assert RooflineCostModel(paper_system).bound(b.ops[cpu]) == "memory"
    assert RooflineCostModel(paper_system).bound(b.ops[gemm]) == "compute"


def test_plan_validate_rejects_forward_dependencies(tiny_model, paper_system):
    b = PlanBuilder()
    b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, deps=(1,))
    b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0)
    plan = Plan("bad", {}, tiny_model, paper_system, Workload.uniform(1, 1, 2), b.ops, {"gpu": {}, "cpu": {}})
    with pytest.raises(ValueError, match="not an earlier op"):
        plan.validate()


def test_dynamic_allocation_beyond_capacity_fails_clearly(tiny_model, paper_system):
    b = PlanBuilder()
    b.add(OpKind.EXPERT, Stream.GPU, Phase.DECODE, 1, 0, flops=1, alloc=(("gpu", 50 * 2**30),),
          free=(("gpu", 50 * 2**30),))
    b.add(OpKind.EXPERT, Stream.GPU, Phase.DECODE, 1, 0, flops=1, alloc=(("gpu", 30 * 2**30),))
    b.add(OpKind.EXPERT, Stream.GPU, Phase.DECODE, 1, 0, flops=1, alloc=(("gpu", 60 * 2**30),))
    plan = Plan("alloc", {}, tiny_model, paper_system, Workload.uniform(1, 1, 2), b.ops, {"gpu": {}, "cpu": {}})
    with pytest.raises(CapacityError, match=r"GPU memory exceeded: needs 90\.00 GiB .* 79\.00 GiB available"):
        run_plan(plan, RooflineCostModel(paper_system))


def test_gpu_only_refuses_a_model_that_does_not_fit(mixtral, paper_system):
    with pytest.raises(CapacityError, match="gpu-only") as info:
        simulate(mixtral, paper_system, "gpu-only", batch=8, prompt_len=16, gen_len=4)
    assert info.value.needed_bytes > info.value.available_bytes == paper_system.gpu_usable_bytes
    assert "weights 87.0 GiB" in str(info.value)


def test_stream_experts_refuses_too_little_dram(mixtral, paper_system):
    small = dataclasses.replace(paper_system, dram_bytes=64 * 2**30, dram_reserved_bytes=2**30)
    with pytest.raises(CapacityError, match="DRAM"):
        simulate(mixtral, small, "stream-experts", batch=8, prompt_len=16, gen_len=4)


def test_auto_attention_moves_kv_to_the_cpu_when_it_does_not_fit(mixtral, paper_system):
    gpu24 = dataclasses.replace(paper_system, gpu=dataclasses.replace(paper_system.gpu, hbm_bytes=24 * 2**30))
    small = simulate(mixtral, gpu24, "stream-experts", batch=8, prompt_len=800, gen_len=2)
    big = simulate(mixtral, gpu24, "stream-experts", batch=256, prompt_len=800, gen_len=2)
    assert small.knobs["attention"] == "gpu" and big.knobs["attention"] == "cpu"
    assert big.busy_s["cpu"] > 0 and "kv_cache" in big.static_memory["cpu"]


def test_same_inputs_same_result_except_wall_time(tiny_model, paper_system):
    a = simulate(tiny_model, paper_system, "stream-experts", batch=12, prompt_len=9, gen_len=6, routing="zipf:1.1",
                 seed=5).to_dict()
    b = simulate(tiny_model, paper_system, "stream-experts", batch=12, prompt_len=9, gen_len=6, routing="zipf:1.1",
                 seed=5).to_dict()
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b
    c = simulate(tiny_model, paper_system, "stream-experts", batch=12, prompt_len=9, gen_len=6, routing="zipf:1.1",
                 seed=6).to_dict()
    c.pop("wall_s")
    assert c != a


def test_metrics_are_consistent(tiny_model, paper_system):
    r = simulate(tiny_model, paper_system, "gpu-only", batch=6, prompt_len=10, gen_len=4, keep_plan=True)
    assert r.total_s == pytest.approx(r.prefill_s + r.decode_s)
    assert r.throughput_tok_s == pytest.approx(6 * 4 / r.total_s)
    assert r.busy_fraction["gpu"] == pytest.approx(1.0)  # gpu-only keeps one stream busy all the time
    assert r.peak_gpu_bytes == r.plan.static_bytes("gpu")


def test_sampled_decode_never_makes_a_stream_busier_than_the_run(mixtral):
    """With --decode-sample, decode ops that start while prefill still runs count once (inside prefill's wall
    time); only busy time after prefill is scaled with the decode window. Unsampled, nothing changes."""
    kw = dict(batch=24, prompt_len=32, gen_len=20, policy_options={"attention": "cpu", "decode_micro_batch": "4",
                                                                  "prefill_tokens": "16"})
    system = load_system("rtx6000ada-8452y")
    sampled = simulate(mixtral, system, "stream-experts", decode_sample=4, keep_plan=True, **kw)
    prefill_ns = round(sampled.prefill_s * 1e9)
    overlapping = [i for i, op in enumerate(sampled.plan.ops)
                   if op.phase is Phase.DECODE and sampled.record.start_ns[i] < prefill_ns]
    assert overlapping  # the case: decode work inside the prefill window
    assert max(sampled.busy_fraction.values()) <= 1.0
    full = simulate(mixtral, system, "stream-experts", **kw)
    assert max(full.busy_fraction.values()) <= 1.0
    assert sampled.busy_fraction["h2d"] == pytest.approx(full.busy_fraction["h2d"], rel=0.02)


def test_whole_batch_is_faster_per_token_than_tiny_micro_batches(mixtral, paper_system):
    whole = simulate(mixtral, paper_system, "stream-experts", batch=64, prompt_len=32, gen_len=8,
                     policy_options={"attention": "gpu"})
    micro = simulate(mixtral, paper_system, "stream-experts", batch=64, prompt_len=32, gen_len=8,
                     policy_options={"attention": "gpu", "decode_micro_batch": "4"})
    assert whole.decode_s <= micro.decode_s


def test_routed_fetch_moves_fewer_bytes_when_routing_is_sparse(mixtral, paper_system):
    kw = dict(batch=1, prompt_len=4, gen_len=6, policy_options={"attention": "gpu", "fetch": "routed"})
    routed = simulate(mixtral, paper_system, "stream-experts", **kw)
    kw["policy_options"] = {"attention": "gpu", "fetch": "all"}
    every = simulate(mixtral, paper_system, "stream-experts", **kw)
    assert routed.busy_s["h2d"] < every.busy_s["h2d"]


def test_trace_must_match_the_model(tiny_model, mixtral, paper_system):
    _, tr, _ = resolve_routing(tiny_model, 4, 5, 3, None, "uniform", 0)
    with pytest.raises(SimInputError, match="trace is for"):
        simulate(mixtral, paper_system, trace=tr)
    with pytest.raises(SimInputError, match="conflicts"):
        simulate(tiny_model, paper_system, trace=tr, prompt_len=6)
    r = simulate(tiny_model, paper_system, trace=tr)
    assert r.workload["batch"] == 4 and r.generated_tokens == 12


def test_simulate_plan_reports_phases(tiny_model):
    system = load_system("rtx6000ada-8452y")
    plan, _ = build(tiny_model, system, "stream-experts", {"attention": "cpu"})
    rec, metrics = simulate_plan(plan)
    assert 0 < metrics["prefill_s"] < metrics["total_s"]
    assert metrics["busy_fraction"]["cpu"] > 0 and metrics["busy_fraction"]["d2h"] > 0


@pytest.mark.parametrize("opt, message", [({"attention": "tpu"}, "attention"), ({"fetch": "some"}, "fetch"),
                                          ({"bogus": "1"}, "unknown option"), ({"prefill_tokens": "x"}, "valid int"),
                                          ({"prefill_tokens": "0"}, ">= 1")])
def test_bad_policy_options(opt, message):
    with pytest.raises(SimInputError, match=message):
        make_policy("stream-experts", opt)


def test_unknown_policy():
    with pytest.raises(SimInputError, match="unknown policy"):
        make_policy("flexgen-ish")


def test_plan_parquet_round_trip_simulates_identically(tmp_path, tiny_mla_model, paper_system):
    from sim.plan_io import load_plan, save_plan

    plan, _ = build(tiny_mla_model, paper_system, "stream-experts", {"attention": "cpu", "decode_micro_batch": "3"})
    path = save_plan(plan, tmp_path / "plan.parquet")
    back = load_plan(path)
    assert back.ops == plan.ops
    assert (back.policy, back.knobs, back.model, back.system) == (plan.policy, plan.knobs, plan.model, plan.system)
    assert back.static_memory == plan.static_memory
    np.testing.assert_array_equal(back.workload.prompt_lens, plan.workload.prompt_lens)
    for a, b in zip(back.micro_batches["decode"], plan.micro_batches["decode"], strict=True):
        np.testing.assert_array_equal(a, b)
    r1, m1 = simulate_plan(plan)
    r2, m2 = simulate_plan(back)
    assert m1 == m2 and (r1.end_ns == r2.end_ns).all()


def test_plan_files_that_are_not_plans(tmp_path):
    from sim.plan_io import load_plan

    with pytest.raises(SimInputError, match="not found"):
        load_plan(tmp_path / "none.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 not really")
    with pytest.raises(SimInputError, match="not a readable Parquet plan"):
        load_plan(junk)
    import pandas as pd

    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(SimInputError, match="not a cox-moe plan"):
        load_plan(tmp_path / "other.parquet")


def test_memoised_op_work_equals_the_computation(tiny_model):
    """OpWork keeps each kind's work per arguments; a hit is what the method computes, arguments apart."""
    from sim.cost.work import OpWork

    w = OpWork(tiny_model)
    for name in OpWork._MEMOISED:
        args = (5, 40, 40) if name == "attention" else (5,)
        other = (6, 48, 48) if name == "attention" else (6,)
        first = getattr(w, name)(*args)
        assert first == getattr(OpWork, name)(w, *args)  # the class's method: computed afresh
        assert getattr(w, name)(*args) is first  # kept
        assert getattr(w, name)(*other) == getattr(OpWork, name)(w, *other)


@pytest.mark.parametrize("policy, opts", POLICY_CASES)
def test_every_policy_s_sampled_plan_generates_its_workload_s_tokens(tmp_path, tiny_model, paper_system, policy,
                                                                      opts):
    """What plan files are checked for when read (`Plan.check_tokens_generated`) holds for every policy's own
    plans: requests finishing at different steps, and a sample of decode steps scaled to them."""
    from sim.plan_io import load_plan, save_plan

    r = simulate(tiny_model, system_for(policy, paper_system), policy, batch=6, prompt_len="uniform:3:9",
                 gen_len="uniform:2:9", decode_sample=3, policy_options=opts, keep_plan=True)
    r.plan.check_tokens_generated()
    assert load_plan(save_plan(r.plan, tmp_path / "p.parquet")).decode_scale == r.plan.decode_scale
