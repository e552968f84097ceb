"""Decode-step replay (issue 13, sim/policies/step_replay.py): a plan built by replaying decode steps from templates
is the plan built op by op, for every policy whose steps the layout emitter makes, on every kind of layout the
replay accepts or refuses; replays do happen; and a plan crossing the op limit inside a replayed step is refused
with the same words."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest

import sim.plan as plan_module
import sim.policies.compose as compose
from sim.errors import SimInputError
from sim.plan import Op, Phase, Plan
from sim.policies import POLICIES, PlanContext, make_policy
from sim.policies import step_replay as step_replay_module
from sim.policies.layers import decode_slices, prefill_slices
from sim.specs import load_model, load_system
from sim.workload import Workload
from traces import SynthConfig, generate_trace
from traces.limits import ResourceLimitError

LAYOUT_POLICIES = ("coxmoe", "trimoe", "moe-gen", "stream-experts", "gpu-only", "cpu-only")
EXTRA_COXMOE = ({"restratify": "ema:0.5:3", "resident_experts": "3", "decode_micro_batch": "8"},
                {"attention_split": "0.5", "decode_micro_batch": "4"},
                {"kv_cache": "cpu", "decode_placement": "ggg"},
                {"coalesce": "decode", "decode_micro_batch": "4"},
                {"split": "gpu", "resident_experts": "0"})


def context(model: str, system: str, routing: str, batch: int = 24, seed: int = 3, gen: int = 0) -> PlanContext:
    """A small workload whose requests finish at different steps (slices shrink, so step shapes change; half
    run to the end, so later steps repeat their shape), or all generate `gen` tokens."""
    rng = np.random.default_rng(seed)
    prompts, gens = rng.integers(4, 40, batch), rng.integers(2, 14, batch)
    gens[:batch // 2] = 13
    if gen:
        gens[:] = gen
    m = load_model(model)
    trace = generate_trace(SynthConfig(m.name, m.num_moe_layers, m.num_experts, m.top_k, routing, 0.0, seed),
                           prompts, gens)
    return PlanContext(m, load_system(system), Workload(prompts, gens), trace)


def build(policy: str, options: dict, ctx: PlanContext, replay: bool, monkeypatch) -> Plan:
    monkeypatch.setenv(compose.REPLAY_ENV, "on" if replay else "off")
    return make_policy(policy, options).build(ctx)


def assert_same_plan(a: Plan, b: Plan) -> None:
    assert len(a.ops) == len(b.ops)
    for x, y in zip(a.ops, b.ops, strict=True):
        assert x == y, (x, y)
    assert a.scopes == b.scopes and a.knobs == b.knobs and a.static_memory == b.static_memory
    assert a.decode_scale == b.decode_scale and a.expert_kernels == b.expert_kernels
    assert {k: [g.tolist() for g in v] for k, v in a.micro_batches.items()} == {
        k: [g.tolist() for g in v] for k, v in b.micro_batches.items()}


FIXED = {"decode_micro_batch": "32", "prefill_micro_batch": "8", "resident_experts": "2", "prefill_placement": "ggg",
         "decode_placement": "gcg", "split": "auto"}  # no search
CASES = [(policy, dict(options)) for policy in LAYOUT_POLICIES for options in POLICIES[policy].example_options]
CASES += [("coxmoe", options) for options in EXTRA_COXMOE]
CASES = [(p, {"rescore": "1", **o} if p in ("coxmoe", "trimoe", "moe-gen") else o) for p, o in CASES]  # short searches


# every case on Mixtral; on models with shared experts, dense layers and 64 or 128 experts, one case per policy
MATRIX = [("mixtral-8x7b", "uniform", p, o) for p, o in CASES]
OTHER_MODELS = (("deepseek-v2-lite", "zipf:1.2"), ("qwen3-30b-a3b", "zipf:0.8"))
MATRIX += [(model, routing, p, o) for model, routing in OTHER_MODELS for p, o in dict(CASES).items()]


@pytest.mark.parametrize(("model", "routing", "policy", "options"), MATRIX,
                         ids=[f"{m}-{p}-{i}" for i, (m, _, p, _) in enumerate(MATRIX)])
def test_replayed_plan_is_the_plan_built_op_by_op(model, routing, policy, options, monkeypatch):
    system = getattr(POLICIES[policy], "example_system", None) or "a100-80g-8452y"
    ctx = context(model, system, routing)
    try:
        reference = build(policy, options, ctx, False, monkeypatch)
    except SimInputError as exc:  # a knob set this model or machine cannot hold: refused alike with replay
        with pytest.raises(SimInputError) as again:
            build(policy, options, ctx, True, monkeypatch)
        assert str(again.value) == str(exc)
        return
    assert_same_plan(build(policy, options, ctx, True, monkeypatch), reference)


def counting_replays(monkeypatch) -> dict[str, int]:
    seen = {"replayed": 0, "templates": 0, "refused": 0}
    replay, finish = step_replay_module.replay, step_replay_module.Recording.finish

    def counted_replay(*args, **kwargs):
        done = replay(*args, **kwargs)
        seen["replayed"] += done
        return done

    def counted_finish(self, *args, **kwargs):
        template = finish(self, *args, **kwargs)
        seen["templates" if template is not None else "refused"] += 1
        return template

    monkeypatch.setattr(step_replay_module, "replay", counted_replay)
    monkeypatch.setattr(step_replay_module.Recording, "finish", counted_finish)
    return seen


def test_steps_of_one_shape_are_replayed_and_streamed_kv_steps_are_not(monkeypatch):
    ctx = context("mixtral-8x7b", "a100-80g-8452y", "uniform", batch=64, gen=13)
    seen = counting_replays(monkeypatch)
    build("coxmoe", FIXED, ctx, True, monkeypatch)
    # 12 decode steps of every request: a template per shape (an expert idle in some layer at a step is another
    # shape), the rest replayed
    assert seen["replayed"] >= 9 and seen["replayed"] + seen["templates"] == 12 and seen["refused"] == 0
    seen = counting_replays(monkeypatch)  # coalesced experts over micro-batches of 4: the step's busy experts count
    build("moe-gen", {"coalesce": "on", "decode_micro_batch": "4", "attn_mode": "0", "rescore": "1"}, ctx, True,
          monkeypatch)
    assert seen["replayed"] >= 9 and seen["refused"] == 0
    seen = counting_replays(monkeypatch)  # a streamed KV cache: its buffers chain steps, so none is replayed
    build("moe-gen", {"attn_mode": "1", "decode_micro_batch": "16", "rescore": "1"}, ctx, True, monkeypatch)
    assert seen == {"replayed": 0, "templates": 0, "refused": 0}


def test_the_replay_setting_is_on_or_off_and_nothing_else(monkeypatch, capsys):
    from experiments.cli import main

    for value, on in (("", True), ("on", True), (" OFF ", False), ("off", False)):
        monkeypatch.setenv(compose.REPLAY_ENV, value)
        assert compose.replay_enabled() is on
    monkeypatch.setenv(compose.REPLAY_ENV, "of")
    code = main(["simulate", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--batch", "4", "--prompt-len",
                 "8", "--gen-len", "3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "COXMOE_STEP_REPLAY='of': use on or off" in err, err


def test_replay_copies_ops_by_the_field_order_op_has():
    assert tuple(f.name for f in fields(Op)) == step_replay_module._FIELDS
    assert [f for f in step_replay_module._FIELDS if f not in ("id", "phase", "step", "deps")] == list(
        step_replay_module._COPIED)


def test_steps_a_replay_cannot_reproduce_are_emitted_op_by_op():
    """Prefill, swap steps and layouts with split experts or a streamed KV cache get no replay key."""
    ctx = context("mixtral-8x7b", "a100-80g-8452y", "uniform", batch=8, gen=13)
    emit = compose.LayoutEmitter(ctx, ctx.builder(), kv_on_gpu=True)
    m = ctx.model
    plain = compose.Layout("ggg", compose.no_experts(m), compose.all_experts(m), compose.no_experts(m))
    decode = decode_slices(ctx, 1, [np.arange(8)])
    assert emit._replay_key(decode, Phase.DECODE, plain, None, None) is not None
    assert emit._replay_key(prefill_slices(ctx, [np.arange(8)]), Phase.PREFILL, plain, None, None) is None
    assert emit._replay_key(decode, Phase.DECODE, plain, compose.no_experts(m), None) is None
    assert emit._replay_key(decode, Phase.DECODE, plain, None, (0,) * m.num_moe_layers) is None
    split = replace(plain, splits=(((0, 1, 2),),) + ((),) * (m.num_moe_layers - 1))
    assert emit._replay_key(decode, Phase.DECODE, split, None, None) is None
    assert emit._replay_key(decode, Phase.DECODE, replace(plain, kv_streamed=True), None, None) is None
    emit.replay = False
    assert emit._replay_key(decode, Phase.DECODE, plain, None, None) is None


@pytest.mark.parametrize("spare", [0, 1, 7, 40])
def test_a_plan_crossing_the_op_limit_in_a_replayed_step_is_refused_alike(spare, monkeypatch):
    ctx = context("mixtral-8x7b", "a100-80g-8452y", "uniform", batch=16)
    options = {**FIXED, "decode_micro_batch": "8"}
    full = build("coxmoe", options, ctx, False, monkeypatch)
    per_step = sum(op.step == 5 for op in full.ops)
    limit = len(full.ops) - 3 * per_step + spare  # inside a late step, which replays
    monkeypatch.setattr(plan_module, "max_ops", lambda: limit)
    errors = []
    for replay in (False, True):
        with pytest.raises(ResourceLimitError) as exc:
            build("coxmoe", options, ctx, replay, monkeypatch)
        errors.append(str(exc.value))
    assert errors[0] == errors[1]
