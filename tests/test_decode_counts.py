"""Per-step decode counts in one pass equal the step-by-step counts; plans built either way are the same."""

from __future__ import annotations

import numpy as np
import pytest

import traces.format as fmt
from traces import SynthConfig, generate_trace


@pytest.fixture
def trace():
    rng = np.random.default_rng(0)
    prompts, gens = rng.integers(1, 40, 60), rng.integers(1, 14, 60)
    return generate_trace(SynthConfig("m", 3, 8, 2, "zipf:1.0", 0.2, 0), prompts, gens)


@pytest.mark.parametrize("band_bytes", [16 << 20, 1])  # one band; a band of one (step, group) slot per call
def test_one_pass_equals_step_by_step(trace, monkeypatch, band_bytes):
    monkeypatch.setattr(fmt, "BAND_BYTES", band_bytes)
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
