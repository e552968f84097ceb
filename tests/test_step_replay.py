"""Decode-step replay (issue 13, sim/policies/step_replay.py): a plan built by replaying decode steps from templates
is the plan built op by op, for every policy whose steps the layout emitter makes, on every kind of layout the
replay accepts or refuses; replays do happen; and a plan crossing the op limit inside a replayed step is refused
with the same words."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sim.plan as plan_module
import sim.policies.compose as compose
from sim.errors import SimInputError
from sim.op_table import MemberStore
from sim.plan import Phase, Plan
from sim.policies import POLICIES, PlanContext, make_policy
from sim.policies import step_replay as step_replay_module
from sim.policies.layers import decode_slices, prefill_slices
from sim.specs import load_model, load_system
from sim.workload import Workload
from traces import SynthConfig, generate_trace
from traces.limits import MEMBER_OP_SHARE, ResourceLimitError

LAYOUT_POLICIES = ("coxmoe", "trimoe", "moe-gen", "stream-experts", "gpu-only", "cpu-only")
EXTRA_COXMOE = ({"restratify": "ema:0.5:3", "resident_experts": "3", "decode_micro_batch": "8"},
                {"attention_split": "0.5", "decode_micro_batch": "4"},
                {"kv_cache": "cpu", "decode_placement": "ggg"},
                {"coalesce": "decode", "decode_micro_batch": "4"},
                {"split": "gpu", "resident_experts": "0"})


def context(model: str, system: str, routing: str, batch: int = 64, seed: int = 3, gen: int = 0,
            experts: int = 0) -> PlanContext:
    """A small workload whose step shapes change a few times and repeat in between: three quarters of the requests
    generate 13 tokens, the rest 5 or 9 (or every request `gen`); `experts` > 0 narrows the model to that many
    experts (top-2), so that every expert receives tokens at every step and steps repeat their shape."""
    rng = np.random.default_rng(seed)
    prompts, gens = rng.integers(4, 40, batch), np.full(batch, 13)
    gens[rng.permutation(batch)[:batch // 4]] = rng.choice([5, 9], batch // 4)
    if gen:
        gens[:] = gen
    m = load_model(model)
    if experts:
        m = replace(m, num_experts=experts, top_k=2)
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


# every case on Mixtral; on DeepSeek-V2-Lite (shared experts, a dense first layer) and Qwen3-30B-A3B narrowed to 8
# experts, and on full Qwen3 (128 experts, some idle at a step: shapes rarely repeat), one case per policy
MATRIX = [("mixtral-8x7b", "uniform", 0, p, o) for p, o in CASES]
MATRIX += [(model, routing, experts, p, o)
           for model, routing, experts in (("deepseek-v2-lite", "zipf:1.2", 8), ("qwen3-30b-a3b", "zipf:0.8", 8),
                                           ("qwen3-30b-a3b", "zipf:0.8", 0))
           for p, o in dict(CASES).items()]


def why_never_replayed(model: str, experts: int, policy: str, options: dict) -> str | None:
    """Why a matrix case's decode steps are never replayed (None: some are): the replay key refuses a streamed KV
    cache; steps that never repeat a shape leave nothing to replay (each expert run of a few tokens, or Qwen3's 128
    experts, leaves different experts idle at each step)."""
    if options.get("kv_cache") == "cpu" or (policy == "moe-gen" and options.get("attn_mode") in ("1", "2")):
        return "streamed KV cache"
    if model == "qwen3-30b-a3b" and not experts:
        return "128 experts"
    per_micro_batch = policy in ("gpu-only", "stream-experts") or options.get("coalesce") == "off"
    if per_micro_batch and 0 < int(options.get("decode_micro_batch", "0")) <= 4:
        return "expert runs of a few tokens"
    return None


@pytest.mark.parametrize(("model", "routing", "experts", "policy", "options"), MATRIX,
                         ids=[f"{m}{e or ''}-{p}-{i}" for i, (m, _, e, p, _) in enumerate(MATRIX)])
def test_replayed_plan_is_the_plan_built_op_by_op(model, routing, experts, policy, options, monkeypatch):
    system = getattr(POLICIES[policy], "example_system", None) or "a100-80g-8452y"
    ctx = context(model, system, routing, experts=experts)
    try:
        reference = build(policy, options, ctx, False, monkeypatch)
    except SimInputError as exc:  # a knob set this model or machine cannot hold: refused alike with replay
        with pytest.raises(SimInputError) as again:
            build(policy, options, ctx, True, monkeypatch)
        assert str(again.value) == str(exc)
        return
    seen = counting_replays(monkeypatch)
    assert_same_plan(build(policy, options, ctx, True, monkeypatch), reference)
    reason = why_never_replayed(model, experts, policy, options)
    assert (seen["replayed"] > 0) == (reason is None), (reason, seen)
    if reason == "streamed KV cache":
        assert seen["recorded"] == 0


def counting_replays(monkeypatch) -> dict[str, int]:
    """Counts, from now on: decode steps replayed, steps recorded (the first of their shape), and steps of a seen
    shape emitted op by op because its first step cannot be replayed."""
    seen = {"replayed": 0, "recorded": 0, "unreplayable": 0}
    replay, close, template = (step_replay_module.replay, step_replay_module.Recording.close,
                               step_replay_module.Recording.template)

    def counted_replay(*args, **kwargs):
        done = replay(*args, **kwargs)
        seen["replayed"] += done
        return done

    def counted_close(self, *args, **kwargs):
        seen["recorded"] += 1
        return close(self, *args, **kwargs)

    def counted_template(self, *args, **kwargs):
        made = template(self, *args, **kwargs)
        seen["unreplayable"] += made is None
        return made

    monkeypatch.setattr(step_replay_module, "replay", counted_replay)
    monkeypatch.setattr(step_replay_module.Recording, "close", counted_close)
    monkeypatch.setattr(step_replay_module.Recording, "template", counted_template)
    return seen


def test_steps_of_one_shape_are_replayed_and_streamed_kv_steps_are_not(monkeypatch):
    ctx = context("mixtral-8x7b", "a100-80g-8452y", "uniform", gen=13)
    seen = counting_replays(monkeypatch)
    build("coxmoe", FIXED, ctx, True, monkeypatch)
    # 12 decode steps of every request: the first of each shape recorded (an expert idle in some layer at a step is
    # another shape), the rest replayed
    assert seen["replayed"] >= 9 and seen["replayed"] + seen["recorded"] == 12 and seen["unreplayable"] == 0
    seen = counting_replays(monkeypatch)  # coalesced experts over micro-batches of 4: the step's busy experts count
    build("moe-gen", {"coalesce": "on", "decode_micro_batch": "4", "attn_mode": "0", "rescore": "1"}, ctx, True,
          monkeypatch)
    assert seen["replayed"] >= 9 and seen["unreplayable"] == 0
    seen = counting_replays(monkeypatch)  # a streamed KV cache: its buffers chain steps, so none is replayed
    build("moe-gen", {"attn_mode": "1", "decode_micro_batch": "16", "rescore": "1"}, ctx, True, monkeypatch)
    assert seen == {"replayed": 0, "recorded": 0, "unreplayable": 0}


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


def test_steps_a_replay_cannot_reproduce_are_emitted_op_by_op():
    """Prefill, swap steps and layouts with split experts or a streamed KV cache get no replay key."""
    ctx = context("mixtral-8x7b", "a100-80g-8452y", "uniform", batch=8, gen=13)
    emit = compose.LayoutEmitter(ctx, ctx.builder(), kv_on_gpu=True)
    m = ctx.model
    plain = compose.Layout("ggg", compose.no_experts(m), compose.all_experts(m), compose.no_experts(m))
    decode = decode_slices(ctx, 1, [np.arange(8)])
    assert emit._replay_key(decode, Phase.DECODE, plain, None, None) is not None
    assert emit._replay_key(prefill_slices(ctx, [np.arange(8)]), Phase.PREFILL, plain, None, None) is None
    entering = ((1,),) + ((),) * (m.num_moe_layers - 1)  # a swap copy at layer 0
    assert emit._replay_key(decode, Phase.DECODE, plain, entering, None) is None
    # no expert entering in any layer emits what no list does
    assert emit._replay_key(decode, Phase.DECODE, plain, compose.no_experts(m), None) is not None
    assert emit._replay_key(decode, Phase.DECODE, plain, None, (0,) * m.num_moe_layers) is None
    split = replace(plain, splits=(((0, 1, 2),),) + ((),) * (m.num_moe_layers - 1))
    assert emit._replay_key(decode, Phase.DECODE, split, None, None) is None
    assert emit._replay_key(decode, Phase.DECODE, replace(plain, kv_streamed=True), None, None) is None
    emit.replay = False
    assert emit._replay_key(decode, Phase.DECODE, plain, None, None) is None


@pytest.mark.parametrize("spare", [0, 1, 7, 40, "half"])
def test_a_plan_crossing_the_op_limit_in_a_replayed_step_is_refused_alike(spare, monkeypatch):
    """The limit falls inside the last decode step, after ten replayed ones: the replay declines the step (its
    largest guard would fail) and emission raises, with the words emission alone raises."""
    ctx = context("mixtral-8x7b", "a100-80g-8452y", "uniform", gen=13)
    full = build("coxmoe", FIXED, ctx, False, monkeypatch)
    load = len(full.ops) + MEMBER_OP_SHARE * sum(len(op.members) for op in full.ops)
    per_step = sum(op.step == 5 for op in full.ops)
    limit = int(load) - per_step + (per_step // 2 if spare == "half" else spare)
    monkeypatch.setattr(plan_module, "max_ops", lambda: limit)
    errors = []
    for replay in (False, True):
        seen = counting_replays(monkeypatch)
        with pytest.raises(ResourceLimitError) as exc:
            build("coxmoe", FIXED, ctx, replay, monkeypatch)
        errors.append(str(exc.value))
    assert seen["replayed"] >= 9
    assert errors[0] == errors[1]


def test_a_replayed_plan_charges_the_builder_the_same_load(monkeypatch):
    """The builder's member load (what its memory guard and size estimate read) is the same float either way."""
    ctx = context("deepseek-v2-lite", "a100-80g-8452y", "zipf:1.2", gen=13, experts=8)
    builders = []
    make = PlanContext.builder

    def keep(self):
        builders.append(make(self))
        return builders[-1]

    monkeypatch.setattr(PlanContext, "builder", keep)
    loads = []
    for replay in (False, True):
        builders.clear()
        seen = counting_replays(monkeypatch)
        build("coxmoe", FIXED, ctx, replay, monkeypatch)
        loads.append([(len(b.ops), b.member_load, b.step) for b in builders])
    assert seen["replayed"] >= 5 and loads[0] == loads[1] and loads[0][-1][1] > 0


