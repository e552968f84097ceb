"""Routing trace format v1: round trip, validation errors, synthetic generation, statistics."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from traces import (
    RoutingTrace,
    SynthConfig,
    TraceError,
    TraceHeader,
    generate_trace,
    load_trace,
    popularity_matrix,
    request_lengths,
    save_trace,
    trace_stats,
)
from traces.format import FORMAT_NAME, validate
from traces.stats import lru_hit_rates
from traces.synth import popularity_table


def small_trace(routing="uniform", reuse=0.0, seed=0, requests=6, prompt=5, gen=4, layers=3, experts=8, k=2):
    cfg = SynthConfig("tiny", layers, experts, k, routing, reuse, seed)
    return generate_trace(cfg, np.full(requests, prompt), np.full(requests, gen))


def test_round_trip_preserves_everything(tmp_path):
    tr = small_trace()
    gates = np.full(tr.experts.shape, 0.5, dtype=np.float16)
    tr = RoutingTrace(tr.header, tr.prompt_lens, tr.gen_lens, tr.experts, gates)
    for compress in (False, True):
        path = save_trace(tr, tmp_path / f"t{compress}.npz", compress=compress)
        back = load_trace(path)
        assert back.header == tr.header
        for name in ("prompt_lens", "gen_lens", "experts", "gate_weights"):
            np.testing.assert_array_equal(getattr(back, name), getattr(tr, name))


def test_token_layout_and_counts():
    tr = small_trace(requests=3, prompt=5, gen=4)
    assert tr.num_tokens == 3 * (5 + 4 - 1)
    rows = tr.prefill_rows(np.array([1, 2]))
    np.testing.assert_array_equal(rows, np.r_[8:13, 16:21])
    np.testing.assert_array_equal(tr.decode_rows(1, np.arange(3)), [5, 13, 21])
    np.testing.assert_array_equal(tr.decode_rows(3, np.arange(3)), [7, 15, 23])
    counts = tr.expert_counts(np.arange(tr.num_tokens))
    assert counts.shape == (3, 8) and (counts.sum(axis=1) == 2 * tr.num_tokens).all()


def test_generation_is_deterministic_and_seed_dependent():
    a, b, c = small_trace(seed=3), small_trace(seed=3), small_trace(seed=4)
    np.testing.assert_array_equal(a.experts, b.experts)
    assert not np.array_equal(a.experts, c.experts)


def test_byte_and_bit_masks_of_chosen_experts_give_the_same_trace(monkeypatch):
    """Top-k > 4 keeps a per-row set of chosen experts: bytes for few experts, packed bits for many. The two
    consume the same random numbers and decide the same redraws, so the trace is the same either way (and is the
    trace the bit masks always gave: synthesis bytes do not move with the representation)."""
    import traces.synth as synth

    kwargs = dict(routing="zipf:1.0", requests=40, prompt=30, gen=6, layers=3, experts=128, k=8)
    as_bytes = small_trace(**kwargs)
    monkeypatch.setattr(synth, "TAKEN_BYTES_PER_ROW", 0)
    as_bits = small_trace(**kwargs)
    np.testing.assert_array_equal(as_bytes.experts, as_bits.experts)


def test_topk_ids_are_distinct_and_in_range():
    tr = small_trace("zipf:2.0", requests=50, prompt=20, gen=10, layers=4, experts=16, k=6)
    srt = np.sort(tr.experts, axis=-1)
    assert (np.diff(srt.astype(int), axis=-1) > 0).all()
    assert tr.experts.max() < 16


def test_table_routing_reproduces_the_measured_ranking():
    cfg = SynthConfig("mixtral-8x7b", 32, 8, 2, "table:mixtral-8x7b", 0.0, 0)
    tr = generate_trace(cfg, np.full(200, 100), np.full(200, 1))
    shares = tr.expert_counts(np.arange(tr.num_tokens)) / (2 * tr.num_tokens)
    table = popularity_table("mixtral-8x7b")
    # The draw weights are solved so that two draws without replacement select each expert with its measured
    # share (drawn with the shares as weights, the hottest came out 0.0075 low on average; 20,000 tokens a layer
    # give a share's standard error about 0.002).
    hottest_match = (shares.argmax(axis=1) == table.argmax(axis=1)).mean()
    assert hottest_match > 0.8
    assert np.abs(shares - table).max() < 0.012
    assert abs(float((shares.max(axis=1) - table.max(axis=1)).mean())) < 0.002


def test_zipf_is_permuted_per_layer_and_skewed():
    p = popularity_matrix("zipf:1.2", 6, 32, seed=1)
    assert np.allclose(p.sum(axis=1), 1)
    assert len({int(row.argmax()) for row in p}) > 1
    assert p.max() > 5 / 32


def test_reuse_probability_raises_reuse_and_lru_hits():
    plain = trace_stats(small_trace(reuse=0.0, requests=40, prompt=30, gen=30))
    sticky = trace_stats(small_trace(reuse=0.6, requests=40, prompt=30, gen=30))
    assert np.mean(sticky.reuse_rate) > np.mean(plain.reuse_rate) + 0.3
    assert np.mean(sticky.lru_hit_rate, axis=0)[1] > np.mean(plain.lru_hit_rate, axis=0)[1] + 0.3


def test_lru_hit_rate_on_a_hand_made_sequence():
    # One request, one layer, top-1 over 3 experts: accesses 0 1 0 2 1 0.
    ex = np.array([0, 1, 0, 2, 1, 0], dtype=np.uint8).reshape(6, 1, 1)
    tr = RoutingTrace(TraceHeader("hand", 1, 3, 1), np.array([6]), np.array([1]), ex)
    hits, tokens = lru_hit_rates(tr)
    assert tokens == 6
    # Stack distances: inf, inf, 1, inf, 2, 2  -> hits at c=1: 0, c=2: 1 (the 0 after 1), c=3: 3.
    np.testing.assert_allclose(hits[0], [0 / 6, 1 / 6, 3 / 6])


def test_stats_on_uniform_routing():
    st = trace_stats(small_trace(requests=100, prompt=50, gen=2, experts=8))
    assert abs(np.mean(st.entropy_bits) - 3.0) < 0.02
    # A cache of every expert misses only the first touch of each expert: 8 of 51 x 2 accesses per request.
    assert st.lru_hit_rate[0][-1] == pytest.approx(1 - 8 / 102, abs=0.005)
    d = st.to_dict()
    assert len(d["mean_lru_hit_rate"]) == 8


@pytest.mark.parametrize("spec, expect", [("7", [7, 7]), ("fixed:3", [3, 3])])
def test_fixed_lengths(spec, expect):
    assert request_lengths(spec, 2, np.random.default_rng(0), "x").tolist() == expect


def test_distributed_lengths_stay_in_bounds():
    rng = np.random.default_rng(0)
    u = request_lengths("uniform:10:20", 1000, rng, "x")
    assert u.min() >= 10 and u.max() <= 20
    ln = request_lengths("lognormal:100:0.5:300", 1000, rng, "x")
    assert ln.min() >= 1 and ln.max() <= 300 and 80 < np.median(ln) < 120


def test_length_presets_reproduce_the_statistics_they_were_solved_from():
    """Each preset's lognormal, drawn, gives back its two published statistics (within sampling error)."""
    from traces.length_presets import PRESETS, expected_max_z

    rng = np.random.default_rng(0)
    mt = request_lengths("preset:mtbench-prompt", 200_000, rng, "x")
    assert mt.mean() == pytest.approx(77, rel=0.03)  # mean 77
    assert 0.001 < (mt == 418).mean() < 0.01  # the cap (the padding length) clips only the far tail
    maxima = [request_lengths("preset:mtbench-prompt", 80, np.random.default_rng(s), "x").max() for s in range(300)]
    assert 330 < np.median(maxima) <= 418  # the longest of 80 questions: 418 (capped; about half the draws hit it)
    assert expected_max_z(80) == pytest.approx(2.427, abs=0.01)  # E[max of 80 N(0,1)] = 2.427
    for part, median, p90 in (("prompt", 1730, 5696), ("output", 415, 834)):
        x = request_lengths(f"preset:sharegpt4-{part}", 200_000, rng, "x")
        assert np.median(x) == pytest.approx(median, rel=0.02) and np.quantile(x, 0.9) == pytest.approx(p90, rel=0.03)
    assert all(p.source and p.statistics for p in PRESETS.values())  # every preset says where it comes from


