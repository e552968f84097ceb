"""The in-process trace cache: one synthesis per (config, batch, lengths), shared read-only, bounded in bytes."""

from __future__ import annotations

import os
import time
from pathlib import Path

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
    misses = TRACE_CACHE.misses
    fresh = simulate("mixtral-8x7b", "a100-80g-8452y", "coxmoe", **kw)
    assert fresh.total_s == first.total_s  # a rebuilt trace gives the same bytes
    simulate("mixtral-8x7b", "a100-80g-8452y", "coxmoe", **{**kw, "seed": 4})
    assert TRACE_CACHE.misses == misses + 2  # the emptied cache, then another seed


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
    # a byte per count: a request's 10 prompt tokens and a step's 40 tokens, at top-2, stay below 256
    assert TraceCache._nbytes(trace) == before + 40 * 2 * 8 + 3 * 1 * 2 * 8


def test_the_budget_comes_from_the_environment(monkeypatch):
    from sim.errors import SimInputError

    monkeypatch.setenv("COXMOE_TRACE_CACHE_MIB", "2")
    assert TraceCache().max_bytes == 2 * 2**20
    for bad in ("x", "nan", "-1", "1e9"):
        monkeypatch.setenv("COXMOE_TRACE_CACHE_MIB", bad)
        with pytest.raises(SimInputError, match="COXMOE_TRACE_CACHE_MIB"):
            TraceCache().max_bytes  # noqa: B018 - the property checks the variable when it is read


# ---- on disk ---------------------------------------------------------------------------------------------------
def _synth(seed: int = 0, requests: int = 6, model: str = "tiny"):
    from traces import SynthConfig

    cfg = SynthConfig(model, 3, 16, 4, "zipf:1.0", 0.2, seed)
    return cfg, np.full(requests, 7), np.full(requests, 3)


