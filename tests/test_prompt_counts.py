"""Traces that keep their prompts as per-request counts (the simulator's form): the same draws as a full trace, so
the same decode rows and counts, and the same simulated results; what needs prompt rows refuses them by name."""

from __future__ import annotations

import numpy as np
import pytest

import traces.synth as synth
from sim.api import resolve_model, resolve_routing, simulate
from sim.errors import SimInputError
from traces import SynthConfig, generate_trace, load_trace, save_trace
from traces.disk_cache import cache_key
from traces.eas import eas_map, hit_ratio, oracle_map
from traces.errors import TraceError
from traces.format import RoutingTrace
from traces.stats import trace_stats

CONFIGS = [
    (SynthConfig("m", 4, 8, 2, "uniform", 0.0, 1), [5, 1, 9, 3], [1, 4, 2, 7]),
    (SynthConfig("m", 3, 16, 4, "zipf:1.2", 0.3, 2, affinity=0.4), [50, 17, 1, 300], [3, 1, 20, 9]),
    (SynthConfig("m", 3, 128, 8, "zipf:1.0", 0.2, 3, topics=3), [70] * 40, [12] * 40),
]


def both(cfg: SynthConfig, prompts: list[int], gens: list[int]) -> tuple[RoutingTrace, RoutingTrace]:
    p, g = np.array(prompts), np.array(gens)
    return generate_trace(cfg, p, g), generate_trace(cfg, p, g, prompt_counts=True)


@pytest.mark.parametrize("group_tokens", [1 << 16, 7])  # one counting group; groups cut inside the requests' list
@pytest.mark.parametrize(("cfg", "prompts", "gens"), CONFIGS)
def test_counted_prompts_equal_the_full_traces_counts(cfg, prompts, gens, group_tokens, monkeypatch):
    monkeypatch.setattr(synth._PromptCounts, "GROUP_TOKENS", group_tokens)
    full, counted = both(cfg, prompts, gens)
    assert full.has_prompt_rows and not counted.has_prompt_rows
    R = full.num_requests
    kept = np.concatenate([full.experts[full.decode_offsets[r]:full.token_offsets[r + 1]] for r in range(R)])
    np.testing.assert_array_equal(counted.experts, kept)  # the generated tokens' rows, in order
    assert counted.num_tokens == sum(gens) - R
    for r in range(R):
        np.testing.assert_array_equal(counted.prompt_counts[r].astype(np.int64), full.prefill_counts(np.array([r])))
    some = np.array([R - 1, 0])
    np.testing.assert_array_equal(counted.prefill_counts(some), full.prefill_counts(some))
    for a, b in zip(full.phase_counts, counted.phase_counts, strict=True):
        np.testing.assert_array_equal(a, b)
    groups = [np.arange(0, R, 2), np.arange(1, R, 2)]
    np.testing.assert_array_equal(full.decode_step_counts(groups), counted.decode_step_counts(groups))
    for step in range(1, max(gens)):
        np.testing.assert_array_equal(full.expert_counts(full.decode_rows(step, np.arange(R))),
                                      counted.expert_counts(counted.decode_rows(step, np.arange(R))))


def test_a_counted_trace_round_trips_and_keeps_its_head(tmp_path):
    _, counted = both(*CONFIGS[1])
    back = load_trace(save_trace(counted, tmp_path / "t.npz"))
    np.testing.assert_array_equal(back.prompt_counts, counted.prompt_counts)
    np.testing.assert_array_equal(back.experts, counted.experts)
    head = counted.head(2)
    assert head.num_requests == 2 and head.num_tokens == 2 + 0  # gens 3 and 1: two rows, then none
    np.testing.assert_array_equal(head.prefill_counts(np.arange(2)), counted.prefill_counts(np.arange(2)))


@pytest.mark.parametrize(("change", "message"), [
    (lambda pc: pc[:, :, :-1], "shape"),
    (lambda pc: pc.astype(np.int32), "uint8, uint16 or uint32"),
    (lambda pc: pc.astype(np.uint64), "uint8, uint16 or uint32"),
    (lambda pc: pc + np.uint16(1), "sum to"),
])
def test_malformed_prompt_counts_are_named(change, message):
    _, counted = both(*CONFIGS[0])
    with pytest.raises(TraceError, match=message) as info:
        RoutingTrace(counted.header, counted.prompt_lens, counted.gen_lens, counted.experts,
                     prompt_counts=change(counted.prompt_counts))
    assert "\n" not in str(info.value)


def test_a_prompt_entry_longer_than_its_prompt_is_refused_when_thorough(tmp_path):
    """Counts that sum right but hold one expert more often than the prompt has tokens: a token listed it twice."""
    full, counted = both(*CONFIGS[0])
    pc = counted.prompt_counts.copy()
    pc[1, 0] = 0
    pc[1, 0, 0] = 2  # request 1 has one prompt token, top-2: both picks on expert 0
    odd = RoutingTrace(counted.header, counted.prompt_lens, counted.gen_lens, counted.experts, prompt_counts=pc)
    with pytest.raises(TraceError, match="exceeds its prompt"):
        load_trace(save_trace(odd, tmp_path / "odd.npz"))


