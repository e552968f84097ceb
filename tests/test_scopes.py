"""Explicit scopes: one expert's tokens split between CPU and GPU, and experts batched over several attention
micro-batches. The check proves every assignment is computed once; the executor computes exactly the scoped
tokens; plan files keep the scopes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from executor.interpret import PlanInterpreter
from executor.reference import reference_forward
from executor.run import execute_plan
from executor.weights import random_weights
from sim.cost import RooflineCostModel
from sim.engine import run_plan
from sim.errors import SimInputError
from sim.plan import Op, OpKind, Phase, Plan, Scope, Stream, shard_bounds, ungroup
from sim.plan_io import load_plan, save_plan
from sim.plan_verify import verify_assignments
from sim.policies import PlanContext, make_policy
from sim.specs import ModelSpec
from sim.workload import Workload
from traces import SynthConfig, generate_trace

SPEC = ModelSpec(name="tiny", num_layers=2, hidden_size=64, vocab_size=97, num_attention_heads=4, num_kv_heads=2,
                 head_dim=16, num_experts=4, top_k=2, expert_intermediate_size=48)


@pytest.fixture
def case(paper_system):
    prompts, gens = np.array([5, 3, 7, 4]), np.array([3, 2, 3, 3])
    trace = generate_trace(SynthConfig("tiny", 2, 4, 2, "zipf:1.0", 0.0, 1), prompts, gens)
    workload = Workload(prompts, gens)
    plan = make_policy("gpu-only", {"prefill_tokens": "9", "decode_micro_batch": "2"}).build(
        PlanContext(SPEC, paper_system, workload, trace))
    return ungroup(plan), trace, workload  # one op per expert: these tests split and re-scope single experts


def rewrite(plan: Plan, replace: dict[int, list[Op]], scopes: list[Scope], alias: dict[int, int] | None = None) -> Plan:
    """A copy of `plan` with op i replaced by the ops in `replace[i]` (an empty list drops it); ids are renumbered
    and every dependency on a replaced op points at all of its replacements (on a dropped op i, at those of
    `alias[i]`, an op merged from it)."""
    alias = alias or {}
    new_ids: dict[int, tuple[int, ...]] = {}
    ops: list[Op] = []
    for op in plan.ops:
        parts = replace.get(op.id, [op])
        new_ids[op.id] = tuple(range(len(ops), len(ops) + len(parts)))
        for part in parts:
            deps = tuple(sorted({n for d in part.deps for n in new_ids[alias.get(d, d)]}))
            ops.append(dataclasses.replace(part, id=len(ops), deps=deps))
    return dataclasses.replace(plan, ops=ops, scopes=list(plan.scopes) + scopes)


def expert_ops(plan: Plan, phase: Phase, min_tokens: int = 2) -> list[Op]:
    """Expert ops with tokens to split that a later op depends on (splitting one moves that dependency onto both
    shards; a shard moved to another stream with nothing waiting for it would be a broken plan)."""
    awaited = {d for op in plan.ops for d in op.deps}
    return [op for op in plan.ops if op.kind is OpKind.EXPERT and op.phase is phase and op.tokens >= min_tokens
            and op.id in awaited]


def split(plan: Plan, op: Op, streams=(Stream.GPU, Stream.CPU)) -> Plan:
    """Expert op `op`'s tokens split in len(streams) shards, one per stream."""
    requests = plan.micro_batches[str(op.phase)][op.micro_batch]
    n = len(streams)
    first = len(plan.scopes)
    scopes = [Scope(op.phase, op.step, requests, i, n) for i in range(n)]
    sizes = [a.size for a in np.array_split(np.arange(op.tokens), n)]
    parts = [dataclasses.replace(op, stream=s, tokens=t, scope=first + i)
             for i, (s, t) in enumerate(zip(streams, sizes, strict=True))]
    return rewrite(plan, {op.id: parts}, scopes)