def test_a_search_emits_each_prefill_once_and_its_plans_are_unchanged(monkeypatch):
    """CoX-MoE's candidates share prefill configurations: a prefill emitted for one is copied for the next (and for
    the chosen plan), and the plan is the one built with every prefill emitted (replay off)."""
    ctx = context("mixtral-8x7b", "a100-80g-8452y", "uniform", gen=13)
    restored = []
    restore = compose._PrefillState.restore

    def counted(self, emit):
        restored.append(restore(self, emit))
        return restored[-1]

    monkeypatch.setattr(compose._PrefillState, "restore", counted)
    reference = build("coxmoe", {}, ctx, False, monkeypatch)
    assert restored == []
    assert_same_plan(build("coxmoe", {}, ctx, True, monkeypatch), reference)
    assert restored.count(True) >= 2


def test_a_kept_prefill_starts_a_plan_where_its_own_left_off():
    """Restoring a prefill gives a new emitter the ops and state emitting it leaves; later emission into one plan
    does not reach the kept state; a prefill that would cross the op limit is declined (emitting it raises)."""
    ctx = context("mixtral-8x7b", "a100-80g-8452y", "uniform", gen=13)
    m = ctx.model
    layout = compose.Layout("gcg", compose.no_experts(m), compose.all_experts(m), compose.no_experts(m))
    groups = [np.arange(0, 32), np.arange(32, 64)]

    def emitter():
        return compose.LayoutEmitter(ctx, ctx.builder(), kv_on_gpu=True)

    def state(emit):
        b = emit.b
        return (list(emit.ops), b.member_load, b.step, dict(emit.layer_done), emit.seq, emit.prefill_end,
                list(emit.scopes), [dict(t) for t in emit._members])

    cache: dict = {}
    first = emitter()
    first.prefill(prefill_slices(ctx, groups), layout, cache)
    (kept,) = cache.values()
    emitted = state(first)
    first.step(decode_slices(ctx, 1, groups), Phase.DECODE, 1, layout)  # emission goes on in the first plan only
    for _ in range(2):  # a restored plan's own emission does not reach the kept state either
        second = emitter()
        second.prefill(prefill_slices(ctx, groups), layout, cache)
        assert state(second) == emitted and len(cache) == 1
        second.step(decode_slices(ctx, 1, groups), Phase.DECODE, 1, layout)
    small = emitter()
    small.b.max_ops = len(emitted[0]) - 1
    assert not kept.restore(small) and small.ops == []


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), model=st.sampled_from(["mixtral-8x7b", "deepseek-v2-lite", "qwen3-30b-a3b"]),
       experts=st.sampled_from([4, 8, 16]), batch=st.integers(4, 48), routing=st.sampled_from(["uniform", "zipf:1.5"]),
       lengths=st.lists(st.integers(2, 9), min_size=1, max_size=3), sample=st.sampled_from([0, 3]),
       seed=st.integers(0, 2**16))