def test_disk_cache_returns_the_trace_synthesis_gives_and_builds_it_once(tmp_path):
    from traces import generate_trace
    from traces.disk_cache import DiskTraceCache

    cache = DiskTraceCache(tmp_path, 1 << 30)
    cfg, p, g = _synth()
    calls = []

    def build():
        calls.append(1)
        return generate_trace(cfg, p, g)

    first = cache.get(cfg, p, g, build)
    again = DiskTraceCache(tmp_path, 1 << 30).get(cfg, p, g, build)  # another process would see the same file
    assert len(calls) == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    for name in ("experts", "prompt_lens", "gen_lens"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert again.header == first.header
    # another seed, another request count: other keys, other files
    for other in (_synth(seed=1), _synth(requests=7)):
        cache.get(*other, lambda o=other: generate_trace(*o))
    assert len(list(tmp_path.glob("*.npz"))) == 3 and len(calls) == 1


def test_a_damaged_cache_file_is_rebuilt_and_the_directory_is_capped(tmp_path):
    from traces import generate_trace
    from traces.disk_cache import DiskTraceCache

    cfg, p, g = _synth()
    cache = DiskTraceCache(tmp_path, 1 << 30)
    cache.get(cfg, p, g, lambda: generate_trace(cfg, p, g))
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not a trace")
    rebuilt = cache.get(cfg, p, g, lambda: generate_trace(cfg, p, g))
    np.testing.assert_array_equal(rebuilt.experts, generate_trace(cfg, p, g).experts)
    assert cache.misses == 2 and path.stat().st_size > 100
    small = DiskTraceCache(tmp_path, path.stat().st_size)  # room for one file: the newest stays
    small.get(*_synth(seed=5), lambda: generate_trace(*_synth(seed=5)))
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not path.exists()


def test_another_trace_under_a_cache_name_is_rebuilt_not_used(tmp_path):
    """A file copied over another key (another seed, batch or model) loads fine but is not what the name stands
    for: the cache rebuilds it instead of simulating the wrong routing."""
    import shutil

    from traces import generate_trace
    from traces.disk_cache import DiskTraceCache, cache_key

    cache = DiskTraceCache(tmp_path, 1 << 30)
    cfg, p, g = _synth()
    want = generate_trace(cfg, p, g)
    for other in (_synth(seed=1), _synth(requests=7), _synth(model="other")):
        cache.get(*other, lambda o=other: generate_trace(*o))
        src = tmp_path / f"{cache_key(*other)}.npz"
        shutil.copy(src, tmp_path / f"{cache_key(cfg, p, g)}.npz")  # planted under the asked-for name
        got = cache.get(cfg, p, g, lambda: generate_trace(cfg, p, g))
        np.testing.assert_array_equal(got.experts, want.experts)
        assert got.header == want.header
        (tmp_path / f"{cache_key(cfg, p, g)}.npz").unlink()
    stale = tmp_path / ".x.npz.tmp"  # a writer killed mid-write: counted against the cap, evicted
    stale.write_bytes(b"\0" * 10_000_000)
    DiskTraceCache(tmp_path, 5_000_000).get(*_synth(seed=9), lambda: generate_trace(*_synth(seed=9)))
    assert not stale.exists()


def test_disk_cache_setting_comes_from_the_environment_and_sweeps_default_to_their_directory(tmp_path, monkeypatch):
    from sim.api import simulate
    from traces.disk_cache import TRACE_DIR_ENV, default_trace_dir, disk_cache_from_env
    from traces.errors import TraceError

    monkeypatch.delenv(TRACE_DIR_ENV, raising=False)
    assert disk_cache_from_env() is None
    monkeypatch.setenv(TRACE_DIR_ENV, "off")
    assert disk_cache_from_env() is None
    with default_trace_dir(tmp_path / "sweep"):  # the user's setting wins
        assert disk_cache_from_env() is None
    monkeypatch.delenv(TRACE_DIR_ENV)
    with default_trace_dir(tmp_path / "sweep"):
        assert disk_cache_from_env().directory == tmp_path / "sweep"
    assert disk_cache_from_env() is None  # restored after the block
    monkeypatch.setenv(TRACE_DIR_ENV, str(tmp_path / "d"))
    monkeypatch.setenv("COXMOE_TRACE_DIR_GIB", "lots")
    with pytest.raises(TraceError, match="COXMOE_TRACE_DIR_GIB"):
        disk_cache_from_env()
    monkeypatch.setenv("COXMOE_TRACE_DIR_GIB", "1")
    TRACE_CACHE.clear()
    kw = dict(batch=8, prompt_len=16, gen_len=3, routing="zipf:1.0", seed=9)
    cached = simulate("mixtral-8x7b", "a100-80g-8452y", "stream-experts", **kw)
    assert len(list((tmp_path / "d").glob("*.npz"))) == 1
    TRACE_CACHE.clear()
    import sim.api

    def no_synthesis(*args, **kwargs):
        raise AssertionError("the trace was drawn again, not read from the disk cache")

    with monkeypatch.context() as patch:
        patch.setattr(sim.api, "generate_trace", no_synthesis)  # what the disk cache calls on a miss
        from_disk = simulate("mixtral-8x7b", "a100-80g-8452y", "stream-experts", **kw)
    monkeypatch.delenv(TRACE_DIR_ENV)
    TRACE_CACHE.clear()
    fresh = simulate("mixtral-8x7b", "a100-80g-8452y", "stream-experts", **kw)
    assert cached.total_s == from_disk.total_s == fresh.total_s
    TRACE_CACHE.clear()


def test_a_count_table_file_is_keyed_by_its_bytes_not_its_name(tmp_path):
    from traces import SynthConfig, generate_trace
    from traces.disk_cache import DiskTraceCache, cache_key

    table = tmp_path / "counts.npy"
    np.save(table, np.tile(np.array([[1.0, 1.0, 1.0, 50.0]]), (2, 1)), allow_pickle=False)
    cfg = SynthConfig("tiny", 2, 4, 1, f"table:{table}", 0.0, 0)
    p, g = np.full(20, 8), np.full(20, 2)
    cache = DiskTraceCache(tmp_path / "cache", 1 << 30)
    first = cache.get(cfg, p, g, lambda: generate_trace(cfg, p, g))
    key = cache_key(cfg, p, g)
    np.save(table, np.tile(np.array([[50.0, 1.0, 1.0, 1.0]]), (2, 1)), allow_pickle=False)  # same name, new table
    assert cache_key(cfg, p, g) != key
    second = cache.get(cfg, p, g, lambda: generate_trace(cfg, p, g))
    np.testing.assert_array_equal(second.experts, generate_trace(cfg, p, g).experts)
    assert np.bincount(first.experts.ravel(), minlength=4).argmax() == 3
    assert np.bincount(second.experts.ravel(), minlength=4).argmax() == 0
    table.unlink()  # unreadable: no key, so the synthesis runs uncached and names the problem itself
    assert cache_key(cfg, p, g) is None


def test_the_in_memory_cache_draws_an_edited_count_table_anew(tmp_path):
    """The in-process cache was keyed by the table's name: after the file changed, the same process (a notebook)
    kept simulating the old table's trace, and an invalid table still ran."""
    from sim.api import resolve_model, resolve_routing
    from traces.errors import TraceError

    model = resolve_model("mixtral-8x7b")
    table = tmp_path / "counts.npy"
    hot = np.ones((32, 8))
    for first_hot in (7, 0):
        hot[:] = 1.0
        hot[:, first_hot] = 5.0  # a selection share of 5/12 (top-2 reaches at most 1/2)
        np.save(table, hot, allow_pickle=False)
        _, trace, _ = resolve_routing(model, 16, 8, 2, None, f"table:{table}", 0, prompt_counts=True)
        rows = trace.decode_rows(1, np.arange(16))
        assert int(trace.expert_counts(rows).sum(axis=0).argmax()) == first_hot
    np.save(table, np.ones((32, 7)), allow_pickle=False)
    with pytest.raises(TraceError, match="7 experts"):
        resolve_routing(model, 16, 8, 2, None, f"table:{table}", 0, prompt_counts=True)


def test_a_read_only_cache_still_serves_and_never_fails_a_run(tmp_path, monkeypatch):
    import os

    from traces import generate_trace
    from traces.disk_cache import DiskTraceCache

    cfg, p, g = _synth()
    cache = DiskTraceCache(tmp_path, 1 << 30)
    cache.get(cfg, p, g, lambda: generate_trace(cfg, p, g))

    def refuse(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(os, "utime", refuse)
    monkeypatch.setattr("pathlib.Path.unlink", refuse)
    hit = cache.get(cfg, p, g, lambda: pytest.fail("a readable file must be served"))
    np.testing.assert_array_equal(hit.experts, generate_trace(cfg, p, g).experts)
    monkeypatch.setattr("traces.disk_cache.save_trace", refuse)
    other = _synth(seed=7)
    built = cache.get(*other, lambda: generate_trace(*other))  # cannot write: built, returned, not cached
    assert built.experts.size and cache.misses == 2


def test_a_sweep_with_a_bad_cache_setting_is_one_error(tmp_path, monkeypatch, capsys):
    from experiments.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text("fixed: {model: mixtral-8x7b, system: a100-80g-8452y, batch: 4, prompt_len: 8, gen_len: 2}\n"
                    "axes: {policy: [stream-experts]}\n")
    monkeypatch.delenv("COXMOE_TRACE_DIR", raising=False)
    monkeypatch.setenv("COXMOE_TRACE_DIR_GIB", "abc")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "COXMOE_TRACE_DIR_GIB" in err[0]


def _build_in_child(directory: str, log: str, started: str) -> None:
    """A process asking the disk cache for the _synth() trace; each build it runs appends a line to `log`."""
    from traces import generate_trace
    from traces.disk_cache import DiskTraceCache

    cfg, p, g = _synth()

    def slow_build():
        with open(log, "a") as f:
            f.write("built\n")
        Path(started).touch()
        time.sleep(1.0)  # long enough for the other process to ask meanwhile
        return generate_trace(cfg, p, g)

    DiskTraceCache(directory, 1 << 30).get(cfg, p, g, slow_build)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to share the test's functions with a child")
def test_two_processes_asking_for_one_trace_build_it_once(tmp_path):
    """The second process waits for the first's file instead of drawing the same trace again."""
    import multiprocessing

    from traces import generate_trace
    from traces.disk_cache import DiskTraceCache

    log, started = tmp_path / "builds.log", tmp_path / "started"
    ctx = multiprocessing.get_context("fork")
    first = ctx.Process(target=_build_in_child, args=(str(tmp_path / "cache"), str(log), str(started)))
    first.start()
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:  # the first is building (and holds the lock)
        time.sleep(0.01)
    second = ctx.Process(target=_build_in_child, args=(str(tmp_path / "cache"), str(log), str(started)))
    second.start()
    first.join(60)
    second.join(60)
    assert first.exitcode == 0 and second.exitcode == 0
    assert log.read_text() == "built\n"
    cfg, p, g = _synth()
    cache = DiskTraceCache(tmp_path / "cache", 1 << 30)
    got = cache.get(cfg, p, g, lambda: pytest.fail("the trace is on disk"))
    np.testing.assert_array_equal(got.experts, generate_trace(cfg, p, g).experts)
    assert cache.hits == 1 and cache.misses == 0


def test_the_disk_cache_key_covers_every_module_that_draws_a_trace():
    """A trace module the synthesis imports (at any depth, inside functions too) either is in the cache key's code
    digest or cannot change a trace's bytes: traces/selection.py once decided every table trace and was missing."""
    import ast
    from pathlib import Path

    from traces import disk_cache

    here = Path(disk_cache.__file__).parent
    no_bytes = {"errors.py", "limits.py", "pages.py", "length_presets.py", "disk_cache.py", "files.py",
                "count_kernels.py", "jit.py"}  # a trace's decode step tables; whether kernels run (same bytes)
    seen, todo = set(), ["synth.py"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((here / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("traces."):
                todo.append(node.module.split(".")[1] + ".py")
            elif isinstance(node, ast.ImportFrom) and node.module == "traces":
                todo += [f"{a.name}.py" for a in node.names if (here / f"{a.name}.py").is_file()]
    assert seen - no_bytes <= set(disk_cache._CODE), sorted(seen - no_bytes - set(disk_cache._CODE))


def test_count_tables_that_are_fifos_or_missing_are_refused_not_waited_on(tmp_path):
    """A FIFO named as a count table blocked the reader (and the caches' hashing) for ever."""
    from sim.api import resolve_model, resolve_routing
    from traces import SynthConfig
    from traces.disk_cache import cache_key, table_digest
    from traces.errors import TraceError
    from traces.importers import read_count_table

    fifo = tmp_path / "counts.npy"
    os.mkfifo(fifo)
    with pytest.raises(TraceError, match="file not found"):
        read_count_table(fifo)
    cfg = SynthConfig("tiny", 2, 4, 1, f"table:{fifo}", 0.0, 0)
    assert cache_key(cfg, np.full(2, 4), np.full(2, 2)) is None
    assert table_digest(f"table:{fifo}") is None and table_digest("table:mixtral-8x7b") == ""
    with pytest.raises(TraceError, match="file not found"):  # uncached: the synthesis names the problem
        resolve_routing(resolve_model("mixtral-8x7b"), 4, 8, 2, None, f"table:{fifo}", 0)


def test_a_reuse_probability_beside_a_trace_is_refused_before_the_trace_is_read(tmp_path):
    from sim.api import resolve_model, resolve_routing
    from sim.errors import SimInputError

    with pytest.raises(SimInputError, match="--reuse-prob shapes synthetic routing"):
        resolve_routing(resolve_model("mixtral-8x7b"), None, None, None, tmp_path / "missing.npz", "uniform", 0, 0.5)
