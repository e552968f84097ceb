"""Plans as columns (issue 13, sim/op_table.py): the columns hold every op field for field, a policy's plan is built
as columns and gives the same `Op`s, the column-wide check raises what the per-op check raises, and prices read off
the columns are the per-op prices."""

from __future__ import annotations

import dataclasses
import random
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sim.plan as plan_module
from sim.api import resolve_model, resolve_routing, resolve_system
from sim.cost import GroupPrices, RooflineCostModel
from sim.cost.columns import distinct_rows, price_table
from sim.errors import SimInputError
from sim.op_table import MemberStore, OpTable
from sim.plan import Op, OpKind, Phase, Plan
from sim.policies import POLICIES, PlanContext, make_policy
from sim.table_check import _distinct

SYSTEM = "a100-80g-8452y"


def context(model: str, batch: int = 64, prompt: int = 8, gen: int = 6) -> PlanContext:
    m = resolve_model(model)
    wl, trace, _ = resolve_routing(m, batch, prompt, gen, None, "uniform", 1)
    return PlanContext(m, resolve_system(SYSTEM), wl, trace)


def plans() -> list[Plan]:
    """Every policy's plan of a small Mixtral workload, and CoX-MoE's on DeepSeek-V2-Lite and Qwen3-30B-A3B."""
    out = []
    for name in sorted(POLICIES):
        try:
            out.append(make_policy(name).build(context("mixtral-8x7b")))
        except SimInputError:  # a policy this machine cannot hold the model under
            continue
    out += [make_policy("coxmoe").build(context(m)) for m in ("deepseek-v2-lite", "qwen3-30b-a3b")]
    return out


@pytest.fixture(scope="module")
def built() -> list[Plan]:
    return plans()


def test_columns_cover_every_op_field():
    covered = {f.name for f in dataclasses.fields(OpTable)} | {"id", "deps", "members"}
    assert {f.name for f in dataclasses.fields(Op)} <= covered


def test_policies_build_plans_as_columns_that_give_their_ops_back(built):
    assert len(built) >= 8
    held = [plan for plan in built if plan.columns is not None]
    assert held, "no policy's plan was built as columns (decode-step replay)"
    for plan in built:
        n = plan.num_ops
        table = plan.table()
        ops = plan.ops  # made from the columns where the plan held them
        assert plan.columns is None and len(ops) == n == len(table)
        again = OpTable.from_ops(ops)
        assert again is not None and again.to_ops() == ops and table.to_ops() == ops
        for i in random.Random(n).sample(range(n), min(n, 50)):
            assert table.op(i) == ops[i]