def test_random_small_plans_are_the_same_replayed(case, model, experts, batch, routing, lengths, sample, seed):
    """Property: any composed policy's plan, on a random small workload (generation lengths drawn from a few values,
    so shapes repeat and change), with or without a decode sample, is the same built either way."""
    policy, options = case
    rng = np.random.default_rng(seed)
    prompts, gens = rng.integers(2, 24, batch), rng.choice(lengths, batch)
    m = replace(load_model(model), num_experts=experts, top_k=2)
    trace = generate_trace(SynthConfig(m.name, m.num_moe_layers, experts, 2, routing, 0.0, seed), prompts, gens)
    system = getattr(POLICIES[policy], "example_system", None) or "a100-80g-8452y"
    ctx = PlanContext(m, load_system(system), Workload(prompts, gens), trace, decode_sample=sample)
    plans, errors = [], []
    with pytest.MonkeyPatch.context() as patch:
        for replay in (False, True):
            try:
                plans.append(build(policy, options, ctx, replay, patch))
            except SimInputError as exc:
                errors.append(str(exc))
    assert len(errors) in (0, 2) and (not errors or errors[0] == errors[1])
    if plans:
        assert_same_plan(*plans)


def test_a_member_table_past_its_bound_leaves_steps_to_emission(monkeypatch):
    """A replay whose (expert, tokens) member table would pass `MemberIndex.MAX_ENTRIES` declines: those steps are
    emitted op by op, and the plan is the same."""
    ctx = context("mixtral-8x7b", "a100-80g-8452y", "uniform", gen=13)
    reference = build("coxmoe", FIXED, ctx, False, monkeypatch)
    monkeypatch.setattr(step_replay_module.MemberIndex, "MAX_ENTRIES", 8)
    seen = counting_replays(monkeypatch)
    assert_same_plan(build("coxmoe", FIXED, ctx, True, monkeypatch), reference)
    assert seen["replayed"] == 0 and seen["recorded"] > 0


