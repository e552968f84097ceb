"""Topic-mixture synthesis, expert-aware stratification, hot-expert map files and the coxmoe hot_map option."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from experiments.cli import main
from sim.errors import SimInputError
from sim.plan import OpKind, Payload, Phase, Stream, member_ops
from sim.policies import PlanContext, make_policy
from traces import SynthConfig, generate_trace, load_trace, save_trace
from traces.eas import (
    HotExpertMap,
    cluster_requests,
    eas_map,
    hit_ratio,
    load_map,
    oracle_map,
    pick_prototypes,
    random_map,
    save_map,
    stratified_sample,
)
from traces.errors import TraceError


@pytest.fixture(scope="module")
def topic_trace():
    """64 experts, top-4, 8 topics that each prefer different experts; 400 requests of 12 prompt tokens."""
    cfg = SynthConfig("topical", num_layers=3, num_experts=64, top_k=4, routing="zipf:1.0", seed=3, topics=8,
                      topic_shift=0.8, feature_dim=16, feature_noise=0.3)
    return generate_trace(cfg, np.full(400, 12), np.full(400, 4))


def test_stratified_sample_is_proportional_and_distinct():
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    picked = stratified_sample(labels, 10, np.random.default_rng(0))
    assert picked.size == np.unique(picked).size == 10
    assert np.bincount(labels[picked], minlength=3).tolist() == [6, 3, 1]
    again = stratified_sample(labels, 10, np.random.default_rng(0))
    assert np.array_equal(picked, again)
    # Remainders: 7 of [50, 30, 20] -> exact shares 3.5, 2.1, 1.4 -> floors 3, 2, 1, the spare goes to cluster 0.
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    assert np.bincount(labels[stratified_sample(labels, 7, np.random.default_rng(1))]).tolist() == [4, 2, 1]
    with pytest.raises(TraceError, match="probe sample"):
        stratified_sample(labels, 101, np.random.default_rng(0))


def test_topic_mixture_features_recover_topics(topic_trace):
    feats = topic_trace.request_features
    assert feats.shape == (400, 16) and feats.dtype == np.float32
    cfg = SynthConfig("topical", 3, 64, 4, "zipf:1.0", seed=3, topics=8, topic_shift=0.8, feature_dim=16,
                      feature_noise=0.3)
    from traces.synth import popularity_matrix, topic_mixture

    _, topic_of, same = topic_mixture(cfg, popularity_matrix("zipf:1.0", 3, 64, 3), 400)
    assert np.array_equal(same, feats)  # the trace's features are the mixture's, deterministically
    labels = cluster_requests(feats, 8, seed=0)
    assert adjusted_rand_score(topic_of, labels) > 0.95


def test_topics_route_differently(topic_trace):
    """Requests of different topics prefer different experts: per-cluster hot sets overlap far less than fully."""
    labels = cluster_requests(topic_trace.request_features, 8, seed=0)
    hot = []
    for c in range(2):
        rows = topic_trace.prefill_rows(np.flatnonzero(labels == c))
        hot.append(set(np.argsort(-topic_trace.expert_counts(rows)[0])[:8].tolist()))
    assert len(hot[0] & hot[1]) < 6


def test_eas_beats_random_and_nears_the_oracle(topic_trace):
    resident = 16
    eas = hit_ratio(topic_trace, eas_map(topic_trace, topic_trace.request_features, clusters=8, sample=64,
                                         resident=resident, seed=0))
    rand = hit_ratio(topic_trace, random_map(topic_trace, resident, seed=0))
    oracle = hit_ratio(topic_trace, oracle_map(topic_trace, resident))
    assert rand == pytest.approx(resident / 64, abs=0.05)  # a random quarter of the experts serves about a quarter
    assert eas > rand + 0.05
    assert oracle - 0.03 <= eas <= oracle + 1e-12


def test_hit_ratio_counts_resident_assignments(topic_trace):
    full = HotExpertMap("t", np.tile(np.arange(64, dtype=np.int32), (3, 1)), np.zeros((3, 64)), resident=64)
    none = HotExpertMap("t", full.ranking, full.load, resident=0)
    assert hit_ratio(topic_trace, full) == 1.0 and hit_ratio(topic_trace, none) == 0.0


def test_traces_keep_request_features(topic_trace, tmp_path):
    path = save_trace(topic_trace, tmp_path / "t.npz")
    back = load_trace(path)
    assert np.array_equal(back.request_features, topic_trace.request_features)
    plain = generate_trace(SynthConfig("p", 2, 8, 2, "zipf:1.0", seed=1), np.full(5, 3), np.full(5, 2))
    assert plain.request_features is None
    with pytest.raises(TraceError, match="request_features"):
        type(plain)(plain.header, plain.prompt_lens, plain.gen_lens, plain.experts,
                    request_features=np.zeros((4, 3), np.float32))


def test_map_round_trip_and_malformed_maps(topic_trace, tmp_path):
    hot = eas_map(topic_trace, topic_trace.request_features, clusters=4, sample=20, resident=5, seed=2)
    back = load_map(save_map(hot, tmp_path / "hot.npz"))
    assert np.array_equal(back.ranking, hot.ranking) and back.resident == 5 and back.extra["sample"] == 20
    with pytest.raises(TraceError, match="permutation"):
        HotExpertMap("x", np.zeros((2, 4), np.int32), np.zeros((2, 4)), resident=1)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="cannot read"):
        load_map(bad)
    with pytest.raises(TraceError, match="not found"):
        load_map(tmp_path / "missing.npz")
    # ids beyond int32 wrapped silently into a valid permutation (2^32 + 3 -> 3)
    with np.load(save_map(hot, tmp_path / "ok.npz"), allow_pickle=False) as z:
        arrays = dict(z)
    wrapped = arrays["ranking"].astype(np.int64)
    wrapped[0, wrapped[0].argmax()] += 2**32
    np.savez(tmp_path / "wrapped.npz", **{**arrays, "ranking": wrapped})
    with pytest.raises(TraceError, match="ranking ids must be expert ids"):
        load_map(tmp_path / "wrapped.npz")


def test_eas_cli_writes_a_map_and_rejects_bad_input(topic_trace, tmp_path, capsys):
    trace = save_trace(topic_trace, tmp_path / "t.npz")
    out = tmp_path / "hot.npz"
    assert main(["eas", "--trace", str(trace), "--vram-experts", "8", "--sample", "32", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert load_map(out).resident == 8
    # scored on the requests the probe did not see: the rows of every other request, checked by hand
    probed = set(pick_prototypes(topic_trace.request_features, topic_trace.num_requests, clusters=8, sample=32,
                                 seed=0).tolist())
    rows = np.concatenate([np.arange(o, o + n) for r, (o, n) in enumerate(zip(
        topic_trace.token_offsets[:-1], topic_trace.routed_lens, strict=True)) if r not in probed])
    unseen = topic_trace.num_requests - len(probed)
    assert f"expert hit ratio on the {unseen} requests not probed {hit_ratio(topic_trace, load_map(out), rows):.3f}" \
        in printed
    assert main(["eas", "--trace", str(trace), "--vram-experts", "65", "-o", str(tmp_path / "x.npz")]) == 2
    assert "exceeds" in capsys.readouterr().err and not (tmp_path / "x.npz").exists()
    assert main(["eas", "--trace", str(tmp_path / "nope.npz"), "--vram-experts", "2", "-o", str(out)]) == 2
    capsys.readouterr()
    # options a --trace probe would ignore are refused
    assert main(["eas", "--trace", str(trace), "--vram-experts", "8", "--embedder", "x", "-o", str(out)]) == 2
    assert "--embedder embeds --prompts" in capsys.readouterr().err
    assert main(["eas", "--trace", str(trace), "--vram-experts", "8", "--max-prompt-tokens", "8", "-o", str(out)]) == 2
    assert "--max-prompt-tokens truncates" in capsys.readouterr().err


def _ctx(tiny_model, paper_system, trace):
    from sim.api import resolve_routing

    wl, tr, _ = resolve_routing(tiny_model, 32, 16, 4, trace, "uniform", 0, 0.0)
    return PlanContext(tiny_model, paper_system, wl, tr)


def test_coxmoe_hot_map_sets_the_resident_experts(tiny_model, paper_system, tmp_path):
    L, E, k = tiny_model.num_moe_layers, tiny_model.num_experts, tiny_model.top_k
    cfg = SynthConfig(tiny_model.name, L, E, k, "zipf:2.0", seed=0)
    trace = generate_trace(cfg, np.full(32, 16), np.full(32, 4))
    ctx = _ctx(tiny_model, paper_system, trace)
    cold_first = HotExpertMap(tiny_model.name, np.argsort(sum(trace.phase_counts), axis=1, kind="stable")
                              .astype(np.int32), np.zeros((L, E)), resident=1)
    path = save_map(cold_first, tmp_path / "cold.npz")
    opts = {"resident_experts": "1", "split": "cpu"}
    plan = make_policy("coxmoe", {**opts, "hot_map": str(path)}).build(ctx)
    resident_experts = {(op.layer, m.expert) for op in plan.ops if op.kind is OpKind.EXPERT
                        and op.stream is Stream.GPU for m in member_ops(op)}
    # each layer's one resident expert is the map's first (the trace's coldest, which still gets tokens here)
    assert tiny_model.first_dense_layers == 0
    assert resident_experts == {(li, int(cold_first.ranking[li, 0])) for li in range(L)}
    hot_plan = make_policy("coxmoe", {**opts, "stratify": "on"}).build(ctx)
    gpu_tokens = [sum(op.tokens for op in p.ops if op.kind is OpKind.EXPERT and op.stream is Stream.GPU)
                  for p in (plan, hot_plan)]
    assert gpu_tokens[0] < gpu_tokens[1]


def test_with_a_hot_map_the_search_prices_experts_from_the_map_not_the_run(tiny_model, paper_system, tmp_path):
    """The search knows the map, not the run's routing: its expected counts per expert follow the map's probe load
    (a random map's, all zero, as uniform), each layer's routed tokens unchanged; without a map, the run's own."""
    from sim.policies.coxmoe import CoxMoeOptions, _Model, _spread

    assert _spread(np.array([[3.0, 1.0], [0.0, 0.0]]), np.array([8.0, 6.0])).tolist() == [[6.0, 2.0], [3.0, 3.0]]
    L, E, k = tiny_model.num_moe_layers, tiny_model.num_experts, tiny_model.top_k
    trace = generate_trace(SynthConfig(tiny_model.name, L, E, k, "zipf:2.0", seed=0), np.full(32, 16), np.full(32, 4))
    ctx = _ctx(tiny_model, paper_system, trace)
    oracle = _Model(ctx, CoxMoeOptions())
    path = save_map(HotExpertMap(tiny_model.name, np.tile(np.arange(E, dtype=np.int32), (L, 1)), np.zeros((L, E)),
                                 resident=1, method="random"), tmp_path / "random.npz")
    mapped = _Model(ctx, CoxMoeOptions(hot_map=str(path)))
    for ours, theirs in ((mapped.decode_counts, oracle.decode_counts), (mapped.prefill_counts, oracle.prefill_counts)):
        assert np.allclose(ours.sum(axis=1), theirs.sum(axis=1))  # the same tokens per layer
        assert np.allclose(ours, ours[:, :1])  # spread evenly: the random map knows no load
        assert not np.allclose(theirs, theirs[:, :1])  # the run's own routing is skewed (Zipf 2)


@pytest.mark.parametrize("bad", [-5.0, float("nan"), float("inf")])
def test_a_hot_map_load_must_be_finite_and_non_negative(bad):
    load = np.ones((2, 4))
    load[0, 0] = bad
    with pytest.raises(TraceError, match="load must be finite and non-negative"):
        HotExpertMap("m", np.tile(np.arange(4, dtype=np.int32), (2, 1)), load, resident=1)


def test_coxmoe_hot_map_shape_must_match_the_model(tiny_model, paper_system, tmp_path):
    wrong = HotExpertMap("x", np.tile(np.arange(3, dtype=np.int32), (1, 1)), np.zeros((1, 3)), resident=1)
    path = save_map(wrong, tmp_path / "wrong.npz")
    L, E, k = tiny_model.num_moe_layers, tiny_model.num_experts, tiny_model.top_k
    trace = generate_trace(SynthConfig(tiny_model.name, L, E, k, seed=0), np.full(32, 16), np.full(32, 4))
    with pytest.raises(SimInputError, match="hot-expert map"):
        make_policy("coxmoe", {"hot_map": str(path)}).build(_ctx(tiny_model, paper_system, trace))


def test_hit_ratio_study_runs_one_small_model():
    from experiments.hit_ratio_study import study_model
    from experiments.tables import markdown_table

    hits, runs = study_model("mixtral-8x7b", "table:mixtral-8x7b", batch=48, seeds=1, throughput_sample=8,
                             decode_sample=2)
    by = {(h["method"], h["sample"]): h["hit_ratio"] for h in hits}
    oracle = by[("oracle", 48)]
    assert all(v <= oracle + 1e-12 for v in by.values())
    assert by[("random", 0)] < oracle
    assert {r["method"] for r in runs} == {"oracle", "random", "eas", "uniform", "eas+ema:0.3:4"}
    assert all(r["throughput_tok_s"] > 0 for r in runs)
    import pandas as pd

    table = markdown_table(pd.DataFrame(runs))
    assert table.count("\n") == len(runs) + 1 and table.startswith("| model | method |")


def _shifting_trace(model, requests=16, prompt=8, gen=6):
    """Prompts route to experts (0, 1) at every layer; generated tokens to (6, 7): the hot set moves in decode."""
    from traces.format import RoutingTrace, TraceHeader

    L = model.num_moe_layers
    rows = []
    for _ in range(requests):
        rows += [[0, 1]] * prompt + [[6, 7]] * (gen - 1)
    experts = np.repeat(np.array(rows, dtype=np.uint8)[:, None, :], L, axis=1)
    header = TraceHeader(model.name, L, model.num_experts, model.top_k, "test:shifting")
    return RoutingTrace(header, np.full(requests, prompt, np.int32), np.full(requests, gen, np.int32), experts)


def test_restratify_follows_a_moving_hot_set(tiny_model, paper_system, tmp_path):
    trace = _shifting_trace(tiny_model)
    wl_ctx = _ctx_exact(tiny_model, paper_system, trace)
    L, E = tiny_model.num_moe_layers, tiny_model.num_experts
    prefill_hot = HotExpertMap("tiny", np.tile(np.arange(E, dtype=np.int32), (L, 1)), np.zeros((L, E)), 2)
    path = save_map(prefill_hot, tmp_path / "prefill.npz")
    base = {"resident_experts": "2", "split": "cpu", "hot_map": str(path), "prefill_micro_batch": "0",
            "decode_micro_batch": "0", "prefill_placement": "ggg", "decode_placement": "ggg"}
    static = make_policy("coxmoe", base).build(wl_ctx)
    dynamic = make_policy("coxmoe", {**base, "restratify": "ema:1:1"}).build(wl_ctx)

    def decode_gpu_tokens(plan):
        return sum(op.tokens for op in plan.ops if op.kind is OpKind.EXPERT and op.stream is Stream.GPU
                   and op.step > 0)

    assert decode_gpu_tokens(static) == 0  # experts 6 and 7 never become resident
    # Step 1 still runs with (0, 1); from step 2 on, (6, 7) are resident: every later decode token hits the GPU.
    later_steps = trace.header.num_layers * 16 * 2 * (trace.gen_lens[0] - 2)
    assert decode_gpu_tokens(dynamic) == later_steps
    swaps = [op for op in dynamic.ops if op.step == 2 and op.kind is OpKind.COPY
             and op.payload is Payload.EXPERT_WEIGHTS]
    assert len(swaps) == L and all(op.bytes == 2 * tiny_model.expert_bytes for op in swaps)
    assert dynamic.knobs["restratify_swaps"] == 2 * L


def test_restratify_on_a_sample_of_decode_steps_charges_each_re_pick_once():
    """On a sample of decode steps, a re-pick's swap copies carry 1/scale of their bytes for every re-pick boundary
    crossed since the last sampled step, so scaled to all steps each boundary counts once: the sampled throughput
    and PCIe time stay near the full run's (an 8-step sample of 63 had charged a swap at every sampled step,
    scaled 7.9x: -7% throughput, 2.7x the H2D time)."""
    from sim.api import simulate

    opts = {"restratify": "ema:0.5:4", "resident_experts": "4", "decode_placement": "gcg",
            "prefill_placement": "ggg", "decode_micro_batch": "0", "prefill_micro_batch": "32"}
    runs = {n: simulate("mixtral-8x7b", "rtx6000ada-8452y", "coxmoe", batch=64, prompt_len=64, gen_len=64,
                        routing="table:mixtral-8x7b", policy_options=opts, decode_sample=n, keep_plan=True)
            for n in (0, 8)}
    full, sampled = runs[0], runs[8]
    assert full.knobs["restratify_swaps"] > 0
    # the bookkeeping runs over every step, so a sample re-picks as the full run does: the same swaps
    assert sampled.knobs["restratify_swaps"] == full.knobs["restratify_swaps"]
    assert sampled.throughput_tok_s == pytest.approx(full.throughput_tok_s, rel=0.01)
    assert sampled.busy_s["h2d"] == pytest.approx(full.busy_s["h2d"], rel=0.1)
    # a swap copy fills slots the layer's previous visit used: it starts once that visit's experts are done (it
    # had no dependency without an E_M fetch, and ran steps early)
    plan, rec = full.plan, full.record
    last_expert = {}
    for op in plan.ops:
        if op.kind is OpKind.EXPERT and op.stream is Stream.GPU:
            last_expert[(op.step, op.layer)] = max(last_expert.get((op.step, op.layer), 0), int(rec.end_ns[op.id]))
    swaps_full = [op for op in plan.ops if op.phase is Phase.DECODE and op.payload is Payload.EXPERT_WEIGHTS]
    assert swaps_full and all(rec.start_ns[op.id] >= last_expert[(op.step - 1, op.layer)] for op in swaps_full
                              if (op.step - 1, op.layer) in last_expert)
    plan, m = sampled.plan, sampled.plan.model
    scale = plan.decode_scale
    assert scale > 4  # sampled steps further apart than a re-pick block: each crosses one or more boundaries
    # swap copies are the decode weight copies that are not whole experts (E_M's fetches are): together, the
    # swaps' estimated count for every step at 1/scale of an expert each
    swaps = [op for op in plan.ops if op.phase is Phase.DECODE and op.kind is OpKind.COPY
             and op.payload is Payload.EXPERT_WEIGHTS and op.bytes % m.expert_bytes]
    assert swaps and sum(op.bytes for op in swaps) == pytest.approx(
        sampled.knobs["restratify_swaps"] * m.expert_bytes / scale, rel=1e-6)


def test_restratify_on_a_sample_keeps_its_swaps_out_of_the_prefill():
    """A sampled step carries the swaps of the steps it stands for: step 1 carries none (the full run never swaps at
    it; its copy, which waits only for the prefill's pass over its layer, ran inside the prefill, which is not
    scaled). Found by a conservation audit: with every step re-picking, a 2-step sample of 7 decode steps reported
    47% less decode time than the full run, a 4-step one 24% less, and the prefill moved with the sample. A one-step
    sample's step 1 stands for every step: its swap copies wait for the prefill's end (a review found -62% there)."""
    from sim.api import simulate

    runs = {n: simulate("mixtral-8x7b", "rtx6000ada-8452y", "coxmoe", batch=128, prompt_len=128, gen_len=8,
                        routing="uniform", policy_options={"restratify": "ema:0.5:1", "split": "cpu"},
                        decode_sample=n, keep_plan=True) for n in (0, 1, 2, 4)}
    full = runs[0]
    assert full.knobs["restratify_swaps"] > 0
    for n in (1, 2, 4):
        assert runs[n].prefill_s == full.prefill_s
        assert runs[n].decode_s == pytest.approx(full.decode_s, rel=0.01)
    for n in (2, 4):
        plan = runs[n].plan
        assert not any(op.step == 1 and op.payload is Payload.EXPERT_WEIGHTS for op in plan.ops
                       if op.phase is Phase.DECODE)


def _ctx_exact(model, system, trace):
    from sim.api import resolve_routing

    wl, tr, _ = resolve_routing(model, trace.num_requests, int(trace.prompt_lens[0]), int(trace.gen_lens[0]), trace,
                                "uniform", 0, 0.0)
    return PlanContext(model, system, wl, tr)


@pytest.mark.parametrize("bad", ["ema", "ema:0:1", "ema:0.5:0", "lru:1:1", "ema:x:2"])
def test_restratify_rejects_bad_specs(bad):
    with pytest.raises(SimInputError, match="restratify"):
        make_policy("coxmoe", {"restratify": bad})


def test_request_counts_agree_across_the_two_trace_forms():
    """eas scores the requests it did not probe; a trace with prompts as counts gives the same counts (it fell back
    to the whole trace, probed prompts included)."""
    from traces import SynthConfig, generate_trace
    from traces.eas import request_counts

    cfg = SynthConfig("m", 3, 16, 2, "zipf:1.0", 0.2, 4, topics=3)
    prompts, gens = np.array([5, 3, 7, 2, 6]), np.array([3, 1, 4, 2, 2])
    full = generate_trace(cfg, prompts, gens)
    counted = generate_trace(cfg, prompts, gens, prompt_counts=True)
    some = np.array([0, 2, 4])
    np.testing.assert_array_equal(request_counts(full, some), request_counts(counted, some))
    rows = np.concatenate([np.arange(o, o + n) for o, n in zip(full.token_offsets[some], full.routed_lens[some],
                                                                strict=True)])
    np.testing.assert_array_equal(request_counts(full, some), full.expert_counts(rows))
    hot = oracle_map(full, 4)
    assert hit_ratio(counted, hot, requests=some) == hit_ratio(full, hot, rows=rows)
