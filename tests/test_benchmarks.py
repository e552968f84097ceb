"""The speed benchmarks' own instrumentation (the figures themselves are measured by running the scripts)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    if str(ROOT / "benchmarks") not in sys.path:  # as when run as a script: siblings import each other
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BREAKDOWN_POINTS = {
    "simulate": ("from sim.api import simulate\n"
                 "r = simulate('mixtral-8x7b', 'a100-80g-8452y', 'coxmoe', batch=8, prompt_len=16, gen_len=4)\n"
                 "out = {'throughput_tok_s': r.throughput_tok_s}"),
    # the engine case's path: Policy.build (whose search the breakdown had missed: plan builds came out
    # negative), then the engine alone
    "build": ("from sim.api import resolve_model, resolve_routing, resolve_system, simulate_plan\n"
              "from sim.policies import PlanContext, make_policy\n"
              "m, s = resolve_model('mixtral-8x7b'), resolve_system('a100-80g-8452y')\n"
              "wl, tr, _ = resolve_routing(m, 64, 16, 8, None, 'uniform', 0)\n"
              "plan = make_policy('coxmoe').build(PlanContext(m, s, wl, tr))\n"
              "rec, metrics = simulate_plan(plan)\n"
              "from sim.metrics import throughput_tok_s\n"
              "out = {'throughput_tok_s': throughput_tok_s(plan, metrics)}"),
}


@pytest.mark.parametrize("point", sorted(BREAKDOWN_POINTS))
def test_design_space_breakdown_splits_a_point_into_stages_that_add_up(point):
    bench = _load("design_space_speed")
    code = BREAKDOWN_POINTS[point]
    runner = bench.RUNNER.format(code=code, prologue=bench.BREAKDOWN_PROLOGUE, epilogue=bench.BREAKDOWN_EPILOGUE)
    proc = subprocess.run([sys.executable, "-c", runner], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")).removeprefix("RESULT "))
    split = out["split_s"]
    assert out["throughput_tok_s"] > 0
    assert split["engine_runs"] >= 2  # the search's re-scoring runs and the chosen plan's full run
    stages = [split[k] for k in ("trace", "ranking", "plan_builds", "engine", "other")]
    assert split["trace"] > 0 and split["engine"] > 0
    if point == "build":  # 64 requests over Mixtral's 8 experts: every expert busy at most steps, which replay
        assert split["replayed_steps"] >= 3, split
    # `other` is the wall time less the timed stages: no stage is counted twice (nor a nested call of one) exactly
    # when it is not negative; every stage lies within the wall time
    assert all(0 <= v <= out["wall_s"] for v in stages)
    assert abs(sum(stages) - out["wall_s"]) < 1e-6 * max(1.0, out["wall_s"])


def test_hf_block_streaming_reading_counts_the_bytes_of_the_experts_it_multiplies(monkeypatch):
    """The expert block benchmark's streaming bound: bytes of two experts' up/gate and down weights over the
    median call time, whatever the number of experts given."""
    import torch

    bench = _load("hf_moe_block")
    monkeypatch.setattr(bench, "_median_time", lambda fn, repeats: (fn(), 0.5)[1])  # the calls run; 0.5 s each
    w13 = torch.zeros(3, 2 * 8, 4, dtype=torch.bfloat16)
    w2 = torch.zeros(3, 4, 8, dtype=torch.bfloat16)
    assert bench.kernel_streaming(w13, w2) == 2 * (2 * 8 * 4 + 4 * 8) * 2 / 0.5
    assert bench.kernel_streaming(w13[:1], w2[:1]) == (2 * 8 * 4 + 4 * 8) * 2 / 0.5


def test_sweep_speed_runs_each_worker_count_from_scratch(monkeypatch, capsys):
    """Runs in one process shared the in-memory trace cache (forked workers inherit it) and the first run's trace
    files: a 2-worker run after a 1-worker one measured 7.5x on 2 CPUs. Each count now gets its own interpreter and
    an empty trace directory; the speedup is over the smallest count given; counts below 1 are refused."""
    import pytest

    bench = _load("sweep_speed")
    calls = []

    def fake_run(argv, cwd, env, capture_output, text):
        calls.append((argv, env["COXMOE_TRACE_DIR"]))
        assert argv[0] == sys.executable and argv[1] == "-c" and not Path(env["COXMOE_TRACE_DIR"]).exists()
        wall = {"1": 4.0, "2": 2.5}[argv[-1]]
        return subprocess.CompletedProcess(argv, 0, f'RESULT {{"points": 4, "wall_s": {wall}, "ok": 4, "failed": 0}}',
                                           "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["sweep_speed.py", "--spec", "s.yaml", "--workers", "2", "1", "2"])
    bench.main()
    out = capsys.readouterr().out
    assert [c[0][-1] for c in calls] == ["1", "2"] and calls[0][1] != calls[1][1]
    assert "speedup with 2 worker(s) over 1: 1.60x" in out
    monkeypatch.setattr(sys, "argv", ["sweep_speed.py", "--workers", "0"])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2 and "must be >= 1, got 0" in capsys.readouterr().err


def test_engine_exactness_fingerprints_repeat_and_a_changed_point_fails_the_compare(monkeypatch, tmp_path, capsys):
    """The refactoring check of issue 13: the same code gives the same fingerprints; a point whose record or plan
    differs (here, edited in the saved file) is named and exits 1; a point that does not fit is kept as refused."""
    bench = _load("engine_exactness")
    small = [("mixtral-8x7b", "a100-80g-8452y", "coxmoe", 8, 16, 2, 0),
             ("mixtral-8x7b", "a100-80g-8452y", "gpu-only", 8, 16, 2, 0)]
    monkeypatch.setattr(bench, "cases", lambda quick: small)
    saved = tmp_path / "before.json"
    monkeypatch.setattr(sys, "argv", ["engine_exactness.py", "--out", str(saved)])
    assert bench.main() == 0
    prints = json.loads(saved.read_text())
    ok, refused = prints["mixtral-8x7b/a100-80g-8452y/coxmoe/8/16/2/0"], prints[
        "mixtral-8x7b/a100-80g-8452y/gpu-only/8/16/2/0"]
    assert ok["throughput_tok_s"] > 0 and len(ok["record"]) == len(ok["plan"]) == 16
    assert refused == {"refused": "CapacityError"}
    monkeypatch.setattr(sys, "argv", ["engine_exactness.py", "--compare", str(saved)])
    assert bench.main() == 0 and "0 of 2 points changed" in capsys.readouterr().out
    ok["record"] = "0" * 16
    saved.write_text(json.dumps(prints))
    assert bench.main() == 1
    out = capsys.readouterr().out
    assert "changed: mixtral-8x7b/a100-80g-8452y/coxmoe/8/16/2/0" in out and "1 of 2 points changed" in out
    # --out and --compare naming one file compare against the file as it was, then replace it
    monkeypatch.setattr(sys, "argv", ["engine_exactness.py", "--compare", str(saved), "--out", str(saved)])
    assert bench.main() == 1 and json.loads(saved.read_text())["mixtral-8x7b/a100-80g-8452y/coxmoe/8/16/2/0"][
        "record"] != "0" * 16
    capsys.readouterr()


def test_engine_exactness_hashes_every_ops_times_and_the_plan(monkeypatch):
    """One nanosecond on one op's end, or one op's bytes, changes the point's fingerprint."""
    import sim.api

    bench = _load("engine_exactness")
    case = ("mixtral-8x7b", "a100-80g-8452y", "coxmoe", 8, 16, 2, 0)
    base = bench.fingerprint(case)
    real = sim.api.simulate

    def later(*args, **kwargs):
        r = real(*args, **kwargs)
        r.record.end_ns[-1] += 1
        return r

    monkeypatch.setattr(sim.api, "simulate", later)
    moved = bench.fingerprint(case)
    assert moved["record"] != base["record"] and moved["plan"] == base["plan"]

    def heavier(*args, **kwargs):
        r = real(*args, **kwargs)
        r.plan.ops[-1] = dataclasses.replace(r.plan.ops[-1], bytes=r.plan.ops[-1].bytes + 1)
        return r

    monkeypatch.setattr(sim.api, "simulate", heavier)
    changed = bench.fingerprint(case)
    assert changed["plan"] != base["plan"] and changed["record"] == base["record"]