def test_expert_work_past_int64_makes_a_replay_decline():
    """A member's work past int64, or a grouped op's sum of members that could pass it, raises OverflowError in
    `_recomputed`, which `replay` answers by declining (the step is then emitted and the check names its op:
    tests/test_op_table.py)."""
    def Builder():  # noqa: N802 - stands in for PlanBuilder: its member store is all a MemberIndex uses
        return SimpleNamespace(members=MemberStore())

    huge = step_replay_module.MemberIndex(lambda t: (1 << 63, 1, 0), lambda e, t: ((e[0], t[0], 0, 0),), Builder(),
                                          4)
    with pytest.raises(OverflowError):
        huge.work(np.array([3, 5], np.int64))
    step_replay_module._fits(np.array([1 << 61], np.int64), 3)
    with pytest.raises(OverflowError):
        step_replay_module._fits(np.array([1 << 62], np.int64), 2)
    builder = Builder()
    index = step_replay_module.MemberIndex(lambda t: (2 * t, t + 1, 0), lambda e, t: ((e[0], t[0], 2 * t[0], 1),),
                                           builder, 4)
    flops, nbytes = index.work(np.array([0, 7, 3], np.int64))
    assert flops.tolist() == [0, 14, 6] and nbytes.tolist() == [1, 8, 4]
    ids = index.member_ids(np.array([2, 1, 2, 0], np.int64), np.array([5, 5, 5, 9], np.int64))
    assert ids.tolist() == [0, 1, 0, 2] and [m[:2] for m in builder.members.members] == [(2, 5), (1, 5), (0, 9)]
    assert index.member_ids(np.array([1, 3], np.int64), np.array([5, 1], np.int64)).tolist() == [1, 3]


def test_member_tables_grow_to_their_bound_and_no_further(monkeypatch):
    """`MemberIndex` tables double as token counts grow, up to MAX_ENTRIES // experts tokens: a count within the
    bound is held even where doubling would pass it; one past it answers None (the replay declines)."""
    monkeypatch.setattr(step_replay_module.MemberIndex, "MAX_ENTRIES", 100)
    builder = SimpleNamespace(members=MemberStore())
    index = step_replay_module.MemberIndex(lambda t: (t, t, 0), lambda e, t: ((e[0], t[0], t[0], t[0]),), builder, 4)
    assert index.max_tokens == 25
    for top in (16, 20, 25):
        tokens = np.array([top - 1], np.int64)
        assert index.work(tokens)[0].tolist() == [top - 1]
        assert index.member_ids(np.array([3], np.int64), tokens) is not None
    assert index.known.size == 25 and index.ids.shape == (4, 25)
    assert index.work(np.array([25], np.int64)) is None
    assert index.member_ids(np.array([0], np.int64), np.array([25], np.int64)) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 1 << 40), max_size=4), min_size=1, max_size=8))
def test_segment_sums_match_python_sums(segments):
    """`_segment_sums` (grouped ops' tokens and work from their members' entries): empty segments sum to 0,
    wherever they fall."""
    values = np.array([v for seg in segments for v in seg], np.int64)
    starts = np.cumsum([0] + [len(seg) for seg in segments[:-1]]).astype(np.int64)
    got = step_replay_module._segment_sums(values, starts)
    assert got.tolist() == [sum(seg) for seg in segments]
