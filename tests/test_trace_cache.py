"""The in-process trace cache: one synthesis per (config, batch, lengths), shared read-only, bounded in bytes."""

from __future__ import annotations

import numpy as np
import pytest

from sim.api import TRACE_CACHE, TraceCache, simulate


def test_points_with_the_same_workload_share_one_trace_and_results_do_not_change():
    TRACE_CACHE.clear()
    kw = dict(batch=16, prompt_len=24, gen_len=4, routing="zipf:1.0", seed=3)
    hits = TRACE_CACHE.hits
    first = simulate("mixtral-8x7b", "a100-80g-8452y", "coxmoe", **kw)
    again = simulate("mixtral-8x7b", "a100-80g-8452y", "coxmoe", **kw)
    other = simulate("mixtral-8x7b", "h100-80g-8452y", "moe-lightning", **kw)  # same model and workload
    assert TRACE_CACHE.hits == hits + 2
    assert (again.total_s, again.knobs) == (first.total_s, first.knobs) and other.total_s > 0
    TRACE_CACHE.clear()
    fresh = simulate("mixtral-8x7b", "a100-80g-8452y", "coxmoe", **kw)
    assert fresh.total_s == first.total_s  # a rebuilt trace gives the same bytes
    simulate("mixtral-8x7b", "a100-80g-8452y", "coxmoe", **{**kw, "seed": 4})
    assert TRACE_CACHE.misses >= 2


def test_cached_traces_are_read_only_and_the_cache_is_bounded():
    from traces import SynthConfig, generate_trace

    def build(seed):
        return lambda: generate_trace(SynthConfig("m", 2, 8, 2, "uniform", 0.0, seed), np.full(50, 20),
                                      np.full(50, 3))

    one = build(0)()
    cache = TraceCache(max_bytes=int(one.experts.nbytes * 2.5))
    a = cache.get(("a",), build(0))
    assert cache.get(("a",), build(1)) is a and cache.hits == 1
    with pytest.raises(ValueError, match="read-only"):
        a.experts[0, 0, 0] = 1
    cache.get(("b",), build(1))
    cache.get(("c",), build(2))  # a third trace pushes out the least recently used one
    assert cache.get(("a",), build(0)) is not a and cache.misses == 4
    tiny = TraceCache(max_bytes=1)
    assert tiny.get(("x",), build(0)).experts.flags.writeable  # too big to keep: not cached, left writable


def test_the_budget_counts_the_tables_a_trace_gathers():
    from traces import SynthConfig, generate_trace

    trace = generate_trace(SynthConfig("m", 2, 8, 2, "uniform", 0.0, 0), np.full(40, 10), np.full(40, 4))
    before = TraceCache._nbytes(trace)
    trace.prefill_counts(np.arange(40))
    trace.decode_step_counts([np.arange(40)])
    assert TraceCache._nbytes(trace) == before + 40 * 2 * 8 * 4 + 3 * 1 * 2 * 8 * 4


def test_the_budget_comes_from_the_environment(monkeypatch):
    from sim.errors import SimInputError

    monkeypatch.setenv("COXMOE_TRACE_CACHE_MIB", "2")
    assert TraceCache().max_bytes == 2 * 2**20
    for bad in ("x", "nan", "-1", "1e9"):
        monkeypatch.setenv("COXMOE_TRACE_CACHE_MIB", bad)
        with pytest.raises(SimInputError, match="COXMOE_TRACE_CACHE_MIB"):
            TraceCache().max_bytes  # noqa: B018 - the property checks the variable when it is read