def test_cpu_attention_rate_prices_the_executors_attention_in_the_simulators_units():
    """The script's prefill rate is the simulator's causal attention FLOPs over the measured time, its decode rate
    the KV bytes of the keys read; an MLA model (whose OP1 needs weights) is refused in one line."""
    from sim.specs import load_model

    bench = _load("cpu_attention_rate")
    out = bench.measure("mixtral-8x7b", [8, 16], 1, gemm_size=16)
    spec = load_model("mixtral-8x7b")
    assert [row["tokens"] for row in out["prefill"]] == [8, 16]
    for row in out["prefill"]:
        s = row["tokens"]
        flops = spec.attention_flops(s, s * (s + 1) // 2, prefill=True)
        assert row["flops_per_s"] * row["seconds"] == pytest.approx(flops)
    for row in out["decode"]:
        kv_bytes = (row["kv_tokens"] + 1) * spec.kv_values_per_token_layer * 2
        assert row["kv_bytes_per_s"] * row["seconds"] == pytest.approx(kv_bytes)
    assert out["gemm_flops_per_s"] > 0 and out["copy_bytes_per_s"] > 0 and out["gemm_rows"] == 16
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_attention_rate.py"), "--model",
                              "deepseek-v2-lite"], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == ["cpu_attention_rate: error: model deepseek-v2-lite has mla "
                                                   "attention; only GQA models are measured (their OP1 needs no "
                                                   "weights)"]