def test_what_needs_prompt_rows_refuses_a_counted_trace():
    from sim.plan_verify import verify_assignments
    from sim.policies import PlanContext, make_policy
    from sim.specs import ModelSpec, load_system
    from sim.workload import Workload

    _, counted = both(*CONFIGS[0])
    for call in (lambda: counted.prefill_rows(np.arange(2)), lambda: trace_stats(counted)):
        with pytest.raises(TraceError, match="per-request counts"):
            call()
    spec = ModelSpec(name="m", num_layers=4, hidden_size=64, vocab_size=97, num_attention_heads=4, num_kv_heads=2,
                     head_dim=16, num_experts=8, top_k=2, expert_intermediate_size=48)
    wl = Workload(counted.prompt_lens.astype(np.int64), counted.gen_lens.astype(np.int64))
    plan = make_policy("gpu-only").build(PlanContext(spec, load_system("a100-80g-8452y"), wl, counted))
    with pytest.raises(SimInputError, match="per-request counts"):
        verify_assignments(plan, counted)


def test_eas_and_hit_ratios_read_counts_alike():
    full, counted = both(*CONFIGS[2])
    a = eas_map(full, full.request_features, clusters=3, sample=6, resident=16)
    b = eas_map(counted, counted.request_features, clusters=3, sample=6, resident=16)
    np.testing.assert_array_equal(a.ranking, b.ranking)
    hot = oracle_map(full, 16)
    assert hit_ratio(full, hot) == hit_ratio(counted, hot)


def test_simulation_synthesises_counted_prompts_with_the_full_traces_results():
    """`simulate` draws the counted form; a full trace of the same draws, passed in, gives the same results."""
    m = resolve_model("mixtral-8x7b")
    _, counted, _ = resolve_routing(m, 24, 40, 6, None, "zipf:1.0", 3, prompt_counts=True)
    _, full, _ = resolve_routing(m, 24, 40, 6, None, "zipf:1.0", 3)
    assert not counted.has_prompt_rows and full.has_prompt_rows
    for policy in ("coxmoe", "moe-lightning", "fiddler"):
        drawn = simulate("mixtral-8x7b", "a100-80g-8452y", policy, batch=24, prompt_len=40, gen_len=6,
                         routing="zipf:1.0", seed=3)
        given = simulate("mixtral-8x7b", "a100-80g-8452y", policy, trace=full)
        assert (drawn.throughput_tok_s, drawn.num_ops, drawn.events) == (given.throughput_tok_s, given.num_ops,
                                                                        given.events)


def test_the_disk_cache_keys_the_two_forms_apart():
    cfg, prompts, gens = CONFIGS[0]
    p, g = np.array(prompts), np.array(gens)
    assert cache_key(cfg, p, g) != cache_key(cfg, p, g, prompt_counts=True)


def test_the_executor_and_trace_commands_read_a_counted_file_as_such(tmp_path, capsys):
    """A counted trace file (as a sweep's cache writes them): `execute` refuses it in one line before planning,
    `eas` probes its prompt counts, `trace validate` reports its routed tokens and its form."""
    from experiments.cli import main

    cfg = SynthConfig("mixtral-8x7b", 1, 8, 2, "zipf:1.0", 0.0, 0)  # as `--layers 1` cuts the model
    counted = generate_trace(cfg, np.full(4, 5), np.full(4, 3), prompt_counts=True)
    path = save_trace(counted, tmp_path / "counted.npz")
    code = main(["execute", "--model", "mixtral-8x7b", "--layers", "1", "--policy", "cpu-only", "--trace", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "the executor needs every prompt token's experts" in err, err
    assert main(["trace", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "28 routed tokens (prompts as per-request counts: 8 generated-token rows)" in out, out
    assert main(["eas", "--trace", str(path), "--vram-experts", "2", "--sample", "2", "--out",
                 str(tmp_path / "map.npz")]) == 0


def test_prompt_counting_keeps_its_keys_and_bins_bounded(monkeypatch):
    """Many short prompts of a wide model: a counting group holds at most GROUP_BINS (request, expert) bins, so the
    int32 keys cannot overflow, and the counts equal the full trace's."""
    monkeypatch.setattr(synth._PromptCounts, "GROUP_BINS", 64)  # 4 requests of 16 experts a group
    full, counted = both(SynthConfig("m", 2, 16, 2, "uniform", 0.0, 5), [1] * 23, [2] * 23)
    for r in range(23):
        np.testing.assert_array_equal(counted.prompt_counts[r].astype(np.int64), full.prefill_counts(np.array([r])))
    pc = synth._PromptCounts(np.full(10, 1), np.full(10, 2), 1, 16, 2)
    assert max(hi - lo for lo, hi, *_ in pc.groups) == 4


def test_a_counted_prompt_longer_than_any_request_may_hold_is_refused():
    _, counted = both(*CONFIGS[0])
    lens = counted.prompt_lens.astype(np.int64).copy()
    lens[0] = 1 << 25
    pc = counted.prompt_counts.astype(np.uint32)
    pc[0, :, 0] += np.uint32(((1 << 25) - int(counted.prompt_lens[0])) * 2)
    with pytest.raises(TraceError, match="16,777,216"):
        RoutingTrace(counted.header, lens, counted.gen_lens, counted.experts, prompt_counts=pc)


def test_the_count_table_is_sized_before_it_is_made():
    """A batch whose prompt table alone would pass the memory limit is refused before anything is allocated."""
    from traces.limits import ResourceLimitError

    cfg = SynthConfig("m", 48, 128, 8, "uniform", 0.0, 0)
    with pytest.raises(ResourceLimitError, match="routing trace"):
        generate_trace(cfg, np.full(3_000_000, 1), np.full(3_000_000, 1), prompt_counts=True)
