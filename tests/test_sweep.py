"""Sweeps: grid expansion and hashing, failure capture, and resuming after a kill -9 without loss or duplicates."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from experiments.cli import main
from experiments.sweep.spec import expand, load_spec
from experiments.sweep.store import DB_NAME, ResultStore, load_results
from sim.errors import SimInputError

REPO = Path(__file__).resolve().parents[1]


def _spec(tmp_path, spec: dict, name="spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def test_expansion_merges_mapping_axes_and_dedupes_by_hash():
    points = expand({"fixed": {"system": "a100-80g-8452y", "batch": 8},
                     "axes": {"model": ["mixtral-8x7b", "olmoe-1b-7b"], "workload": [{"prompt_len": 4, "gen_len": 2},
                                                                {"prompt_len": 8, "gen_len": 2}],
                              "policy_options": [{}, {"coalesce": "off"}], "seed": [0, 0]}})
    assert len(points) == 2 * 2 * 2  # the repeated seed value collapses
    assert len({p.key for p in points}) == len(points)
    first = points[0].config
    assert first["prompt_len"] == 4 and first["gen_len"] == 2 and first["policy"] == "coxmoe"
    assert points[1].config["policy_options"] == {"coalesce": "off"}


def test_hash_names_the_resolved_point():
    m, s, w = "mixtral-8x7b", "a100-80g-8452y", {"batch": 4, "prompt_len": 8, "gen_len": 2}
    implicit = expand({"fixed": {"model": m, "system": s, **w}})[0]
    explicit = expand({"fixed": {"model": m, "system": s, **w, "policy": "coxmoe", "seed": 0, "routing": "uniform",
                                 "policy_options": {}, "reuse_prob": 0}})[0]
    assert implicit.key == explicit.key and len(implicit.key) == 16  # reuse_prob 0 is the default 0.0
    other = expand({"fixed": {"model": m, "system": s, **w, "seed": 1}})[0]
    assert other.key != implicit.key
    # a YAML boolean (`coalesce: off` reads as false) is spelled as the CLI would pass it, on / off: one point
    # whichever way the spec writes it, and the on/off options (restratify included) and boolean ones take it
    bools = expand({"fixed": {"model": m, "system": s, **w,
                              "policy_options": {"coalesce": False, "restratify": False}}})
    assert bools[0].config["policy_options"] == {"coalesce": "off", "restratify": "off"}
    words = expand({"fixed": {"model": m, "system": s, **w,
                              "policy_options": {"coalesce": "off", "restratify": "off"}}})
    assert words[0].key == bools[0].key
    assert len(expand({"fixed": {"model": m, "system": s, **w}, "axes": {"reuse_prob": [0, 0.0, 1, 1.0]}})) == 2


@pytest.mark.parametrize("spec, message", [
    ({"fixed": {"model": "m", "system": "s", "bogus": 1}}, "unknown key"),
    ({"fixed": {"system": "s"}}, "model not set"),
    ({"axes": {"model": []}, "fixed": {"system": "s"}}, "non-empty list"),
    ({"fixed": {"model": "m", "system": "s"}, "extra": 1}, "top level"),
])
def test_bad_specs(spec, message):
    with pytest.raises(SimInputError, match=message):
        expand(spec)


def test_cli_bad_spec_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes: [unclosed")
    assert main(["sweep", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["sweep-results", str(tmp_path / "nothing")]) == 2


def test_failures_are_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    spec = _spec(tmp_path, {"fixed": {"model": "mixtral-8x7b", "system": "rtx6000ada-8452y", "batch": 4,
                                      "prompt_len": 8, "gen_len": 2},
                            "axes": {"policy": ["fiddler", "gpu-only", "stream-experts"]}})
    out = tmp_path / "out"
    from sim.api import TRACE_CACHE

    TRACE_CACHE.clear()  # an earlier test's trace of this workload would spare the synthesis (and the disk cache)
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1"]) == 1  # a failed point fails the run
    captured = capsys.readouterr()
    assert "2 ran, 1 failed" in captured.out.replace("3 points, 0 already done, ", "")
    assert "1 point(s) failed" in captured.err
    # no terminal here, so progress comes as log lines on stderr
    assert "sweep: 3/3 done (2 ok, 1 failed, 0 skipped)" in captured.err
    df = load_results(out)
    assert sorted(df["status"]) == ["failed", "ok", "ok"]
    failed = df[df["status"] == "failed"].iloc[0]
    assert "memory exceeded" in failed["error"] and pd.isna(failed["throughput_tok_s"])  # gpu-only: 87 GiB, 47 free
    assert (df[df["status"] == "ok"]["throughput_tok_s"] > 0).all()
    assert '"simpy"' in df["versions"].iloc[0]
    assert len(list((out / "traces").glob("*.npz"))) == 1  # the points' one workload, synthesised once, kept
    # A rerun retries only the failed point, replacing its row (--allow-failures: exit 0 all the same).
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1", "--allow-failures"]) == 0
    assert "2 already done" in capsys.readouterr().out and len(load_results(out)) == 3
    assert main(["sweep-results", str(out)]) == 0
    assert "3 points: 2 ok, 1 failed" in capsys.readouterr().out


def test_points_finished_by_other_code_are_simulated_again(tmp_path, capsys):
    """A store keeps results across runs; a point recorded by other simulator code (or library versions) is not
    reused, so a changed simulator never reports the old code's numbers as its own."""
    spec = _spec(tmp_path, {"fixed": {"model": "mixtral-8x7b", "system": "rtx6000ada-8452y", "batch": 4,
                                      "prompt_len": 8, "gen_len": 2},
                            "axes": {"policy": ["fiddler", "stream-experts"]}})
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1"]) == 0
    before = load_results(out)
    assert '"code"' in before["versions"].iloc[0]
    with sqlite3.connect(out / DB_NAME) as conn:  # as if an older simulator had recorded the first point
        conn.execute("UPDATE points SET versions = ?, metrics = ? WHERE key = ?",
                     ('{"code": "older"}', '{"throughput_tok_s": 1.0}', before["key"].iloc[0]))
    capsys.readouterr()
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "1 already done, 1 ran (of them 1 finished before by other code or library versions)" in captured.out
    assert "1 point(s) finished earlier by other code" in captured.err
    after = load_results(out).set_index("key")
    assert after.loc[before["key"].iloc[0], "throughput_tok_s"] == before["throughput_tok_s"].iloc[0]
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1"]) == 0  # now current: reused
    assert "2 already done, 0 ran," in capsys.readouterr().out
    with sqlite3.connect(out / DB_NAME) as conn:  # an interrupted rerun leaves an old point: listed as such
        conn.execute("UPDATE points SET versions = ? WHERE key = ?", ('{"code": "older"}', before["key"].iloc[0]))
    assert load_results(out)["stale"].tolist().count(True) == 1
    assert main(["sweep-results", str(out)]) == 0
    assert "2 points: 2 ok, 0 failed (1 recorded by other code or library versions" in capsys.readouterr().out