def test_design_space_warms_numbas_kernels_for_the_signatures_its_cases_use(monkeypatch):
    """The warm-up compiles (or loads) the trace kernels in a fresh process with COXMOE_JIT=on and reports its
    seconds; a warm-up that failed would stop the benchmark rather than leave a compile inside a timed case."""
    pytest.importorskip("numba")
    bench = _load("design_space_speed")
    seconds = bench.warm_jit()
    assert 0 < seconds < 120
    monkeypatch.setattr(bench, "WARM_JIT", "raise SystemExit(3)")
    with pytest.raises(subprocess.CalledProcessError):
        bench.warm_jit()


def test_design_space_repeats_judge_the_fastest_run_and_list_every_one(monkeypatch, capsys):
    """--repeats N: each case runs N times (fresh processes); the fastest is judged against its target, each
    wall time is printed, and the peak memory reported is the largest of the runs."""
    bench = _load("design_space_speed")
    walls, peaks = iter([1.4, 0.9, 1.2]), iter([0.2, 0.1, 0.3])
    monkeypatch.setattr(bench, "warm_jit", lambda: 0.1)
    monkeypatch.setattr(bench, "run_case", lambda name, breakdown: {"wall_s": next(walls), "peak_rss_gb": next(peaks),
                                                                    "throughput_tok_s": 1.0})
    monkeypatch.setattr(sys, "argv", ["design_space_speed.py", "--cases", "standard", "--repeats", "3"])
    bench.main()
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("standard") and "0.90 s meets < 1" in line and "peak RSS 0.30 GB" in line
    assert line.endswith("runs: 1.40, 0.90, 1.20 s")


def test_decode_sample_grid_compares_every_point_with_its_full_decode(tmp_path, capsys, monkeypatch):
    """`decode_sample_error.py --grid`: a sampling sweep spec runs as given and with every decode step, and each
    point's throughput error is printed with the worst and the verdict against issue 13's 0.5%; a spec that
    samples no decode steps is refused."""
    bench = _load("decode_sample_error")
    spec = tmp_path / "grid.yaml"
    spec.write_text("fixed: {model: mixtral-8x7b, system: a100-80g-8452y, batch: 8, prompt_len: 16, gen_len: 4, "
                    "decode_sample: 2}\naxes:\n  policy: [coxmoe, flexgen]\n")
    monkeypatch.setattr(sys, "argv", ["decode_sample_error.py", "--grid", str(spec), "--workers", "1", "--keep",
                                      str(tmp_path / "runs")])
    bench.main()
    out = capsys.readouterr().out
    assert "2 points compared (decode sample 2" in out
    assert "largest |error|" in out and ("meets issue 13's bound" in out or "misses issue 13's bound" in out)
    full = bench.throughputs(tmp_path / "runs" / "full")
    sampled = bench.throughputs(tmp_path / "runs" / "sampled")
    assert full.keys() == sampled.keys() and len(full) == 2
    with pytest.raises(SystemExit, match="every decode step already"):
        spec.write_text("fixed: {model: mixtral-8x7b, batch: 8}\naxes:\n  policy: [coxmoe]\n")
        bench.grid(spec, 1, None)
