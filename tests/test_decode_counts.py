"""Per-step decode counts in one pass equal the step-by-step counts; plans built either way are the same."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import traces.format as fmt
from traces import SynthConfig, generate_trace


@pytest.fixture
def trace():
    rng = np.random.default_rng(0)
    prompts, gens = rng.integers(1, 40, 60), rng.integers(1, 14, 60)
    return generate_trace(SynthConfig("m", 3, 8, 2, "zipf:1.0", 0.2, 0), prompts, gens)


# in place (the table's bins in cache); one band; a band of one (step, group) slot per call
@pytest.mark.parametrize(("band_bytes", "small_bins"), [(16 << 20, 1 << 17), (16 << 20, 0), (1, 0)])
def test_one_pass_equals_step_by_step(trace, monkeypatch, band_bytes, small_bins):
    monkeypatch.setattr(fmt, "BAND_BYTES", band_bytes)
    monkeypatch.setattr(fmt, "SMALL_TABLE_BINS", small_bins)
    groups = [np.arange(0, 25), np.arange(25, 26), np.arange(40, 60), np.arange(26, 40)]  # any order, any size
    table = trace.decode_step_counts(groups)
    assert table.shape == (int(trace.gen_lens.max()) - 1, 4, 3, 8)
    assert table.dtype == np.uint8  # at most 25 requests x top-2 per entry
    for step in range(1, table.shape[0] + 1):
        for g, requests in enumerate(groups):
            np.testing.assert_array_equal(table[step - 1, g], trace.expert_counts(trace.decode_rows(step, requests)))
    assert trace.decode_step_counts(groups) is table  # kept for the next plan of a search
    prompt, generated = trace.phase_counts
    np.testing.assert_array_equal(prompt + generated, trace.expert_counts(np.arange(trace.num_tokens)))


@pytest.mark.parametrize("groups", [
    [np.arange(0, 25), np.arange(25, 26), np.arange(40, 60), np.arange(26, 40)],  # a partition: the largest derived
    [np.arange(30, 60), np.arange(0, 30)[::-1]],  # halves, one reversed: the first (a tie: the first) derived
    [np.arange(0, 40), np.arange(3, 9), np.arange(40, 60)],  # overlapping: counted, not derived
    [np.arange(0, 59)],  # one group short of the batch: counted
])
@pytest.mark.parametrize("jit", ["off", "in-place", "on"])  # numpy's bands, numpy in place, numba's kernel
def test_groups_splitting_the_batch_derive_the_largest_from_the_whole(trace, groups, jit, monkeypatch):
    """Once the whole batch's table is kept (`phase_counts`), groups holding every request once count all but
    the largest and take its counts as the batch's less the others': the same table as counting each group."""
    if jit == "on":
        pytest.importorskip("numba")
    monkeypatch.setenv("COXMOE_JIT", "off" if jit == "in-place" else jit)
    monkeypatch.setattr(fmt, "SMALL_TABLE_BINS", 1 << 17 if jit == "in-place" else 0)
    calls = []
    count = fmt.RoutingTrace._count_steps

    def counted(self, gs, slots, G, out):
        calls.append(sum(g.size for g in gs))
        return count(self, gs, slots, G, out)

    assert trace.phase_counts[1].sum() > 0  # keeps the whole batch's table
    monkeypatch.setattr(fmt.RoutingTrace, "_count_steps", counted)
    table = trace.decode_step_counts(groups)
    for step in range(1, table.shape[0] + 1):
        for g, requests in enumerate(groups):
            np.testing.assert_array_equal(table[step - 1, g], trace.expert_counts(trace.decode_rows(step, requests)))
    partition = sorted(np.concatenate(groups).tolist()) == list(range(60)) and len(groups) > 1
    assert calls == [60 - max(g.size for g in groups) if partition else sum(g.size for g in groups)]


def test_a_table_past_the_budget_is_not_built(trace, monkeypatch):
    monkeypatch.setattr(fmt, "REQUEST_TABLE_BYTES", 64)
    assert trace.decode_step_counts([np.arange(60)]) is None
    prompt, generated = trace.phase_counts  # falls back to counting every row
    np.testing.assert_array_equal(prompt + generated, trace.expert_counts(np.arange(trace.num_tokens)))


def test_plans_are_the_same_with_and_without_the_table(trace, paper_system, monkeypatch):
    from sim.api import simulate_plan
    from sim.policies import PlanContext, make_policy
    from sim.specs import ModelSpec
    from sim.workload import Workload

    spec = ModelSpec(name="m", num_layers=3, hidden_size=64, vocab_size=97, num_attention_heads=4, num_kv_heads=2,
                     head_dim=16, num_experts=8, top_k=2, expert_intermediate_size=48)
    wl = Workload(trace.prompt_lens.astype(np.int64), trace.gen_lens.astype(np.int64))
    opts = {"coalesce": "off", "decode_micro_batch": "7"}
    with_table = make_policy("coxmoe", opts).build(PlanContext(spec, paper_system, wl, trace))
    monkeypatch.setattr(PlanContext, "decode_counts", lambda self, groups: None)
    without = make_policy("coxmoe", opts).build(PlanContext(spec, paper_system, wl, trace))
    assert [(op.kind, op.stream, op.tokens, op.expert, op.members) for op in with_table.ops] == [
        (op.kind, op.stream, op.tokens, op.expert, op.members) for op in without.ops]
    assert simulate_plan(with_table)[1]["total_s"] == simulate_plan(without)[1]["total_s"]


def test_count_tables_are_kept_in_the_narrowest_type_their_entries_fit():
    """`narrowed`: the same values in the narrowest unsigned type that holds the largest; other tables untouched."""
    for dtype, top, expected in ((np.uint16, 255, np.uint8), (np.uint16, 256, np.uint16), (np.uint32, 1000, np.uint16),
                                 (np.uint32, 70_000, np.uint32)):
        table = np.arange(top + 1, dtype=dtype).reshape(-1, 1)[::-1]
        out = fmt.narrowed(table)
        assert out.dtype == expected
        np.testing.assert_array_equal(out, table)
    for keep in (np.zeros(5, np.uint8), np.zeros(0, np.uint16), np.arange(3, dtype=np.int64)):
        assert fmt.narrowed(keep) is keep


def test_synthesis_and_decode_tables_keep_narrow_counts():
    """Top-8 of 128 experts over prompts of up to 300 tokens: a prompt count is bounded by 2,400 (uint16) but stays
    far below 256, as does a group's decode count (bounded by 320 for 40 requests): both tables are uint8, with
    the values of the full form."""
    rng = np.random.default_rng(3)
    prompts, gens = rng.integers(200, 300, 40), rng.integers(2, 6, 40)
    cfg = SynthConfig("m", 2, 128, 8, "uniform", 0.0, 0)
    counted, full = generate_trace(cfg, prompts, gens, prompt_counts=True), generate_trace(cfg, prompts, gens)
    assert fmt.count_dtype(int(prompts.max()) * 8) == np.uint16 and counted.prompt_counts.dtype == np.uint8
    every = np.arange(40)
    np.testing.assert_array_equal(counted.prefill_counts(every), full.prefill_counts(every))
    groups = [np.arange(0, 40), np.arange(3, 9)]
    table = counted.decode_step_counts(groups)
    assert fmt.count_dtype(40 * 8) == np.uint16 and table.dtype == np.uint8
    np.testing.assert_array_equal(table, full.decode_step_counts(groups))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2**32 - 1), st.integers(1, 5), st.booleans(),
       st.sampled_from([(16 << 20, 1 << 17), (16 << 20, 0), (1, 0), (5000, 0)]))
def test_any_split_of_any_batch_counts_as_step_by_step(requests, seed, parts, empty, paths):
    """Random batches (lengths that finish at different steps), split at random into groups in any order (an empty
    group too), after the whole batch's table is kept (so a split derives its largest group): every path (in
    place, one band, bands of one or a few slots) gives each group's counts at each step."""
    band_bytes, small_bins = paths
    saved = fmt.BAND_BYTES, fmt.SMALL_TABLE_BINS
    fmt.BAND_BYTES, fmt.SMALL_TABLE_BINS = band_bytes, small_bins
    try:
        rng = np.random.default_rng(seed)
        trace = generate_trace(SynthConfig("m", 2, 6, 2, "zipf:1.0", 0.2, 0), rng.integers(1, 20, requests),
                               rng.integers(1, 12, requests))
        assert trace.phase_counts[1].sum() >= 0  # keeps the whole batch's table
        groups = np.split(rng.permutation(requests), np.sort(rng.integers(0, requests + 1, parts - 1)))
        if empty:
            groups.append(np.zeros(0, np.int64))
        rng.shuffle(groups)
        table = trace.decode_step_counts(groups)
        assert table.shape[:2] == (int(trace.gen_lens.max()) - 1, len(groups))
        for step in range(1, table.shape[0] + 1):
            for g, members in enumerate(groups):
                np.testing.assert_array_equal(table[step - 1, g],
                                              trace.expert_counts(trace.decode_rows(step, members)))
    finally:
        fmt.BAND_BYTES, fmt.SMALL_TABLE_BINS = saved