def test_kill_9_mid_sweep_loses_nothing_and_duplicates_nothing(tmp_path):
    spec = _spec(tmp_path, {"fixed": {"model": "mixtral-8x7b", "system": "rtx6000ada-8452y", "policy": "coxmoe",
                                      "prompt_len": 16, "gen_len": 3},
                            "axes": {"batch": [4, 8, 12, 16, 20, 24], "seed": [0, 1, 2, 3]}})
    total = len(load_spec(spec))
    out = tmp_path / "out"
    db = out / DB_NAME
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", "sweep", str(spec), "--out", str(out),
                             "--workers", "1"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    rows = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db) as conn:
                    rows = conn.execute("SELECT COUNT(*) FROM points").fetchone()[0]
            except sqlite3.OperationalError:
                rows = 0
            if rows >= 3:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep finished before it could be killed; make the points slower"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = load_results(out)
    assert 3 <= len(kept) < total and (kept["status"] == "ok").all()
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1"]) == 0
    df = load_results(out)
    assert len(df) == total and df["key"].is_unique and (df["status"] == "ok").all()
    assert set(kept["key"]) <= set(df["key"])


def test_shipped_fig7_spec_expands_to_the_paper_grid():
    points = load_spec(REPO / "experiments" / "specs" / "fig7.yaml")
    assert len(points) == 108
    flexgen = [p.config for p in points if p.config["policy"] == "flexgen"]
    assert len(flexgen) == 36 and all(c["policy_options"] == {"cpu_attention": "on", "kv_gpu_percent": "0"}
                                      for c in flexgen)