def test_concatenated_parts_are_the_whole(built):
    plan = max(built, key=lambda p: p.num_ops)
    ops = plan.ops
    cuts = [0, len(ops) // 3, len(ops) // 3 + 1, 2 * len(ops) // 3, len(ops)]
    parts = [OpTable.from_ops(ops[a:b], first=a) for a, b in zip(cuts, cuts[1:], strict=False)]
    assert all(p is not None for p in parts)
    assert OpTable.concat(parts).to_ops() == ops


def test_parts_naming_members_in_a_store_are_the_whole(built):
    """Slices read with a builder's member store (members named by their ids there, some stored ahead as emitters
    store them, the rest stored as met) and given the store's table at the end are the plan's ops."""
    plan = max(built, key=lambda p: sum(1 for op in p.ops if op.members))
    ops = plan.ops
    store = MemberStore()
    for op in ops[: len(ops) // 2]:  # the first half's members stored ahead, the others met in the slices
        for member in op.members or ():
            store.add(member)
    cuts = [0, len(ops) // 4, len(ops) // 2 + 1, len(ops)]
    parts = [OpTable.from_ops(ops[a:b], first=a, store=store) for a, b in zip(cuts, cuts[1:], strict=False)]
    assert all(p is not None and p.member_table is None for p in parts)
    for part in parts:
        part.member_table = store.table()
    assert len(store.members) == len({id(m) for op in ops for m in op.members or ()})
    assert OpTable.concat(parts).to_ops() == ops


def test_a_store_refuses_a_member_no_table_holds_and_keeps_what_it_had():
    store = MemberStore()
    good, other = (0, 3, 6, 9), (1, 3, 6, 9)
    assert store.add(good) == 0 and store.add(good) == 0
    assert store.ids_of([good, other, good]).tolist() == [0, 1, 0]
    for bad in [(2, 3, 6.5, 9), (2, 3, 1 << 64, 9), (2, 3, 6)]:
        assert store.ids_of([other, bad]) is None
        assert store.members == [good, other]
    assert store.table().tolist() == [list(good), list(other)]
    made = [(2, 1, 2, 3), (3, 1, 2, 3)]  # as an emitter stores the members it has just made
    store.extend(made)
    assert store.ids_of([made[1], good, made[0]]).tolist() == [3, 0, 2] and store.members[2:] == made


@pytest.mark.parametrize("change", [
    {"tokens": 1.5}, {"flops": 1 << 70}, {"kind": "expert"}, {"phase": "decode"}, {"payload": ""}, {"id": 7},
    {"stream": ["gpu"]}, {"stream": 3}, {"deps": (0.0,)}, {"members": ((0, 1, 2),)}, {"tokens": None},
    {"deps": 3}, {"members": 5}, {"members": (5, 6)}, {"members": ((0, 1, 2, 3.0),)}, {"tokens": (1, 2)}])
def test_ops_a_plan_file_could_not_hold_give_no_columns(built, change):
    ops = list(built[0].ops)
    ops[1] = dataclasses.replace(ops[1], **change)
    assert OpTable.from_ops(ops) is None


def test_plan_holding_columns_gives_ops_once_and_then_checks_them():
    plan = make_policy("coxmoe").build(context("mixtral-8x7b"))
    assert plan.columns is not None
    n = plan.num_ops
    plan.check()
    plan.ops[n - 1].tokens = -1  # the ops are the plan's from now on: a change is seen
    assert plan.columns is None and plan.num_ops == n
    with pytest.raises(SimInputError, match=f"plan op {n - 1}: tokens and kv_tokens must be >= 0"):
        plan.check()


def _mutations(plan: Plan, seed: int) -> list[tuple[int, dict]]:
    """Changes of one op each, some breaking a rule, some not."""
    rng = random.Random(seed)
    ops = plan.ops
    grouped = [op.id for op in ops if op.members]
    out = []
    for _ in range(60):
        i = rng.randrange(1, len(ops))
        op = ops[i]
        field = rng.choice(["tokens", "kv_tokens", "step", "layer", "expert", "micro_batch", "flops", "bytes", "scope",
                            "stream", "deps", "alloc", "free", "members"])
        choices = {"stream": ["gpu", "cpu", "ndp", "nvlink"], "deps": [(i,), (i - 1,), (-1,), ()],
                   "alloc": [(("gpu", 8),), (("disk", 8),), (("gpu", -1),)], "free": [(("gpu", 8),), (("cpu", 1),)],
                   "members": [((0, 1, 2, 3), (1, 1, 2, 3)), ((0, 1, 2, 3), (0, 1, 2, 3)), ((0, 1, 2, 3),)]}
        value = rng.choice(choices[field] if field in choices else
                           [-2, -1, 0, 1, 3, 1 << 40, 1 << 51, getattr(op, field) + 1])
        out.append((i, {field: value}))
        if grouped:  # a grouped op's member changed
            g = rng.choice(grouped)
            members = list(ops[g].members)
            k = rng.randrange(len(members))
            e, t, f, b = members[k]
            members[k] = rng.choice([(e, t, f + 1, b), (e, 0, f, b), (members[0][0], t, f, b), (99, t, f, b)])
            out.append((g, {"members": tuple(members)}))
    return out


def _verdict(plan: Plan) -> str:
    try:
        plan.check()
    except SimInputError as exc:
        return str(exc)
    return "passes"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_column_wide_check_names_what_the_per_op_check_names(built, seed, monkeypatch):
    verdicts = set()
    for plan in built[seed::3]:
        for i, change in _mutations(plan, seed):
            ops = list(plan.ops)
            ops[i] = dataclasses.replace(ops[i], **change)
            forged = dataclasses.replace(plan, ops=ops)
            columns = _verdict(forged)
            with monkeypatch.context() as m:
                m.setattr(plan_module.Plan, "table", lambda self: None)  # the per-op path
                per_op = _verdict(forged)
            assert columns == per_op, (plan.policy, i, change)
            verdicts.add(re.sub(r"-?\d+", "N", columns)[:60])
    assert "passes" in verdicts and len(verdicts) >= 5, verdicts  # changes that pass, and several kinds of refusal


def test_prices_read_off_columns_are_the_per_op_prices(built):
    for plan in built:
        cost = RooflineCostModel(plan.system)
        cost.prepare(plan)
        prices = price_table(cost, plan.table())
        group = GroupPrices(cost)
        assert prices is not None
        assert prices.durations.tolist() == [group(op) for op in plan.ops], plan.policy


def test_distinct_rows_survive_a_hash_collision(monkeypatch):
    import sim.cost.columns as columns

    monkeypatch.setattr(columns, "_MIX", np.uint64(0))  # every row hashes to its last column: collisions
    a = np.array([1, 2, 1, 2, 3])
    b = np.array([5, 5, 5, 6, 5])
    first, inverse = distinct_rows([a, b])
    rows = list(zip(a.tolist(), b.tolist(), strict=True))
    assert [rows[f] for f in first[inverse]] == rows and len(first) == len(set(rows))
    made: list[str] = []

    def maker(name: str, column: np.ndarray):  # a column made when read (price_table's gathered columns)
        def make() -> np.ndarray:
            made.append(name)
            return column.copy()
        return make

    lazy_first, lazy_inverse = distinct_rows([maker("a", a), maker("b", b)])
    assert lazy_first.tolist() == first.tolist() and lazy_inverse.tolist() == inverse.tolist()
    assert made.count("a") >= 2 and made.count("b") >= 2  # hashed, compared and (a collision) stacked from new copies


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 2**40), st.integers(0, 255)), min_size=1, max_size=40))
def test_distinct_rows_of_made_columns_equal_those_of_arrays(rows):
    columns = [np.array(c, np.int64) for c in zip(*rows, strict=True)]
    first, inverse = distinct_rows(columns)
    lazy_first, lazy_inverse = distinct_rows([lambda c=c: c.copy() for c in columns])
    assert lazy_first.tolist() == first.tolist() and lazy_inverse.tolist() == inverse.tolist()
    assert [rows[f] for f in first[inverse]] == rows and len(first) == len(set(rows))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5000), min_size=1, max_size=9), min_size=1, max_size=12),
       st.sampled_from([8, 64, 65, 128, 5001]))