def test_a_split_expert_is_verified_executed_and_saved(case, tmp_path):
    plan, trace, workload = case
    out = plan
    for phase in (Phase.PREFILL, Phase.DECODE):  # one prefill and one decode expert, each split GPU / CPU
        op = next(o for o in expert_ops(out, phase) if o.scope < 0)
        out = split(out, op)
    out.check()
    verify_assignments(plan, trace)
    verify_assignments(out, trace)
    assert sum(1 for op in out.ops if op.scope >= 0) == 4
    record = run_plan(out, RooflineCostModel(out.system))
    assert (record.end_ns >= record.start_ns).all()
    weights = random_weights(SPEC, seed=3)
    want = reference_forward(weights, trace, workload)
    got = PlanInterpreter(out, weights, trace).run()
    assert got.keys() == want.keys()
    worst = max(float((got[k].float() - want[k].float()).norm() / want[k].float().norm()) for k in want)
    assert worst < 2e-2
    for _ in range(3):  # the threaded executor: the CPU shard on its own thread, its consumer waiting for it
        ran = execute_plan(out, weights, trace, use_cuda=False).outputs
        worst = max(float((ran[k].float() - want[k].float()).norm() / want[k].float().norm()) for k in want)
        assert worst < 2e-2
    dangling = rewrite(out, {}, [])
    cpu_shard = [op for op in dangling.ops if op.stream == Stream.CPU][-1]  # the last op on the CPU stream
    assert cpu_shard.scope >= 0
    for op in dangling.ops:  # drop every dependency on it: nothing waits for it any more
        if cpu_shard.id in op.deps:
            op.deps = tuple(d for d in op.deps if d != cpu_shard.id)
    with pytest.raises(SimInputError, match="nothing waits for its output"):
        verify_assignments(dangling, trace)
    path = save_plan(out, tmp_path / "split.parquet")
    back = load_plan(path)
    assert back.scopes == out.scopes and [op.scope for op in back.ops] == [op.scope for op in out.ops]
    numpy_ints = dataclasses.replace(out, scopes=[Scope(sc.phase, np.int64(sc.step), list(sc.requests),
                                                        np.int64(sc.shard), np.int64(sc.shards))
                                                  for sc in out.scopes])
    assert load_plan(save_plan(numpy_ints, tmp_path / "np.parquet")).scopes == out.scopes


def test_experts_batched_over_two_attention_micro_batches(case, paper_system):
    """Module batching: one expert op per (layer, expert) over both decode micro-batches' tokens, on a
    layer-major schedule (every micro-batch's router of a layer before its experts)."""
    _, trace, workload = case
    plan = make_policy("coxmoe", {"coalesce": "off", "decode_micro_batch": "2", "prefill_micro_batch": "2",
                                  "decode_placement": "ggg", "prefill_placement": "ggg", "split": "gpu"}).build(
        PlanContext(SPEC, paper_system, workload, trace))
    plan = ungroup(plan)  # one op per (micro-batch, expert) to merge
    step, layer = 1, 0
    group = {(op.micro_batch, op.expert): op for op in plan.ops if op.kind is OpKind.EXPERT
             and op.phase is Phase.DECODE and op.step == step and op.layer == layer}
    merged_scope = len(plan.scopes)
    both = np.concatenate(plan.micro_batches["decode"][:2])
    replace, alias = {}, {}
    for e in range(SPEC.num_experts):
        a, b = group.get((0, e)), group.get((1, e))
        if a is None or b is None:
            continue
        merged = dataclasses.replace(b, tokens=a.tokens + b.tokens, deps=a.deps + b.deps, scope=merged_scope,
                                     micro_batch=-1)
        replace[a.id], replace[b.id], alias[a.id] = [], [merged], b.id
    assert replace, "the routing should send tokens of both micro-batches to some expert"
    out = rewrite(plan, replace, [Scope(Phase.DECODE, step, both)], alias)
    out.check()
    verify_assignments(out, trace)
    weights = random_weights(SPEC, seed=3)
    got = PlanInterpreter(out, weights, trace).run()
    want = reference_forward(weights, trace, workload)
    worst = max(float((got[k].float() - want[k].float()).norm() / want[k].float().norm()) for k in want)
    assert worst < 2e-2


