"""Compiled trace synthesis (`traces/topk_kernels.py`): the same bytes as the numpy forms, for every kind of
popularity table and draw path, and the switch that decides which runs."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from traces import jit, synth
from traces.synth import SynthConfig, _exclusive_draw, _InverseCdf, _sample_topk, generate_trace

pytest.importorskip("numba")  # a declared dependency: present wherever the project is installed


def _traces(monkeypatch, cfg: SynthConfig, prompt_lens, gen_lens, prompt_counts: bool):
    out = []
    for mode in ("off", "on"):
        monkeypatch.setenv(jit.JIT_ENV, mode)
        out.append(generate_trace(cfg, np.asarray(prompt_lens), np.asarray(gen_lens), prompt_counts=prompt_counts))
    return out


def _assert_same_trace(a, b) -> None:
    np.testing.assert_array_equal(a.experts, b.experts)
    assert (a.prompt_counts is None) == (b.prompt_counts is None)
    if a.prompt_counts is not None:
        np.testing.assert_array_equal(a.prompt_counts, b.prompt_counts)
    if a.request_features is not None:
        np.testing.assert_array_equal(a.request_features, b.request_features)


@pytest.mark.parametrize("experts,top_k", [(8, 2), (64, 6), (128, 8), (160, 6), (300, 8), (2, 1), (1, 1)])
@pytest.mark.parametrize("routing", ["uniform", "zipf:0.8", "zipf:1.0", "zipf:2.5"])
def test_compiled_synthesis_gives_the_numpy_bytes(monkeypatch, experts, top_k, routing):
    """Every popularity form the kernels take (uniform over a power of two: word bits; one-step tables; steps
    too close for one: numpy's ids) for k <= 4 (one block, one redraw a round) and k > 4 (blocks of 2^16 rows, four
    candidates a round), ids of one and two bytes; 70,000 rows a layer, so both the generator's words (16,384 draws
    or more) and its plain numbers (the smaller redraw rounds) are read."""
    cfg = SynthConfig("m", 3, experts, top_k, routing=routing, seed=5)
    lens = np.full(200, 330)
    numpy_trace, compiled = _traces(monkeypatch, cfg, lens, np.full(200, 21), prompt_counts=False)
    _assert_same_trace(numpy_trace, compiled)
    assert compiled.experts.shape == (200 * 350, 3, top_k)


@pytest.mark.parametrize("extra", [{"reuse_prob": 0.3}, {"affinity": 0.5}, {"topics": 3}])
def test_compiled_synthesis_keeps_reuse_affinity_topics_and_prompt_counts(monkeypatch, extra):
    """The draws the kernels make sit between numpy's own (reuse, affinity, per-topic groups); prompts kept as
    counts see the same draws."""
    cfg = SynthConfig("m", 4, 128, 8, routing="zipf:1.0", seed=2, **extra)
    rng = np.random.default_rng(0)
    prompt, gen = rng.integers(1, 400, size=150), rng.integers(1, 40, size=150)
    for prompt_counts in (False, True):
        _assert_same_trace(*_traces(monkeypatch, cfg, prompt, gen, prompt_counts))


@pytest.mark.parametrize("k,chunk", [(3, 1 << 16), (8, 1000), (8, 1)])
def test_compiled_top_k_reaches_the_exact_fallback_as_numpy_does(monkeypatch, k, chunk):
    """With one redraw round, many rows of a skewed table still repeat: both forms hand them to the exact float64
    draw in the same order, from the same generator state; blocks smaller than the rows (even one row) too."""
    monkeypatch.setattr(synth, "REDRAW_ROUNDS", 1)
    probs = 1.0 / np.arange(1, 17) ** 2.0
    n = 20_000
    numpy_ids = _sample_topk(np.random.default_rng(9), _InverseCdf(probs), n, k, 16, np.dtype(np.uint8), chunk=chunk)
    rng = np.random.default_rng(9)
    compiled = _sample_topk(rng, _InverseCdf(probs), n, k, 16, np.dtype(np.uint8), chunk=chunk, compiled=True)
    np.testing.assert_array_equal(numpy_ids, compiled)
    want = np.random.default_rng(9)
    _sample_topk(want, _InverseCdf(probs), n, k, 16, np.dtype(np.uint8), chunk=chunk)
    assert rng.random() == want.random()  # the generator left where numpy leaves it
    assert (np.sort(compiled, axis=1)[:, 1:] != np.sort(compiled, axis=1)[:, :-1]).all()


def test_fallback_draw_is_reached(monkeypatch):
    """The test above means something only if rows do reach the exact draw with one round."""
    calls = []
    monkeypatch.setattr(synth, "REDRAW_ROUNDS", 1)

    def counting(rng, probs, chosen):
        calls.append(chosen.shape[0])
        return _exclusive_draw(rng, probs, chosen)

    monkeypatch.setattr(synth, "_exclusive_draw", counting)
    _sample_topk(np.random.default_rng(9), _InverseCdf(1.0 / np.arange(1, 17) ** 2.0), 20_000, 8, 16,
                 np.dtype(np.uint8), compiled=True)
    assert sum(calls) > 100


def test_jit_switch(monkeypatch):
    """Off by setting; on by setting whatever the size; by default only where the time the kernels save repays
    loading them: numba's import in a process without it, a kernel's load in one with it."""
    monkeypatch.setenv(jit.JIT_ENV, "off")
    assert not jit.worth_it(10**12, 10.0)
    monkeypatch.setenv(jit.JIT_ENV, "on")
    assert jit.worth_it(1, 0.0)
    monkeypatch.delenv(jit.JIT_ENV)
    monkeypatch.delitem(sys.modules, "numba", raising=False)
    ids = int(jit.LOAD_S / 1e-9 / 2.0)  # saving 2 ns an id repays the import from this many ids on
    assert jit.worth_it(ids + 1, 2.0) and not jit.worth_it(ids - 1, 2.0)
    loaded = int(jit.LOADED_S / 1e-9 / 2.0) + 1  # a caller whose other kernels load numba pays a kernel's load only
    assert jit.worth_it(loaded, 2.0, paid=True) and not jit.worth_it(loaded, 2.0)
    monkeypatch.setitem(sys.modules, "numba", object())
    assert jit.worth_it(int(jit.LOADED_S / 1e-9 / 2.0) + 1, 2.0) and not jit.worth_it(ids // 20, 1.0)
    monkeypatch.setattr(jit, "available", lambda: False)
    assert not jit.worth_it(10**12, 10.0)
    assert jit.draw_saving_ns(True, 8) < jit.draw_saving_ns(False, 2) < jit.draw_saving_ns(False, 8)


def test_generate_trace_decides_once_by_its_size(monkeypatch):
    """generate_trace draws compiled exactly when `worth_it` says so for its draws (routed tokens x layers x k)."""
    seen = []
    real = synth._sample_topk

    def spy(*args, compiled=False, **kwargs):
        seen.append(compiled)
        return real(*args, compiled=compiled, **kwargs)

    monkeypatch.setattr(synth, "_sample_topk", spy)
    asked = []
    monkeypatch.setattr(jit, "worth_it", lambda draws, saving: asked.append((draws, saving)) or draws > 5_000)
    generate_trace(SynthConfig("m", 2, 8, 2), np.full(10, 100), np.full(10, 11))  # 1,100 tokens: 4,400 draws
    generate_trace(SynthConfig("m", 2, 8, 2, routing="zipf:1.0"), np.full(20, 100), np.full(20, 11))  # 8,800
    assert asked == [(4_400, jit.SAVED_NS_UNIFORM), (8_800, jit.SAVED_NS_SKEWED_SMALL_K)]
    assert seen == [False, False, True, True]


@pytest.mark.parametrize("experts,top_k,prompt_counts", [(128, 8, True), (300, 6, False), (8, 2, True)])
def test_compiled_decode_step_counts_equal_numpys(monkeypatch, experts, top_k, prompt_counts):
    """The compiled count table (`traces/count_kernels.py`) holds numpy's integers in numpy's dtype, for one group,
    several, groups out of request order, a request in two groups, and requests with no decode step."""
    rng = np.random.default_rng(3)
    gen = rng.integers(1, 30, size=90)
    gen[:5] = 1  # no decode row
    trace = generate_trace(SynthConfig("m", 3, experts, top_k, routing="zipf:1.0", seed=1),
                           rng.integers(1, 50, size=90), gen, prompt_counts=prompt_counts)
    every = np.arange(90)
    for groups in ([every], np.array_split(every, 4), np.array_split(rng.permutation(90), 7),
                   [every[:50], every[30:]]):
        tables = []
        for mode in ("off", "on"):
            monkeypatch.setenv(jit.JIT_ENV, mode)
            trace.__dict__.pop("_decode_step_tables", None)
            tables.append(trace.decode_step_counts(groups))
        assert tables[0].dtype == tables[1].dtype and tables[0].shape == tables[1].shape
        np.testing.assert_array_equal(tables[0], tables[1])
        assert not tables[1].flags.writeable
        assert int(tables[1].sum()) == sum(int(np.maximum(gen[g] - 1, 0).sum()) for g in groups) * 3 * top_k


@pytest.mark.parametrize("routing,reuse,topics", [("uniform", 0.0, 0), ("zipf:1.0", 0.3, 0), ("zipf:1.2", 0.0, 3)])
@pytest.mark.parametrize("experts,top_k", [(128, 8), (300, 6), (8, 2)])
def test_compiled_prompt_counts_equal_numpys(monkeypatch, experts, top_k, routing, reuse, topics):
    """Synthesis's prompt counts by numba's kernel (`count_kernels.add_prompt_counts`) are numpy's integers in
    numpy's dtype, with the same kept rows: for ids read in place (a drawn block), gathered by reuse (another
    layout, copied) and per topic; requests with one prompt token and with no generated row included."""
    rng = np.random.default_rng(7)
    prompts, gens = rng.integers(1, 60, size=70), rng.integers(1, 9, size=70)
    prompts[:3], gens[3:6] = 1, 1
    cfg = SynthConfig("m", 3, experts, top_k, routing=routing, reuse_prob=reuse, seed=2, topics=topics)
    traces, kinds = [], []
    for mode in ("off", "on"):
        monkeypatch.setenv(jit.JIT_ENV, mode)
        made = []
        monkeypatch.setattr(synth, "_PromptCounts", _spy(synth._PromptCounts, made))
        traces.append(generate_trace(cfg, prompts, gens, prompt_counts=True))
        kinds.append(made[0].compiled is not None)
    assert kinds == [False, True]
    off, on = traces
    assert off.prompt_counts.dtype == on.prompt_counts.dtype
    np.testing.assert_array_equal(off.prompt_counts, on.prompt_counts)
    np.testing.assert_array_equal(off.experts, on.experts)
    assert int(on.prompt_counts.sum()) == int(prompts.sum()) * 3 * top_k


def test_prompt_count_kernel_reads_any_layout_and_byte_order():
    """`count_kernels.add_prompt_counts` counts each request's prompt rows whatever the ids' layout (a transposed
    block, C order, a strided view) or byte order (big-endian copied to native first)."""
    from traces import count_kernels

    rng = np.random.default_rng(5)
    block = rng.integers(0, 300, size=(6, 50)).astype(np.uint16)
    starts, lens = np.array([0, 10, 30]), np.array([5, 20, 1])
    want = np.zeros((3, 2, 300), dtype=np.uint32)
    for r, (a, n) in enumerate(zip(starts, lens, strict=True)):
        np.add.at(want[r, 1], block.T[a:a + n].astype(np.int64).ravel(), 1)
    for ids in (block.T, np.ascontiguousarray(block.T), block.T.astype(">u2"), np.repeat(block.T, 2, axis=0)[::2]):
        got = np.zeros_like(want)
        count_kernels.add_prompt_counts(ids, starts, lens, 1, got)
        np.testing.assert_array_equal(got, want)


def _spy(cls, made):
    """`cls` whose instances are recorded in `made` as they are created."""
    class Spy(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    return Spy


def test_a_numba_that_does_not_import_leaves_numpy(monkeypatch):
    """Installed but refusing to import (a release that rejects this numpy): large traces are drawn and counted in
    numpy, the same bytes; asked for with COXMOE_JIT=on, it is one error naming why."""
    from traces.errors import TraceError

    monkeypatch.setattr(jit, "_import_error", lambda: "ImportError: Numba needs NumPy 2.3 or less")
    assert not jit.worth_it(10**12, 20.0)
    monkeypatch.setenv(jit.JIT_ENV, "on")
    with pytest.raises(TraceError, match="does not import.*NumPy 2.3"):
        jit.worth_it(1, 1.0)
    monkeypatch.setattr(jit, "available", lambda: False)
    with pytest.raises(TraceError, match="not installed"):
        jit.worth_it(1, 1.0)
    monkeypatch.delenv(jit.JIT_ENV)
    assert not jit.worth_it(10**12, 20.0)


def test_a_misspelt_jit_setting_is_refused_by_name(monkeypatch):
    from traces.errors import TraceError

    for good, mode in (("OFF", "off"), (" on ", "on"), ("auto", "auto"), ("", "auto"), ("0", "off")):
        monkeypatch.setenv(jit.JIT_ENV, good)
        assert jit.setting() == mode
    monkeypatch.setenv(jit.JIT_ENV, "of")
    with pytest.raises(TraceError, match="COXMOE_JIT='of': use on, off or auto"):
        generate_trace(SynthConfig("m", 2, 8, 2), np.full(4, 10), np.full(4, 3))


def test_kernels_without_a_writable_cache_compile_per_process(monkeypatch):
    """numba refuses `cache=True` where it finds no writable directory: the kernel is then compiled uncached."""
    import numba

    real = numba.njit
    asked = []

    def njit(*args, **kwargs):
        asked.append(kwargs.get("cache", False))
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", njit)

    def double(x):
        return 2 * x

    assert jit.kernel(double)(21) == 42 and asked == [True, False]


def test_big_endian_trace_ids_count_as_native_ones(monkeypatch, tmp_path):
    """A trace file may hold big-endian ids (validation takes any unsigned 1- or 2-byte type); numba takes only
    native ones, so the compiled count table reads a native copy: numpy's table."""
    from traces.format import load_trace, save_trace

    rng = np.random.default_rng(4)
    trace = generate_trace(SynthConfig("m", 2, 300, 4, routing="zipf:1.0"), rng.integers(1, 30, size=40),
                           rng.integers(2, 20, size=40))
    swapped = type(trace)(trace.header, trace.prompt_lens, trace.gen_lens, trace.experts.astype(">u2"))
    back = load_trace(save_trace(swapped, tmp_path / "be.npz"))
    assert back.experts.dtype == np.dtype(">u2")
    groups = np.array_split(np.arange(40), 3)
    monkeypatch.setenv(jit.JIT_ENV, "on")
    compiled = back.decode_step_counts(groups)
    monkeypatch.setenv(jit.JIT_ENV, "off")
    trace.__dict__.pop("_decode_step_tables", None)
    np.testing.assert_array_equal(compiled, trace.decode_step_counts(groups))


def test_an_out_buffer_of_the_wrong_shape_is_numpys_error():
    """The compiled path takes only a [k, n] C-ordered buffer; any other goes to numpy, which refuses a wrong
    shape (the compiled path had returned the whole buffer, its extra rows never drawn)."""
    probs = np.ones(8)
    for compiled in (False, True):
        with pytest.raises(ValueError):
            _sample_topk(np.random.default_rng(0), _InverseCdf(probs), 1000, 2, 8, np.dtype(np.uint8),
                         out=np.empty((2, 1005), dtype=np.uint8), compiled=compiled)