def test_distinct_experts_per_group(groups, experts):
    groups = [[e % experts for e in g] for g in groups]
    counts = np.array([len(g) for g in groups], np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    e = np.array([e for g in groups for e in g], np.int64)
    assert _distinct(e, first, counts, experts).tolist() == [len(set(g)) == len(g) for g in groups]


def test_a_step_a_replay_declines_is_emitted_as_ops_between_replayed_ones(monkeypatch):
    """A replay that declines (a recomputed number past int64) leaves its step to the ordinary path: the plan is
    the same, its steps before and after still replayed."""
    import sim.policies.step_replay as step_replay

    replayed = make_policy("coxmoe").build(context("mixtral-8x7b"))
    original, calls = step_replay._recomputed, []

    def declines_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OverflowError("Python int too large to convert to C long")
        return original(*args, **kwargs)

    monkeypatch.setattr(step_replay, "_recomputed", declines_once)
    plan = make_policy("coxmoe").build(context("mixtral-8x7b"))
    assert len(calls) >= 3 and plan.columns is not None
    assert plan.ops == replayed.ops


@pytest.mark.parametrize("policy", ["coxmoe", "moe-lightning", "fiddler"])
def test_a_member_past_int64_is_named_by_the_check(policy, monkeypatch):
    """Expert FLOPs past int64 from 41 tokens on: the members an emitter stored hold what no table can, so the plan
    is handed over as ops (its replayed steps made back, their members the stored objects) and the check names an
    op (or a search's run of the plan does, by the same words), whether the policy replays (CoX-MoE) or settles its
    ops as it goes (MoE-Lightning, Fiddler): not a failure inside the build."""
    import sim.cost.work as work

    original = work.OpWork.expert

    def expert(self, tokens):
        cost = original(self, tokens)
        return cost._replace(flops=cost.flops + (1 << 63)) if tokens > 40 else cost

    monkeypatch.setattr(work.OpWork, "expert", expert)
    fixed = {"decode_micro_batch": "32", "prefill_micro_batch": "8", "resident_experts": "2",
             "prefill_placement": "ggg", "decode_placement": "gcg", "split": "auto"} if policy == "coxmoe" else {}
    with pytest.raises(SimInputError, match=r"^plan op \d+: (flops must be an integer within int64|grouped expert)"):
        plan = make_policy(policy, fixed).build(context("mixtral-8x7b"))  # a search's engine runs refuse it too
        assert plan.columns is None
        plan.check()


def test_a_number_past_int64_after_replayed_steps_is_named_by_the_check(monkeypatch):
    """Attention FLOPs past int64 from a late step on: that step's replay declines, its ops are emitted, and the plan
    (then held as ops, its replayed steps made back into ops) is refused by the check naming an op, not by a failure
    inside the build."""
    import sim.cost.work as work
    import sim.policies.step_replay as step_replay

    original, replay, done = work.OpWork.attention, step_replay.replay, []

    def attention(self, q, attended, read, prefill=False):
        cost = original(self, q, attended, read, prefill)
        return cost._replace(flops=cost.flops + (1 << 63)) if not prefill and read > 32 * 11 else cost

    def counted(*args, **kwargs):
        done.append(replay(*args, **kwargs))
        return done[-1]

    monkeypatch.setattr(work.OpWork, "attention", attention)
    monkeypatch.setattr(step_replay, "replay", counted)
    fixed = {"decode_micro_batch": "32", "prefill_micro_batch": "8", "resident_experts": "2",
             "prefill_placement": "ggg", "decode_placement": "gcg", "split": "auto"}  # no search
    plan = make_policy("coxmoe", fixed).build(context("mixtral-8x7b"))
    assert True in done and False in done and plan.columns is None
    with pytest.raises(SimInputError, match=r"^plan op \d+: flops and bytes must be in \[0, 2\^50\]"):
        plan.check()


@pytest.mark.parametrize(("change", "words"), [
    ({"tokens": 1.5}, "plan op 1: tokens must be an integer within int64, got 1.5"),
    ({"flops": 1 << 70}, "plan op 1: flops must be an integer within int64"),
    ({"phase": "decode"}, "plan op 1: phase must be a Phase member, got 'decode'"),
    ({"stream": 3}, "plan op 1: stream must be a name, got 3"),
    ({"deps": (0.5,)}, "plan op 1: deps must be op ids, got (0.5,)"),
    ({"members": ((0, 1, 2),)}, "plan op 1: members must be (expert, tokens, flops, bytes) integers")])
def test_the_engine_names_an_op_no_table_can_hold(built, change, words):
    from sim.engine import run_plan

    plan = built[0]
    ops = list(plan.ops)
    ops[1] = dataclasses.replace(ops[1], **change)
    with pytest.raises(SimInputError) as err:
        run_plan(dataclasses.replace(plan, ops=ops), RooflineCostModel(plan.system), check=False)
    assert str(err.value).startswith(words) and "\n" not in str(err.value)


def test_a_group_whose_members_sum_past_int64_nanoseconds_is_too_long_a_run():
    """Members each within the per-op bound whose sum passes int64 ns: the run is refused as too long."""
    from sim.engine import run_plan
    from sim.errors import RunTooLong

    class Slow(RooflineCostModel):
        def op_time_ns(self, op: Op) -> int:
            return (1 << 62) if op.kind is OpKind.EXPERT else super().op_time_ns(op)

    plan = make_policy("coxmoe").build(context("mixtral-8x7b"))
    grouped = [op for op in plan.ops if op.members]
    assert grouped
    with pytest.raises(RunTooLong, match="over 9.22e\\+09 s"):
        run_plan(plan, Slow(plan.system))


def test_numpy_unsigned_fields_run_as_their_values(built):
    """A field holding numpy's uint64 (beside plain ints numpy would read both as floats) is the same integer."""
    from sim.engine import run_plan

    plan = built[0]
    ops = list(plan.ops)
    ops[5] = dataclasses.replace(ops[5], tokens=np.uint64(ops[5].tokens), flops=np.uint64(ops[5].flops))
    cost = RooflineCostModel(plan.system)
    a, b = run_plan(dataclasses.replace(plan, ops=ops), cost), run_plan(dataclasses.replace(plan, ops=plan.ops), cost)
    assert np.array_equal(a.start_ns, b.start_ns) and np.array_equal(a.end_ns, b.end_ns)


def test_the_check_names_a_plans_first_problem_before_a_field_no_table_holds(built):
    """Two problems: an earlier op out of bounds and a later float: the check names the earlier, as before columns."""
    from sim.engine import run_plan

    plan = built[0]
    ops = list(plan.ops)
    assert ops[3].phase is Phase.PREFILL
    ops[3] = dataclasses.replace(ops[3], step=5)
    ops[5] = dataclasses.replace(ops[5], flops=1.5)
    with pytest.raises(SimInputError, match="^plan op 3: a prefill op has step 0, not 5$"):
        run_plan(dataclasses.replace(plan, ops=ops), RooflineCostModel(plan.system))


def test_an_op_priced_past_int64_nanoseconds_is_too_long_a_run(built):
    from sim.engine import run_plan
    from sim.errors import RunTooLong

    class Endless(RooflineCostModel):
        def op_time_ns(self, op: Op) -> int:
            return (1 << 63) if op.kind is OpKind.LM_HEAD else super().op_time_ns(op)

    plan = built[0]
    for fast in (True, False):
        with pytest.raises(RunTooLong, match="over 9.22e\\+09 s"):
            run_plan(plan, Endless(plan.system), fast=fast)


def test_prices_are_judged_before_memory(built):
    """A plan wrong twice (static memory past the GPU, an op no price exists for): the price's error, as op-by-op
    pricing raised it before the pools were judged."""
    from sim.engine import run_plan

    class Priceless(RooflineCostModel):
        def op_time_ns(self, op: Op) -> int:
            if op.kind is OpKind.LM_HEAD:
                raise SimInputError(f"no price for op {op.id} (lm_head)")
            return super().op_time_ns(op)

    plan = built[0]
    heavy = dataclasses.replace(plan, ops=plan.ops, static_memory={**plan.static_memory, "gpu": {"x": 10 ** 15}})
    first_head = next(op.id for op in plan.ops if op.kind is OpKind.LM_HEAD)
    with pytest.raises(SimInputError, match=f"^no price for op {first_head} \\(lm_head\\)$"):
        run_plan(heavy, Priceless(plan.system), check=False)