def test_verify_names_a_missing_a_doubled_and_a_miscounted_shard(case):
    plan, trace, _ = case
    op = expert_ops(plan, Phase.DECODE)[0]
    out = split(plan, op)
    shards = [o for o in out.ops if o.scope >= 0]
    missing = rewrite(out, {shards[1].id: []}, [])
    with pytest.raises(SimInputError, match="never computed"):
        verify_assignments(missing, trace)
    doubled = rewrite(out, {shards[1].id: [shards[1], dataclasses.replace(shards[1], scope=shards[0].scope,
                                                                          tokens=shards[0].tokens)]}, [])
    with pytest.raises(SimInputError, match="computed 2 times"):
        verify_assignments(doubled, trace)
    miscounted = rewrite(out, {shards[0].id: [dataclasses.replace(shards[0], tokens=shards[0].tokens + 1)]}, [])
    with pytest.raises(SimInputError, match="says .* tokens; its scope routes"):
        verify_assignments(miscounted, trace)


def test_the_cheap_check_refuses_bad_scopes(case):
    plan, _, _ = case
    op = expert_ops(plan, Phase.DECODE)[0]
    out = split(plan, op)
    shard = next(o for o in out.ops if o.scope >= 0)
    router = next(o for o in out.ops if o.kind is OpKind.ROUTER and (o.phase, o.step, o.layer, o.micro_batch) == (
        shard.phase, shard.step, shard.layer, shard.micro_batch))
    bad = {
        "scope 99 does not exist": rewrite(out, {shard.id: [dataclasses.replace(shard, scope=99)]}, []),
        r"only expert ops \(and copies of their tokens\) work on a shard": rewrite(
            out, {router.id: [dataclasses.replace(router, scope=shard.scope)]}, []),
        "its scope .* at decode step": rewrite(
            out, {shard.id: [dataclasses.replace(shard, step=shard.step + 1)]}, []),
        "distinct request ids": dataclasses.replace(out, scopes=[
            dataclasses.replace(sc, requests=np.array([0, 0])) for sc in out.scopes]),
        "is not a shard of a step": dataclasses.replace(out, scopes=[
            dataclasses.replace(sc, shard=sc.shards) for sc in out.scopes]),
    }
    bad["scope -7 does not exist"] = rewrite(out, {shard.id: [dataclasses.replace(shard, scope=-7)]}, [])
    bad["shard 0 of 5000"] = dataclasses.replace(out, scopes=[
        dataclasses.replace(sc, shards=5000) for sc in out.scopes])
    for message, broken in bad.items():
        with pytest.raises(SimInputError, match=message):
            broken.check()
    assert shard.step + 1 <= int(out.workload.gen_lens.max()) - 1  # the moved shard sits at a real step


def test_a_profile_prices_prefill_by_the_scopes_requests(case, tmp_path):
    """Prefill ops' per-request overheads and attention look-ups count the scope's requests, not tokens over the
    workload's mean prompt length (the two differ when prompts vary)."""
    import json

    import pandas as pd

    from sim.cost.profile import PROFILE_VERSION, ProfileCostModel, model_signature

    plan, _, workload = case
    prof = tmp_path / "prof"
    prof.mkdir()
    (prof / "profile.json").write_text(json.dumps({"version": PROFILE_VERSION, "model": SPEC.name,
                                                   "model_signature": model_signature(SPEC)}))
    pd.DataFrame([{"device": "cpu", "kind": "overhead_qkv", "tokens": 1, "kv": 0, "median_s": 1e-3}]).to_csv(
        prof / "timings.csv", index=False)
    cpu_qkv = next(dataclasses.replace(op, stream=Stream.CPU) for op in plan.ops
                   if op.kind is OpKind.QKV and op.phase is Phase.PREFILL and op.micro_batch == 0)
    guess = ProfileCostModel(plan.system, prof, SPEC, float(workload.prompt_lens.mean()))
    exact = ProfileCostModel(plan.system, prof, SPEC, float(workload.prompt_lens.mean()))
    exact.prepare(plan)
    requests = plan.micro_batches["prefill"][0].size
    base = RooflineCostModel(plan.system).op_time_ns(cpu_qkv)
    assert exact.op_time_ns(cpu_qkv) == base + int(np.ceil(requests * 1e-3 * 1e9))
    assert guess.op_time_ns(cpu_qkv) != exact.op_time_ns(cpu_qkv)  # prompts 5, 3: 8 tokens / mean 4.75