@pytest.mark.parametrize("spec", ["-3", "fixed:0", "uniform:5:2", "normal:3", "abc", "preset:nope", "preset:"])
def test_bad_length_specs(spec):
    with pytest.raises(TraceError):
        request_lengths(spec, 4, np.random.default_rng(0), "--prompt-len")


@pytest.mark.parametrize("routing", ["zipf:x", "zipf:-1", "table:nope", "gaussian"])
def test_bad_routing_specs(routing):
    with pytest.raises(TraceError):
        small_trace(routing)


def test_table_shape_must_match_the_model():
    with pytest.raises(TraceError, match="32 layers x 8 experts"):
        popularity_matrix("table:mixtral-8x7b", 27, 64, 0)
    with pytest.raises(TraceError, match="32 layers x 8 experts"):
        popularity_matrix("table:mixtral-8x7b", 40, 8, 0)
    first = popularity_matrix("table:mixtral-8x7b", 2, 8, 0)  # a model cut to its first layers
    np.testing.assert_array_equal(first, popularity_matrix("table:mixtral-8x7b", 32, 8, 0)[:2])


# ---- malformed files --------------------------------------------------------------------------------------
def _write(path, header=None, **arrays):
    tr = small_trace()
    meta = {"format": FORMAT_NAME, "version": 1, "model": "tiny", "num_layers": 3, "num_experts": 8, "top_k": 2,
            "source": "test"}
    meta.update(header or {})
    data = {"header": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), "prompt_lens": tr.prompt_lens,
            "gen_lens": tr.gen_lens, "experts": tr.experts}
    data.update(arrays)
    np.savez(path, **{k: v for k, v in data.items() if v is not None})
    return path


