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
from sim.op_table import OpTable
from sim.plan import Op, Plan
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


@pytest.mark.parametrize("change", [
    {"tokens": 1.5}, {"flops": 1 << 70}, {"kind": "expert"}, {"phase": "decode"}, {"payload": ""}, {"id": 7},
    {"stream": ["gpu"]}, {"stream": 3}, {"deps": (0.0,)}, {"members": ((0, 1, 2),)}, {"tokens": None}])
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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5000), min_size=1, max_size=9), min_size=1, max_size=12),
       st.sampled_from([8, 64, 65, 128, 5001]))
def test_distinct_experts_per_group(groups, experts):
    groups = [[e % experts for e in g] for g in groups]
    counts = np.array([len(g) for g in groups], np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    e = np.array([e for g in groups for e in g], np.int64)
    assert _distinct(e, first, counts, experts).tolist() == [len(set(g)) == len(g) for g in groups]


def test_replayed_steps_too_large_for_int64_are_emitted_for_the_check_to_name(monkeypatch):
    """A recomputed number past int64 sends the step down the ordinary path, whose op the check refuses."""
    import sim.policies.step_replay as step_replay

    def huge(*args, **kwargs):
        raise OverflowError("Python int too large to convert to C long")

    replayed = make_policy("coxmoe").build(context("mixtral-8x7b"))
    monkeypatch.setattr(step_replay, "_recomputed", huge)
    plan = make_policy("coxmoe").build(context("mixtral-8x7b"))
    assert replayed.columns is not None and plan.columns is None  # nothing replayed: every step emitted as ops
    assert plan.ops == replayed.ops