def test_per_request_overheads_are_priced_on_the_ops_own_device(case, tmp_path):
    """A profile's `overhead_<kind>` rows count per request on the device that measured them: a GPU op takes the
    cuda rows, a CPU op the cpu rows, and a device without rows adds nothing."""
    import json

    import pandas as pd

    from sim.cost.profile import PROFILE_VERSION, ProfileCostModel, model_signature

    plan, _, workload = case
    prof = tmp_path / "prof"
    prof.mkdir()
    (prof / "profile.json").write_text(json.dumps({"version": PROFILE_VERSION, "model": SPEC.name,
                                                   "model_signature": model_signature(SPEC)}))
    rows = [{"device": "cpu", "kind": "overhead_qkv", "tokens": 1, "kv": 0, "median_s": 1e-3},
            {"device": "cuda", "kind": "overhead_qkv", "tokens": 1, "kv": 0, "median_s": 5e-3}]
    pd.DataFrame(rows).to_csv(prof / "timings.csv", index=False)
    qkv = next(op for op in plan.ops if op.kind is OpKind.QKV and op.phase is Phase.PREFILL and op.micro_batch == 0)
    on = {s: dataclasses.replace(qkv, stream=s) for s in (Stream.GPU, Stream.CPU)}
    cost = ProfileCostModel(plan.system, prof, SPEC, float(workload.prompt_lens.mean()))
    cost.prepare(plan)
    requests = plan.micro_batches["prefill"][0].size
    roof = RooflineCostModel(plan.system)
    for stream, per_request in ((Stream.GPU, 5e-3), (Stream.CPU, 1e-3)):
        assert cost.op_time_ns(on[stream]) == roof.op_time_ns(on[stream]) + int(np.ceil(requests * per_request * 1e9))
    pd.DataFrame(rows[:1]).to_csv(prof / "timings.csv", index=False)
    cpu_only = ProfileCostModel(plan.system, prof, SPEC, float(workload.prompt_lens.mean()))
    cpu_only.prepare(plan)
    assert cpu_only.op_time_ns(on[Stream.GPU]) == roof.op_time_ns(on[Stream.GPU])


def test_the_gpu_overhead_probe_runs_a_gpu_only_plan():
    """The GPU's per-request overhead rows come from a gpu-only plan (run here on the CPU, labelled cuda): one
    non-negative row per op kind it runs."""
    from executor.profile import _overhead_rows

    rows = _overhead_rows("cpu", gpu_plan=True)
    kinds = {r["kind"] for r in rows}
    assert {"overhead_qkv", "overhead_o_proj", "overhead_lm_head"} <= kinds
    assert all(r["device"] == "cuda" and r["median_s"] >= 0 for r in rows)


def test_shard_bounds_are_np_array_splits_parts():
    """One definition of a shard's tokens serves the policies (sizes), the verifier and the executor (bounds)."""
    for n in range(0, 23):
        for shards in range(1, 9):
            parts = np.array_split(np.arange(n), shards)
            for shard in range(shards):
                lo, hi = shard_bounds(n, shard, shards)
                assert list(range(lo, hi)) == parts[shard].tolist(), (n, shard, shards)