def test_expert_id_out_of_range(tmp_path):
    tr = small_trace()
    bad = tr.experts.copy()
    bad[3, 1, 0] = 8
    with pytest.raises(TraceError, match="expert id 8 out of range"):
        load_trace(_write(tmp_path / "t.npz", experts=bad))


def test_wrong_version(tmp_path):
    with pytest.raises(TraceError, match="unsupported trace version 2"):
        load_trace(_write(tmp_path / "t.npz", header={"version": 2}))


def test_truncated_file(tmp_path):
    path = _write(tmp_path / "t.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace(path)


def test_not_an_npz(tmp_path):
    path = tmp_path / "t.npz"
    path.write_text("hello")
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace(path)


class _Unpickled:
    """An object whose unpickling makes a folder: a loader that unpickles it leaves the trace."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("member", ["header", "experts", "prompt_lens", "prompt_counts", "gate_weights"])
def test_pickled_arrays_are_refused(tmp_path, member):
    """A complete trace but for one member stored as a pickled object array: refused as such, never unpickled
    (an archive of the header alone would be refused as incomplete whatever the loader did with pickles)."""
    marker = tmp_path / "unpickled"
    path = _write(tmp_path / "t.npz")
    with np.load(path) as archive:
        members = dict(archive)
    members[member] = np.array([_Unpickled(marker)] * 2, dtype=object)
    np.savez(path, **members)
    with pytest.raises(TraceError, match=f"array {member}.npy holds Python objects"):
        load_trace(path)
    assert not marker.exists()


def test_shape_and_length_mismatches(tmp_path):
    tr = small_trace()
    with pytest.raises(TraceError, match="expected"):
        load_trace(_write(tmp_path / "a.npz", experts=tr.experts[:-1]))
    with pytest.raises(TraceError, match=">= 1"):
        load_trace(_write(tmp_path / "b.npz", gen_lens=np.zeros_like(tr.gen_lens)))
    with pytest.raises(TraceError, match="unsigned"):
        load_trace(_write(tmp_path / "c.npz", experts=tr.experts.astype(np.float32)))
    with pytest.raises(TraceError, match="missing array"):
        load_trace(_write(tmp_path / "d.npz", experts=None))
    with pytest.raises(TraceError, match="not a cox-moe routing trace"):
        load_trace(_write(tmp_path / "e.npz", header={"format": "other"}))


def test_duplicate_expert_in_a_token(tmp_path):
    tr = small_trace(k=3)
    bad = tr.experts.copy()
    bad[0, 0, 1] = bad[0, 0, 0]
    loose = RoutingTrace(tr.header, tr.prompt_lens, tr.gen_lens, bad)  # construction skips the O(T k^2) check
    with pytest.raises(TraceError, match="same expert twice"):
        validate(loose)
    np.savez(tmp_path / "dup.npz", header=np.frombuffer(json.dumps(tr.header.to_json()).encode(), dtype=np.uint8),
             prompt_lens=tr.prompt_lens, gen_lens=tr.gen_lens, experts=bad)
    with pytest.raises(TraceError, match="same expert twice"):
        load_trace(tmp_path / "dup.npz")


def test_save_is_atomic_and_checks_suffix(tmp_path):
    with pytest.raises(TraceError, match=".npz"):
        save_trace(small_trace(), tmp_path / "t.parquet")
    save_trace(small_trace(), tmp_path / "t.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]


@pytest.mark.parametrize("table_bytes", [64 << 20, 0])  # per-request table kept, and the direct count
def test_prefill_counts_equal_counting_the_prompt_rows(monkeypatch, table_bytes):
    import traces.format as trace_format

    monkeypatch.setattr(trace_format, "REQUEST_TABLE_BYTES", table_bytes)
    lens = np.array([5, 1, 40_000, 7, 3, 12])  # one prompt longer than a counting group
    trace = generate_trace(SynthConfig("m", 3, 16, 2, routing="zipf:1.0", seed=2), lens, np.full(6, 4))
    rng = np.random.default_rng(0)
    for _ in range(10):
        requests = rng.permutation(6)[: rng.integers(1, 7)]
        assert (trace.prefill_counts(requests) == trace.expert_counts(trace.prefill_rows(requests))).all()
    prompt, generated = trace.phase_counts
    every_row = trace.expert_counts(np.arange(trace.num_tokens))
    assert (prompt == trace.expert_counts(trace.prefill_rows(np.arange(6)))).all()
    assert (prompt + generated == every_row).all()


def test_count_tables_take_the_narrowest_type_that_holds_their_counts():
    from traces.format import count_dtype

    assert [count_dtype(b) for b in (0, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32)] == [
        np.uint8, np.uint8, np.uint16, np.uint16, np.uint32, np.uint32, np.int64]


@pytest.mark.parametrize("longest, dtype", [(30, np.uint8), (300, np.uint16)])
def test_a_narrow_prefill_table_fits_where_int32_would_not(monkeypatch, longest, dtype):
    """A request's count of one expert is at most its prompt length times top-k, so the per-request table is
    kept in that many bits; a batch whose int32 table would pass the budget keeps one (B=4096 Qwen3 at 16 bits)
    and counts the same."""
    import traces.format as trace_format

    lens = np.array([5, 1, longest, 7, 3, 12] * 4)
    trace = generate_trace(SynthConfig("m", 3, 16, 2, routing="zipf:1.0", seed=2), lens, np.full(lens.size, 4))
    monkeypatch.setattr(trace_format, "REQUEST_TABLE_BYTES", lens.size * 3 * 16 * np.dtype(dtype).itemsize)
    for requests in (np.array([3, 0, 17]), np.arange(lens.size)):
        assert (trace.prefill_counts(requests) == trace.expert_counts(trace.prefill_rows(requests))).all()
    table = trace.__dict__["_prefill_counts_table"]
    assert table.dtype == dtype and table.shape == (lens.size, 3, 16)
    prompt, _ = trace.phase_counts
    assert prompt.dtype == np.int64 and (prompt == trace.expert_counts(trace.prefill_rows(np.arange(lens.size)))).all()


@pytest.mark.parametrize("num_experts", [2, 8, 64, 128, 256])
def test_uniform_inverse_cdf_shortcut_gives_the_guide_tables_ids(num_experts):
    """Uniform popularity over a power-of-two number of experts takes floor(u E); the guide table and its
    fix-ups must give the same id for every draw, including draws on and just below each CDF step."""
    from traces.synth import _InverseCdf

    steps = np.arange(num_experts + 1, dtype=np.float32) / np.float32(num_experts)
    below = np.nextafter(steps, np.float32(0))
    above = np.nextafter(steps, np.float32(1))
    rng = np.random.default_rng(7)
    u = np.concatenate([steps[:-1], below[1:], above[:-1], rng.random(100_000, dtype=np.float32),
                        np.array([np.nextafter(np.float32(1), np.float32(0))])]).astype(np.float32)
    shortcut = _InverseCdf(np.full(num_experts, 1.0 / num_experts))
    assert shortcut.linear
    guided = _InverseCdf(np.full(num_experts, 1.0 / num_experts))
    guided.linear = False
    ids = shortcut(u)
    assert ids.dtype == guided(u).dtype
    np.testing.assert_array_equal(ids, guided(u))
    assert ids.min() == 0 and ids.max() == num_experts - 1


def _skewed_popularities():
    from traces.synth import popularity_table

    rng = np.random.default_rng(11)
    zipf = [1.0 / np.arange(1, e + 1) ** a for e, a in ((8, 0.5), (64, 1.0), (128, 1.0), (160, 1.2), (384, 0.8))]
    with_zeros = rng.random(64)
    with_zeros[[0, 5, 6, 7, 40, 63]] = 0.0  # zero-popularity experts: repeated CDF values
    table = popularity_table("mixtral-8x7b")
    return [*zipf, rng.dirichlet(np.full(128, 0.3)), with_zeros, *table[:4], 1.0 / np.arange(1, 257) ** 3.0]


@pytest.mark.parametrize("index", range(12))
def test_one_step_inverse_cdf_gives_the_guide_tables_ids(index):
    """The one-step table (one look-up, one comparison) must give the first id whose CDF exceeds the draw, as
    the guide table with its fix-up loop does, for every draw: on, just below and just above each CDF step and
    each bucket edge, and random ones; a table too skewed for 2^16 buckets keeps the loop."""
    from traces.synth import ONE_STEP_BUCKETS_MAX, _InverseCdf

    probs = _skewed_popularities()[index]
    draw = _InverseCdf(probs)
    loop = _InverseCdf(probs)
    loop.one_step_tried = True  # never builds the one-step table: the guide table and its fix-up loop
    cdf = draw.cdf
    edges = np.arange(ONE_STEP_BUCKETS_MAX, dtype=np.float32) / np.float32(ONE_STEP_BUCKETS_MAX)
    points = np.concatenate([cdf[:-1], edges[1:]]).astype(np.float32)
    u = np.concatenate([points, np.nextafter(points, np.float32(0)), np.nextafter(points, np.float32(1)),
                        np.random.default_rng(index).random(200_000, dtype=np.float32),
                        np.array([0.0, np.nextafter(np.float32(1), np.float32(0))], dtype=np.float32)])
    u = u[(u >= 0) & (u < 1)].astype(np.float32)
    ids = draw(u)
    assert ids.dtype == loop(u).dtype
    np.testing.assert_array_equal(ids, np.searchsorted(cdf, u, side="right"))
    np.testing.assert_array_equal(ids, loop(u))
    assert draw.one_step_tried and loop.one_step is None
    if index == 11:  # Zipf 3.0 over 256 experts: steps closer than 2^-16
        assert draw.one_step is None
    elif index < 4:
        assert draw.one_step is not None
        few = _InverseCdf(probs)
        np.testing.assert_array_equal(few(u[:100]), ids[:100])
        assert few.one_step is None and not few.one_step_tried  # built only for a call with many draws


@pytest.mark.parametrize("num_experts", [300, 384, 1000])
def test_guide_table_gives_the_inverse_cdf_for_any_number_of_experts(num_experts):
    """The guide table has a power-of-two size for any number of experts, so every float32 draw maps to the first
    id whose CDF exceeds it (a 1200-bucket table for 300 experts gave u = 0.45333332 id 136, not 135)."""
    from traces.synth import _InverseCdf

    probs = np.full(num_experts, 1.0 / num_experts)
    table = _InverseCdf(probs)
    assert table.buckets & (table.buckets - 1) == 0
    loop = _InverseCdf(probs)
    loop.one_step_tried = True
    u = np.concatenate([np.random.default_rng(1).random(1 << 21, dtype=np.float32), table.cdf[:-1],
                        np.nextafter(table.cdf[:-1], np.float32(0)), np.array([0.45333332], dtype=np.float32)])
    want = np.searchsorted(table.cdf, u, side="right")
    np.testing.assert_array_equal(loop(u), want)
    np.testing.assert_array_equal(table(u), want)


def test_one_step_table_costs_one_check_where_it_cannot_help():
    """A table whose steps lie closer than 2^-16 (or repeat off the bucket edges) gives up after one pass over its
    CDF, not after trying every table size (that made Zipf 2.0 over 4096 experts cost 7.5 ms a table, and topic
    mixtures build one per topic and layer)."""
    from traces import synth

    calls = []
    real = np.searchsorted

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    zeros_inside = np.ones(64)
    zeros_inside[[10, 11]] = 0.0  # steps repeated at a value that is no bucket edge
    for probs in (1.0 / np.arange(1, 4097) ** 2.0, 1.0 / np.arange(1, 257) ** 3.0, zeros_inside, np.arange(1.0, 9.0)):
        table = synth._InverseCdf(probs)
        calls.clear()
        synth.np.searchsorted = counting
        try:
            table._one_step_table()
        finally:
            synth.np.searchsorted = real
        assert len(calls) <= 2  # the one check's two passes, at most


def test_inverse_cdf_shortcut_only_for_exact_uniform_steps():
    from traces.synth import _InverseCdf

    assert not _InverseCdf(np.full(60, 1 / 60)).linear  # steps of 1/60 are not exact in float32
    assert not _InverseCdf(np.arange(1.0, 9.0)).linear  # skewed


@pytest.mark.parametrize("routing", ["uniform", "zipf:1.0", "zipf:3.0"])
@pytest.mark.parametrize("top_k", [5, 8])
def test_repeat_checks_by_columns_and_by_table_draw_the_same_ids(routing, top_k, monkeypatch):
    """Top-k > 4 checks repeats against the row's chosen columns when popularity is flat and against a per-row
    table of every expert when it is skewed; either way the same random numbers give the same ids."""
    from traces import synth

    cfg = synth.SynthConfig("m", 3, 64, top_k, routing, 0.0, 11)
    lens = np.full(40, 50), np.full(40, 9)
    drawn = []
    for threshold in (0.0, 2.0):  # the table always, the columns always
        monkeypatch.setattr(synth, "COMPARE_MAX_TOP_MASS", threshold)
        drawn.append(synth.generate_trace(cfg, *lens).experts)
    np.testing.assert_array_equal(drawn[0], drawn[1])
    assert (np.sort(drawn[0], axis=-1)[..., 1:] != np.sort(drawn[0], axis=-1)[..., :-1]).all()  # distinct ids


def test_repeat_checks_agree_across_chunks(monkeypatch):
    from traces import synth

    probs = synth.popularity_matrix("zipf:0.8", 1, 32, 0)[0]
    drawn = []
    for threshold in (0.0, 2.0):
        monkeypatch.setattr(synth, "COMPARE_MAX_TOP_MASS", threshold)
        drawn.append(synth._sample_topk(np.random.default_rng(3), synth._InverseCdf(probs), 1000, 6, 32,
                                        np.dtype(np.uint8), chunk=128))
    np.testing.assert_array_equal(drawn[0], drawn[1])


@pytest.mark.parametrize("block_bytes", [1, 3 * 40 * 2, 1 << 30])  # one layer, three layers at a time, all
def test_layers_written_in_blocks_give_the_same_trace(block_bytes, monkeypatch):
    """Layers are gathered in blocks before they are written into the trace; cross-layer affinity reads the
    previous layer from the block. Every block size gives the trace of writing one layer at a time."""
    from traces import synth

    cfg = synth.SynthConfig("m", 7, 16, 2, "zipf:1.0", 0.3, 5, affinity=0.5, topics=3)
    lens = np.full(4, 6), np.full(4, 5)  # 40 routed tokens
    monkeypatch.setattr(synth, "LAYER_BLOCK_SHARE", 1 << 40)  # blocks sized by LAYER_BLOCK_BYTES alone
    monkeypatch.setattr(synth, "LAYER_BLOCK_BYTES", 0)
    one_by_one = synth.generate_trace(cfg, *lens).experts
    monkeypatch.setattr(synth, "LAYER_BLOCK_BYTES", block_bytes)
    np.testing.assert_array_equal(synth.generate_trace(cfg, *lens).experts, one_by_one)


def test_a_large_trace_is_written_in_a_few_layer_blocks():
    """Blocks hold 64 MB of layers, or an eighth of a larger trace: a layer written alone touches every token's
    row, so a 1.66 GB trace (Qwen3, 4,096 x 1,055 tokens) goes in 8 passes instead of 48."""
    from traces.synth import LAYER_BLOCK_BYTES, layer_block_bytes

    assert layer_block_bytes(10 << 20) == LAYER_BLOCK_BYTES == 64 << 20
    assert layer_block_bytes(1_660_000_000) == 1_660_000_000 // 8


def test_trace_gen_then_simulate_equals_simulate_drawing_the_same_lengths(tmp_path, capsys):
    """`trace gen` draws per-request lengths from the stream `simulate` uses, so a saved trace of distribution
    lengths simulates exactly as the point drawn in process (same seed)."""
    from experiments.cli import main
    from sim.api import simulate

    lengths = {"prompt_len": "lognormal:64:0.6:200", "gen_len": "lognormal:8:0.8:16"}
    path = tmp_path / "t.npz"
    assert main(["trace", "gen", "--model", "deepseek-v2-lite", "--requests", "48", "--prompt-len",
                 lengths["prompt_len"], "--gen-len", lengths["gen_len"], "--routing", "zipf:1.0", "--seed", "3",
                 "-o", str(path)]) == 0
    common = {"decode_sample": 2, "keep_plan": True}
    saved = simulate("deepseek-v2-lite", "rtx6000ada-8452y", "coxmoe", trace=str(path), **common)
    drawn = simulate("deepseek-v2-lite", "rtx6000ada-8452y", "coxmoe", batch=48, routing="zipf:1.0", seed=3,
                     **lengths, **common)
    np.testing.assert_array_equal(saved.plan.workload.prompt_lens, drawn.plan.workload.prompt_lens)
    np.testing.assert_array_equal(saved.plan.workload.gen_lens, drawn.plan.workload.gen_lens)
    assert len(set(drawn.plan.workload.prompt_lens.tolist())) > 1  # the lengths did vary
    assert saved.throughput_tok_s == drawn.throughput_tok_s


def test_request_features_need_at_least_one_column():
    """A [R, 0] feature array passed validation, then stopped `eas` with scikit-learn's traceback."""
    trace = generate_trace(SynthConfig("m", 2, 8, 2, "uniform", 0.0, 0), np.array([3, 3]), np.array([2, 2]))
    with pytest.raises(TraceError, match="D >= 1"):
        validate(dataclasses.replace(trace, request_features=np.zeros((2, 0), dtype=np.float32)))