def test_ray_engine_on_a_local_instance_matches_the_local_engine(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = _spec(tmp_path, {"fixed": {"model": "mixtral-8x7b", "system": "rtx6000ada-8452y", "batch": 4,
                                      "prompt_len": 8, "gen_len": 2},
                            "axes": {"policy": ["fiddler", "gpu-only", "stream-experts", "coxmoe"]}})
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    assert main(["sweep", str(spec), "--out", str(ray_out), "--engine", "ray", "--workers", "2"]) == 1
    assert "(ray): 4 points, 0 already done, 3 ran, 1 failed" in capsys.readouterr().out
    assert main(["sweep", str(spec), "--out", str(local_out), "--workers", "1", "--allow-failures"]) == 0
    by_ray, by_local = (load_results(d).set_index("key").sort_index() for d in (ray_out, local_out))
    assert list(by_ray.index) == list(by_local.index)
    assert list(by_ray["status"]) == list(by_local["status"])
    pd.testing.assert_series_equal(by_ray["throughput_tok_s"], by_local["throughput_tok_s"])
    assert "memory exceeded" in by_ray.loc[by_ray["status"] == "failed", "error"].iloc[0]
    # Resuming through Ray skips the finished points and retries only the failed one.
    assert main(["sweep", str(spec), "--out", str(ray_out), "--engine", "ray", "--workers", "1"]) == 1
    assert "3 already done, 0 ran, 1 failed" in capsys.readouterr().out


def test_ray_address_comes_from_the_flag_then_the_environment(monkeypatch):
    from experiments.sweep.run import ray_address

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert ray_address(None) == "ray://head:10001"
    assert ray_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_address(None) is None


def test_shipped_fig7_presets_spec_differs_only_in_routing():
    base = load_spec(REPO / "experiments" / "specs" / "fig7.yaml")
    presets = load_spec(REPO / "experiments" / "specs" / "fig7_presets.yaml")
    assert len(presets) == 108
    assert all(p.config["routing"] == f"preset:{p.config['model']}" for p in presets)
    strip = [{k: v for k, v in p.config.items() if k != "routing"} for p in presets]
    assert strip == [{k: v for k, v in p.config.items() if k != "routing"} for p in base]


def test_run_sweep_names_an_unknown_engine(tmp_path):
    from experiments.sweep.run import run_sweep
    from experiments.sweep.store import ResultStore

    store = ResultStore(tmp_path / "o")
    try:
        with pytest.raises(SimInputError, match="unknown sweep engine 'dask'; choose from local, ray"):
            run_sweep([], store, "dask")
    finally:
        store.close()


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_pool_workers_end_with_a_killed_parent(tmp_path):
    """issue 11: after `kill -9` of a sweep its pool workers must not live on."""
    spec = _spec(tmp_path, {"fixed": {"model": "mixtral-8x7b", "system": "rtx6000ada-8452y", "policy": "coxmoe",
                                      "prompt_len": 16, "gen_len": 3},
                            "axes": {"batch": [4, 8, 12, 16, 20, 24], "seed": [0, 1, 2, 3]}})
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", "sweep", str(spec), "--out", str(tmp_path / "o"),
                             "--workers", "2"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    children: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(children) < 2 and proc.poll() is None:
        try:
            children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        except OSError:
            children = []
        time.sleep(0.05)
    assert len(children) >= 2 and proc.poll() is None, "the pool did not start in time"
    time.sleep(0.5)  # let the workers run their initializer
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    alive = children
    while alive and time.monotonic() < deadline:
        alive = [c for c in children if _running(c)]
        time.sleep(0.1)
    assert not alive, f"workers {alive} outlived the killed sweep"


def test_a_sweep_point_can_set_every_simulation_setting():
    """A sweep point's keys are `SimConfig`'s fields (generated, not copied): a new setting is a new sweep key,
    and the only default a sweep changes is its policy (sweeps study CoX-MoE)."""
    from experiments.sweep.spec import POINT_DEFAULTS, resolve_point
    from sim.config import DEFAULTS, FIELD_NAMES

    assert tuple(POINT_DEFAULTS) == FIELD_NAMES
    assert {k for k in FIELD_NAMES if POINT_DEFAULTS[k] != DEFAULTS[k]} == {"policy"}
    point = resolve_point({"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 8, "prompt_len": 16,
                           "gen_len": 4, "policy_options": {"coalesce": False}})
    assert point.sim_config().policy_options == {"coalesce": "off"}  # as the CLI passes it
    with pytest.raises(SimInputError, match="reuse_prob must be a number in"):
        resolve_point({"model": "m", "system": "s", "reuse_prob": 3})


def test_a_sweep_draws_each_missing_synthetic_trace_once_largest_first(tmp_path, monkeypatch):
    """Points sharing a workload share one trace build; a point with a trace file, one whose trace is already on
    disk, or one that cannot run adds none; the largest trace (routed tokens x layers x top-k) comes first."""
    from experiments.sweep.run import trace_builds
    from sim.api import TRACE_CACHE, build_trace
    from sim.config import SimConfig

    monkeypatch.setenv("COXMOE_TRACE_DIR", str(tmp_path / "traces"))
    base = {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 4, "gen_len": 2}
    points = expand({"fixed": base, "axes": {"prompt_len": [8, 64], "policy": ["coxmoe", "moe-lightning"]}})
    assert len(points) == 4
    builds = trace_builds(points)
    assert [b["prompt_len"] for b in builds] == [64, 8]  # two workloads, the longer prompts first
    with pytest.raises(SimInputError, match="unknown model preset 'no-such-model'"):  # refused with the spec
        expand({"fixed": {**base, "prompt_len": 8, "model": "no-such-model"}, "axes": {"policy": ["coxmoe"]}})
    TRACE_CACHE.clear()
    build_trace(SimConfig.from_point(builds[0]))
    assert len(list((tmp_path / "traces").glob("*.npz"))) == 1
    assert [b["prompt_len"] for b in trace_builds(points)] == [8]  # the one on disk is not drawn again
    monkeypatch.setenv("COXMOE_TRACE_DIR", "off")
    assert trace_builds(points) == []  # no disk cache: nothing to share between workers


def test_results_come_back_in_one_order_whatever_order_the_points_finished_in(tmp_path, monkeypatch):
    """Rows are ordered by key, not by finishing time, so two runs of one sweep (other worker counts, a resume)
    give the same table."""
    from experiments.sweep.store import ResultStore

    points = [(f"{k:016x}", {"batch": 8 * (k + 1)}, {"throughput_tok_s": float(k)}) for k in (3, 1, 2, 0)]
    frames = []
    for name, order in (("a", points), ("b", points[::-1])):
        store = ResultStore(tmp_path / name)
        for second, (key, config, metrics) in enumerate(order):
            monkeypatch.setattr("time.gmtime", lambda *_, s=second: time.struct_time((2026, 1, 1, 0, 0, s, 0, 1, 0)))
            store.record(key, config, metrics, None, wall_s=float(second))
        store.close()
        frames.append(load_results(tmp_path / name).drop(columns=["wall_s", "finished_at"]))
    assert list(frames[0]["key"]) == sorted(k for k, _, _ in points)
    pd.testing.assert_frame_equal(frames[0], frames[1])


def test_a_point_whose_input_file_changed_is_a_new_point(tmp_path, monkeypatch):
    """The key covers the bytes of the files a point reads (trace, spec files, profile, hot map), so a resumed
    sweep never reuses a result simulated from an older file; preset-only points keep their config's key."""
    import numpy as np

    from experiments.sweep.spec import point_key
    from traces import SynthConfig, generate_trace, save_trace

    monkeypatch.chdir(tmp_path)
    spec = {"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "trace": "tr.npz"},
            "axes": {"policy": ["coxmoe", "moe-lightning"]}}
    for seed in (0, 1):
        save_trace(generate_trace(SynthConfig("mixtral-8x7b", 32, 8, 2, seed=seed), np.full(4, 8), np.full(4, 2)),
                   f"tr{seed}.npz")
    Path("tr.npz").write_bytes(Path("tr0.npz").read_bytes())
    first = [p.key for p in expand(spec)]
    assert [p.key for p in expand(spec)] == first  # same bytes, same keys
    Path("tr.npz").write_bytes(Path("tr1.npz").read_bytes())
    second = [p.key for p in expand(spec)]
    assert not set(first) & set(second)
    (tmp_path / "prof").mkdir()
    (tmp_path / "prof" / "timings.csv").write_text("a")
    keys = {p.key for p in expand({"fixed": {**spec["fixed"], "profile": "prof"}, "axes": spec["axes"]})}
    (tmp_path / "prof" / "timings.csv").write_text("b")
    assert not keys & {p.key for p in expand({"fixed": {**spec["fixed"], "profile": "prof"}, "axes": spec["axes"]})}
    plain = expand({"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 4, "prompt_len": 8,
                              "gen_len": 2}})[0]
    assert plain.key == point_key(plain.config)


def test_a_result_from_a_changed_input_file_replaces_the_old_row(tmp_path, monkeypatch):
    """One config has one row: the point's new key (its trace changed) replaces the row of the old bytes."""
    from experiments.sweep.store import ResultStore

    store = ResultStore(tmp_path / "sw")
    config = {"model": "mixtral-8x7b", "trace": "tr.npz"}
    store.record("a" * 16, config, {"throughput_tok_s": 1.0}, None, 0.1)
    store.record("c" * 16, {**config, "trace": "other.npz"}, {"throughput_tok_s": 3.0}, None, 0.1)
    store.record("b" * 16, config, {"throughput_tok_s": 2.0}, None, 0.1)
    store.close()
    df = load_results(tmp_path / "sw")
    assert list(df["key"]) == ["b" * 16, "c" * 16] and list(df["throughput_tok_s"]) == [2.0, 3.0]


def test_a_count_table_named_by_the_routing_is_an_input_file(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.chdir(tmp_path)
    w = {"batch": 4, "prompt_len": 8, "gen_len": 2}
    spec = {"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "routing": "table:counts.npy", **w}}
    np.save("counts.npy", np.ones((32, 8)))
    first = expand(spec)[0].key
    np.save("counts.npy", np.arange(1, 257, dtype=np.float64).reshape(32, 8))
    assert expand(spec)[0].key != first
    np.save("counts.npy", np.ones((32, 7)))  # another model's shape: refused when the spec is read
    with pytest.raises(SimInputError, match="32 layers x 7 experts"):
        expand(spec)
    shipped = {"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "routing": "table:mixtral-8x7b", **w}}
    from experiments.sweep.spec import point_key

    assert expand(shipped)[0].key == point_key(expand(shipped)[0].config)  # a shipped table is no input file


def test_a_missing_input_file_is_refused_when_the_spec_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = {"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "trace": "elsewhere/tr.npz"}}
    with pytest.raises(SimInputError, match=r"trace file not found: elsewhere/tr.npz \(relative paths are read "
                                            r"from the current directory"):
        expand(spec)
    spec = {"fixed": {"model": "models/mine.yaml", "system": "a100-80g-8452y"}}
    with pytest.raises(SimInputError, match="model file not found: models/mine.yaml"):
        expand(spec)


def _worker_killer(config, inputs=None, base=None):
    """A point function that kills its worker process on one point (an out-of-memory kill, say)."""
    from experiments.sweep import run

    if config["batch"] == 16:
        os._exit(9)
    return run._original_run_point(config, inputs, base)


def test_a_killed_worker_fails_its_unfinished_points_instead_of_the_sweep(tmp_path, monkeypatch, capsys):
    """A worker that dies takes the points not yet finished with it: they are recorded as failed (a rerun retries
    them), the sweep ends normally, nothing raises. (Forked workers, whatever the platform's default start method
    (Python 3.14 starts them by forkserver on Linux), so that they see the patched point function.)"""
    import multiprocessing

    from experiments.sweep import run
    from experiments.sweep.store import ResultStore

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("this platform cannot fork (the patched point function would not reach the workers)")
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("fork", force=True)
    try:
        _kill_a_worker(tmp_path, monkeypatch, capsys, run, ResultStore)
    finally:
        multiprocessing.set_start_method(previous, force=True)


def _kill_a_worker(tmp_path, monkeypatch, capsys, run, ResultStore) -> None:
    monkeypatch.setattr(run, "_original_run_point", run.run_point, raising=False)
    monkeypatch.setattr(run, "run_point", _worker_killer)
    points = expand({"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "prompt_len": 8, "gen_len": 2,
                               "decode_sample": 1, "policy": "gpu-only"}, "axes": {"batch": [8, 16, 24, 32]}})
    store = ResultStore(tmp_path / "sw")
    summary = run.run_local(points, store, workers=2, progress=False)
    store.close()
    df = load_results(tmp_path / "sw").set_index("batch")
    assert summary.ok + summary.failed == 4 and summary.failed >= 1
    assert df.loc[16, "status"] == "failed" and "worker process died" in df.loc[16, "error"]
    assert "worker process died" in capsys.readouterr().err


def test_an_interrupted_pool_stops_its_workers_at_once():
    """Ctrl-C during a sweep: pending points are cancelled and the workers terminated, not waited for."""
    from concurrent.futures import ProcessPoolExecutor

    from experiments.sweep.run import _stop_pool

    pool = ProcessPoolExecutor(max_workers=2)
    futures = [pool.submit(time.sleep, 60) for _ in range(12)]  # more than the call queue holds (workers + 1)
    time.sleep(1.0)  # the workers are running their first sleeps
    procs = list(pool._processes.values())
    t0 = time.perf_counter()
    _stop_pool(pool, wait=False)
    assert time.perf_counter() - t0 < 15
    deadline = time.monotonic() + 10  # the pool's own thread may reap a worker just after us: poll for it
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(p.is_alive() for p in procs)
    assert sum(f.cancelled() for f in futures) >= 12 - 2 - 3  # not started, not in the call queue: cancelled


def test_an_unwritable_results_database_is_one_os_error(tmp_path, monkeypatch):
    """A full disk or a read-only file system reach the CLI as one OSError line (exit 2), not a sqlite
    traceback; a results file on a read-only mount is still read."""
    from experiments.sweep import store as store_mod

    db = store_mod.ResultStore(tmp_path / "sw")
    db.record("a" * 16, {"batch": 1}, {"throughput_tok_s": 1.0}, None, 0.1)

    class FullDisk:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def execute(self, *args):
            raise sqlite3.OperationalError("database or disk is full")

    real = db.conn
    db.conn = FullDisk()
    with pytest.raises(OSError, match="cannot write the sweep results \\(database or disk is full\\)"):
        db.record("b" * 16, {"batch": 2}, {"throughput_tok_s": 2.0}, None, 0.1)
    db.conn = real
    db.close()

    calls = []
    real_read = store_mod._read_points

    def read_only_mount(path, mode):  # SQLite cannot make the WAL's -shm file on a read-only mount
        calls.append(mode)
        if "immutable" not in mode:
            raise sqlite3.OperationalError("unable to open database file")
        return real_read(path, mode)

    monkeypatch.setattr(store_mod, "_read_points", read_only_mount)
    df = load_results(tmp_path / "sw")
    assert list(df["key"]) == ["a" * 16] and calls == ["mode=ro", "mode=ro&immutable=1"]


def test_unknown_presets_and_policy_options_are_refused_with_the_spec(tmp_path, capsys):
    """They had become failed points after the workers started (exit 1); now the spec is refused (exit 2)."""
    base = {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 4, "prompt_len": 8, "gen_len": 2}
    for axes, message in (({"model": ["mixtral-8x7b", "mixtrl-8x7b"]}, "unknown model preset 'mixtrl-8x7b'"),
                          ({"system": ["a100-80g-8452y", "a101"]}, "a101"),
                          ({"policy_options": [{"rescore": "2"}, {"resscore": "2"}]}, "unknown option(s) resscore")):
        spec = _spec(tmp_path, {"fixed": {k: v for k, v in base.items() if k not in axes}, "axes": axes})
        assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out" / "results.sqlite").exists()


def test_a_key_given_in_two_places_is_refused_and_mapping_settings_merge():
    """A spec key set both in fixed: and by an axis (or by two axes) had the later value win silently (a fixed
    system setting dropped for every point of a settings axis; a seed axis overridden by a workload axis):
    refused, naming the key. Mapping settings merge key by key: an axis's system settings keep fixed:'s."""
    base = {"model": "olmoe-1b-7b", "system": "a100-80g-8452y", "batch": 4, "prompt_len": 8, "gen_len": 2}
    points = expand({"fixed": {**base, "system_settings": {"cpu.amx_efficiency": 0.073}},
                     "axes": {"system_settings": [{}, {"gpu.gemm_efficiency": 0.6}]}})
    assert len(points) == 2
    assert all("cpu.amx_efficiency" in p.config["system_settings"] for p in points)
    assert "gpu.gemm_efficiency" in points[1].config["system_settings"]
    for spec, key in (({"fixed": {**base, "policy": "flexgen"}, "axes": {"policy": ["coxmoe"]}}, "'policy'"),
                      ({"fixed": {k: v for k, v in base.items() if k != "prompt_len"},
                        "axes": {"seed": [0, 1], "workload": [{"prompt_len": 16, "seed": 5}]}}, "'seed'"),
                      ({"fixed": {**base, "policy_options": {"rescore": 2}},
                        "axes": {"policy_options": [{"rescore": 3}]}}, "'policy_options.rescore'")):
        with pytest.raises(SimInputError, match=f"{key} is set both by"):
            expand(spec)


@pytest.mark.parametrize("change, message", [
    ({"routing": "zipff:1.0"}, "unknown routing"),
    ({"routing": "zipf:-1"}, "alpha must be >= 0"),
    ({"routing": "preset:nope"}, "nope"),
    ({"prompt_len": "uniform:10:5"}, "uniform"),
    ({"batch": None}, "give batch, prompt length and generation length"),
    ({"routing": "preset:mixtral-8x7b", "reuse_prob": 0.5}, "reuse"),
])
def test_bad_routing_and_lengths_are_refused_with_the_spec(change, message):
    """They had become failed points (exit 1) once the workers ran them."""
    fixed = {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 4, "prompt_len": 8, "gen_len": 2, **change}
    with pytest.raises(SimInputError, match=message):
        expand({"fixed": {k: v for k, v in fixed.items() if v is not None}})


def test_a_trace_of_another_shape_or_too_few_requests_is_refused_with_the_spec(tmp_path, monkeypatch):
    import numpy as np

    from traces import SynthConfig, generate_trace, save_trace

    monkeypatch.chdir(tmp_path)
    save_trace(generate_trace(SynthConfig("mixtral-8x7b", 32, 8, 2), np.full(4, 8), np.full(4, 2)), "tr.npz")
    ok = {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "trace": "tr.npz"}
    assert len(expand({"fixed": ok})) == 1
    for change, message in (({"batch": 5}, "the trace has 4"), ({"model": "olmoe-1b-7b"}, "trace is for 32 MoE"),
                            ({"prompt_len": 9}, "conflicts with the trace"), ({"reuse_prob": 0.5}, "reuse")):
        with pytest.raises(SimInputError, match=message):
            expand({"fixed": {**ok, **change}})


def test_a_fifo_or_device_named_as_an_input_is_refused_not_read(tmp_path, monkeypatch):
    """A FIFO blocked the spec's hashing for ever, /dev/zero hashed without end."""
    monkeypatch.chdir(tmp_path)
    os.mkfifo("fifo.npz")
    base = {"model": "mixtral-8x7b", "system": "a100-80g-8452y"}
    for trace in ("fifo.npz", "/dev/zero"):
        with pytest.raises(SimInputError, match="not a regular file"):
            expand({"fixed": {**base, "trace": trace}})


def test_bad_environment_settings_stop_the_sweep_before_its_store(tmp_path, capsys, monkeypatch):
    spec = _spec(tmp_path, {"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 4,
                                      "prompt_len": 8, "gen_len": 2}})
    for name in ("COXMOE_MAX_GIB", "COXMOE_TRACE_CACHE_MIB", "COXMOE_TRACE_DIR_GIB"):
        with monkeypatch.context() as m:
            m.setenv(name, "abc")
            assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
            assert name in capsys.readouterr().err
            assert not (tmp_path / "out" / "results.sqlite").exists()
    assert main(["sweep", str(spec), "--out", ""]) == 2
    assert "--out" in capsys.readouterr().err


def test_local_ray_workers_are_capped_and_an_address_needs_the_ray_engine(tmp_path, monkeypatch):
    from experiments.sweep.run import run_sweep
    from experiments.sweep.store import ResultStore

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store = ResultStore(tmp_path / "s")
    try:
        with pytest.raises(SimInputError, match="local workers"):
            run_sweep([], store, "ray", 100_000)
        with pytest.raises(SimInputError, match="needs --engine ray"):
            run_sweep([], store, "local", 1, "10.255.255.1:6379")
    finally:
        store.close()


def test_sweep_results_of_one_spec_and_reproducible_compressed_csv(tmp_path, capsys):
    import gzip
    import zipfile

    base = {"model": "mixtral-8x7b", "system": "rtx6000ada-8452y", "batch": 4, "prompt_len": 8, "gen_len": 2,
            "decode_sample": 2, "policy": "stream-experts"}
    out = tmp_path / "out"
    first = _spec(tmp_path, {"fixed": base, "axes": {"seed": [0, 1]}}, "a.yaml")
    second = _spec(tmp_path, {"fixed": base, "axes": {"routing": ["uniform", "zipf:1.0"]}}, "b.yaml")
    for spec in (first, second):
        assert main(["sweep", str(spec), "--out", str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["sweep-results", str(out), "--spec", str(second)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("2 points") and "routing" in text and "zipf:1.0" in text
    for name in ("r.csv.gz", "r.csv.zip", "r.csv.bz2", "r.csv.xz"):
        blobs = []
        for _ in range(2):
            assert main(["sweep-results", str(out), "--csv", str(tmp_path / name)]) == 0
            blobs.append((tmp_path / name).read_bytes())
        assert blobs[0] == blobs[1]
    assert gzip.decompress((tmp_path / "r.csv.gz").read_bytes()).startswith(b"key,")
    assert zipfile.ZipFile(tmp_path / "r.csv.zip").namelist() == ["r.csv"]
    for name in ("r.csv.gz", "r.csv.zip", "r.csv.bz2", "r.csv.xz"):  # pandas reads each back as it was written
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / name), pd.read_csv(tmp_path / "r.csv.gz"))


def test_a_null_settings_value_merges_as_no_settings():
    """`system_settings: [~, {...}]` had reset fixed:'s settings for the null point (only {} merged)."""
    base = {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 8, "prompt_len": 16, "gen_len": 4}
    points = expand({"fixed": {**base, "system_settings": {"cpu.amx_efficiency": 0.073},
                               "policy_options": {"rescore": 2}},
                     "axes": {"system_settings": [None, {"gpu.gemm_efficiency": 0.6}],
                              "policy": [{"policy": "coxmoe", "policy_options": None}]}})
    assert len(points) == 2
    assert all(p.config["system_settings"].get("cpu.amx_efficiency") == "0.073" for p in points)
    assert all(p.config["policy_options"] == {"rescore": "2"} for p in points)


def test_a_hot_map_of_another_shape_and_a_huge_profile_folder_are_refused_with_the_spec(tmp_path, monkeypatch):
    import numpy as np

    import experiments.sweep.spec as spec_module
    from traces.eas import HotExpertMap, save_map

    monkeypatch.chdir(tmp_path)
    ranking = np.tile(np.arange(6), (4, 1))
    save_map(HotExpertMap("other", ranking, np.ones((4, 6)), 2), "hot.npz")
    base = {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 4, "prompt_len": 8, "gen_len": 2}
    with pytest.raises(SimInputError, match="4 layers x 6 experts"):
        expand({"fixed": {**base, "policy_options": {"hot_map": "hot.npz"}}})
    (tmp_path / "prof").mkdir()
    for i in range(8):
        (tmp_path / "prof" / f"t{i}.csv").write_text("a")
    monkeypatch.setattr(spec_module, "MAX_DIR_ENTRIES", 5)
    with pytest.raises(SimInputError, match="more than 5 entries"):
        expand({"fixed": {**base, "profile": "prof"}})


def test_refusals_of_the_run_come_before_the_results_store(tmp_path, capsys, monkeypatch):
    """--ray-address without the Ray engine had left an empty results.sqlite behind (refused after the store)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = _spec(tmp_path, {"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 4,
                                      "prompt_len": 8, "gen_len": 2}})
    for extra in (["--ray-address", "10.255.255.1:6379"], ["--engine", "ray", "--workers", "100000"]):
        assert main(["sweep", str(spec), "--out", str(tmp_path / "o"), *extra]) == 2
        capsys.readouterr()
        assert not (tmp_path / "o" / "results.sqlite").exists()


def test_a_run_refused_after_the_store_opened_leaves_no_empty_store(tmp_path, capsys, monkeypatch):
    """A cluster that accepts the connection but not the job (ray.init fails) was refused after the results store
    was made, leaving an empty results.sqlite; a store that already held points stays as it was."""
    from experiments.sweep import run

    def refuse(*_args, **_kwargs):
        raise SimInputError("--ray-address 10.0.0.1:6379: cannot join the cluster (not a Ray head)")

    monkeypatch.setattr(run, "run_ray", refuse)
    monkeypatch.setattr(run, "check_ray_address", lambda address: None)  # reachable, as far as the probe knows
    spec = _spec(tmp_path, {"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 4,
                                      "prompt_len": 8, "gen_len": 2, "policy": "coxmoe"}})
    argv = ["sweep", str(spec), "--out", str(tmp_path / "o"), "--engine", "ray", "--ray-address", "10.0.0.1:6379"]
    assert main(argv) == 2
    assert "cannot join the cluster" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o")]) == 0  # one point recorded locally
    capsys.readouterr()
    assert main(argv) == 2
    assert len(load_results(tmp_path / "o")) == 1  # the earlier results stay
    ResultStore(tmp_path / "empty").close()  # a store made earlier, still empty, stays too
    assert main([*argv[:3], str(tmp_path / "empty"), *argv[4:]]) == 2
    assert (tmp_path / "empty" / DB_NAME).exists()
    assert main([*argv[:3], str(tmp_path / "a" / "b" / "c"), *argv[4:]]) == 2
    assert not (tmp_path / "a").exists()  # every folder it made, not only the last


def test_a_discarded_store_that_another_sweep_has_open_is_kept(tmp_path):
    """Two sweeps into one folder: the first, refused, must not delete the database the second still writes."""
    first, second = ResultStore(tmp_path / "o"), ResultStore(tmp_path / "o")
    first.discard_if_unused()
    second.record("k", {"policy": "coxmoe"}, {"throughput_tok_s": 1.0}, None, 0.1)
    second.close()
    assert load_results(tmp_path / "o")["key"].tolist() == ["k"]


def _trace_point_spec(tmp_path: Path, trace: str) -> dict:
    from traces import SynthConfig, generate_trace
    from traces.format import save_trace

    save_trace(generate_trace(SynthConfig("mixtral-8x7b", 32, 8, 2, "uniform", 0.0, 0), [8] * 4, [2] * 4),
               tmp_path / "t.npz")
    return {"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "trace": trace, "decode_sample": 1},
            "axes": {"policy": ["gpu-only", "coxmoe"]}}


def test_an_input_file_edited_during_a_sweep_fails_its_points(tmp_path, monkeypatch):
    """A point is keyed by its files' digests when the spec is expanded; a file changed before a worker reads it
    was simulated and stored under the old key. The run now checks the digests first."""
    from experiments.sweep import run
    from experiments.sweep.store import ResultStore
    from traces import SynthConfig, generate_trace
    from traces.format import save_trace

    monkeypatch.chdir(tmp_path)
    points = expand(_trace_point_spec(tmp_path, "t.npz"))
    assert all(p.inputs == {"trace": points[0].inputs["trace"]} for p in points)
    save_trace(generate_trace(SynthConfig("mixtral-8x7b", 32, 8, 2, "uniform", 0.0, 1), [8] * 4, [2] * 4),
               tmp_path / "t.npz")  # another draw, same shape
    store = ResultStore(tmp_path / "sw")
    summary = run.run_local(points, store, workers=1, progress=False)
    store.close()
    assert summary.failed == 2
    errors = load_results(tmp_path / "sw")["error"]
    assert all("InputChanged: trace file t.npz is not the one the sweep was keyed by" in e for e in errors)


def test_a_cluster_worker_reads_relative_paths_against_the_driver_folder(tmp_path, monkeypatch):
    """Ray's cluster workers start in another folder: a point naming t.npz failed there ('trace file not found');
    the driver's folder travels with the point and the key stays the relative one's."""
    from experiments.sweep.run import run_point
    from experiments.sweep.spec import rebased

    monkeypatch.chdir(tmp_path)
    point = next(p for p in expand(_trace_point_spec(tmp_path, "t.npz")) if p.config["policy"] == "coxmoe")
    config = {**point.config, "routing": "table:c.csv", "policy_options": {"hot_map": "maps/h.npz"}}
    moved = rebased(config, "/driver")
    assert moved["trace"] == "/driver/t.npz" and moved["routing"] == "table:/driver/c.csv"
    assert moved["policy_options"] == {"hot_map": "/driver/maps/h.npz"} and config["trace"] == "t.npz"
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    metrics, error, _ = run_point(point.config, point.inputs)
    assert metrics is None and "trace file not found: t.npz" in error and "every worker needs" in error
    metrics, error, _ = run_point(point.config, point.inputs, base=str(tmp_path))
    assert error is None and metrics["throughput_tok_s"] > 0


@pytest.mark.parametrize("address, message", [("not a host", "not HOST:PORT"), ("127.0.0.1:1", "nothing accepts"),
                                              ("ray://h:99999", "not HOST:PORT")])
def test_a_bad_ray_address_is_refused_before_the_store_is_made(tmp_path, capsys, address, message):
    """An unreachable cluster had Ray retry for minutes (a multi-line warning each time); a malformed address was a
    traceback; both left an empty results store."""
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 8,
                                              "prompt_len": 8, "gen_len": 2, "policy": "gpu-only"}}))
    t0 = time.perf_counter()
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--engine", "ray", "--ray-address", address]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "o").exists()
    assert time.perf_counter() - t0 < 30


def test_sweep_results_of_a_store_with_no_rows(tmp_path, capsys):
    """A sweep stopped before its first point: --spec filtered a frame without columns (KeyError), --csv wrote a
    lone newline pandas cannot read back."""
    from experiments.sweep.store import ResultStore

    ResultStore(tmp_path / "empty").close()
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 8,
                                              "prompt_len": 8, "gen_len": 2, "policy": "gpu-only"}}))
    assert main(["sweep-results", str(tmp_path / "empty"), "--spec", str(spec), "--csv", str(tmp_path / "e.csv")]) == 0
    out = capsys.readouterr()
    assert "0 points" in out.out and "1 of the spec's 1 points have no result yet" in out.err
    back = pd.read_csv(tmp_path / "e.csv")
    assert back.empty and {"key", "status", "throughput_tok_s", "batch"} <= set(back.columns)


def test_sweep_results_show_an_axis_whose_values_include_none(tmp_path, capsys, monkeypatch):
    """Rows that differ only in a setting one of them leaves unset (a `profile` or `trace` axis with null) show
    that column: under pandas 3 `astype(str)` kept the NaN, so the column counted one value and was hidden."""
    import numpy as np
    import pandas as pd

    import experiments.sweep.store as store

    rows = pd.DataFrame({"key": ["a", "b"], "status": ["ok", "ok"], "model": ["m", "m"], "system": ["s", "s"],
                         "policy": ["coxmoe"] * 2, "batch": [8, 8], "prompt_len": [8, 8], "gen_len": [2, 2],
                         "throughput_tok_s": [48529.0, 1105.0], "wall_s": [1.0, 1.0], "error": ["", ""],
                         "profile": [np.nan, "prof-tiny"], "stale": [False, False]})
    monkeypatch.setattr(store, "load_results", lambda folder: rows)
    assert main(["sweep-results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "profile" in out and "prof-tiny" in out
