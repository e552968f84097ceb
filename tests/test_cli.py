"""The `coxmoe` CLI: outputs, files it writes, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from experiments.cli import main
from traces import SynthConfig, generate_trace, load_trace, save_trace

SIM = ["simulate", "--model", "olmoe-1b-7b", "--system", "a100-80g-8452y", "--batch", "8", "--prompt-len", "16",
       "--gen-len", "4"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_json_has_the_documented_fields(capsys):
    code, out, err = run(capsys, *SIM, "--policy", "gpu-only", "--json")
    assert code == 0, err
    d = json.loads(out)
    for key in ("throughput_tok_s", "prefill_s", "decode_s", "total_s", "peak_gpu_bytes", "peak_cpu_bytes",
                "busy_fraction", "knobs", "events", "engine", "wall_s"):
        assert key in d
    assert set(d["busy_fraction"]) == {"gpu", "cpu", "cpu_experts", "h2d", "h2d_act", "d2h"}
    assert d["policy"] == "gpu-only" and d["knobs"]["prefill_tokens"] == 8192
    assert d["throughput_tok_s"] > 0
    # the GPU alone does the work: nothing contends, so the plan is list-scheduled without SimPy events
    assert (d["engine"], d["events"]) == ("list", 0)


def test_simulate_is_deterministic_through_the_cli(capsys):
    outs = []
    for _ in range(2):
        code, out, _ = run(capsys, *SIM, "--routing", "zipf:1.3", "--seed", "7", "--json",
                           "--policy-opt", "fetch=routed")
        assert code == 0
        d = json.loads(out)
        d.pop("wall_s")
        outs.append(d)
    assert outs[0] == outs[1]


def test_a_cpu_without_amx_is_not_labelled_amx(capsys, tmp_path, monkeypatch):
    """The EPYC machine's CPU tracks (timeline and plot) say CPU, not CPU (AMX)."""
    import experiments.plots as plots

    labels: list[str] = []
    real = plots.track_name
    monkeypatch.setattr(plots, "track_name", lambda *a: labels.append(real(*a)) or labels[-1])
    tl, png = tmp_path / "t.json", tmp_path / "p.png"
    code, _, err = run(capsys, "simulate", "--model", "mixtral-8x7b", "--system", "a5000-epyc7453-512g", "--policy",
                       "coxmoe", "--batch", "32", "--prompt-len", "32", "--gen-len", "4", "--timeline", str(tl),
                       "--plot", str(png))
    assert code == 0, err
    names = {e["args"]["name"] for e in json.loads(tl.read_text())["traceEvents"] if e.get("name") == "thread_name"}
    assert {"CPU compute", "CPU experts"} <= names and not any("AMX" in n for n in names)
    assert "CPU experts" in labels and not any("AMX" in n for n in labels)


def test_timeline_and_plot_files(capsys, tmp_path):
    tl, png = tmp_path / "t.json", tmp_path / "p.png"
    code, out, err = run(capsys, *SIM, "--timeline", str(tl), "--plot", str(png))
    assert code == 0, err
    trace = json.loads(tl.read_text())
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    names = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert names == {"GPU compute", "CPU (AMX) compute", "CPU (AMX) experts", "PCIe H2D weights",
                     "PCIe H2D activations", "PCIe D2H"}
    assert slices and all(e["dur"] >= 0 for e in slices)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "throughput" in out


def test_presets_list_and_show_round_trip(capsys, tmp_path):
    code, out, _ = run(capsys, "presets", "--json")
    lists = json.loads(out)
    assert "a100-80g-8452y" in lists["systems"] and "deepseek-v3" in lists["models"]
    code, out, _ = run(capsys, "presets", "--show", "h100-80g-8452y")
    assert code == 0 and yaml.safe_load(out)["gpu"]["name"] == "h100-pcie"
    sys_file = tmp_path / "sys.yaml"
    sys_file.write_text(out)
    code, out, _ = run(capsys, "presets", "--show", "olmoe-1b-7b")
    model_file = tmp_path / "model.yaml"
    model_file.write_text(out)
    code, out, err = run(capsys, "simulate", "--model-file", str(model_file), "--system-file", str(sys_file),
                         "--batch", "4", "--prompt-len", "8", "--gen-len", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["system"] == "h100-80g-8452y"
    for name in lists["lengths"]:  # the listed length presets show too: their distribution, the one --prompt-len draws
        code, out, err = run(capsys, "presets", "--show", name)
        shown = yaml.safe_load(out)
        assert code == 0 and shown["name"] == name and shown["spec"].startswith("lognormal:") and shown["source"], err


def test_policies_listing(capsys):
    code, out, _ = run(capsys, "policies")
    assert code == 0 and "gpu-only" in out and "stream-experts" in out and "decode_micro_batch" in out


def test_trace_gen_stats_validate_and_simulate(capsys, tmp_path):
    path = tmp_path / "t.npz"
    code, out, err = run(capsys, "trace", "gen", "--model", "mixtral-8x7b", "--requests", "6", "--prompt-len",
                         "uniform:4:12", "--gen-len", "5", "--routing", "table:mixtral-8x7b", "--reuse-prob", "0.3",
                         "-o", str(path))
    assert code == 0, err
    tr = load_trace(path)
    assert tr.num_requests == 6 and tr.header.num_experts == 8 and tr.header.model == "mixtral-8x7b"
    code, out, _ = run(capsys, "trace", "stats", str(path), "--json")
    stats = json.loads(out)
    assert len(stats["lru_hit_rate"]) == 32 and len(stats["mean_lru_hit_rate"]) == 8
    code, out, _ = run(capsys, "trace", "stats", str(path))
    assert "LRU hit rate" in out
    code, out, _ = run(capsys, "trace", "validate", str(path))
    assert code == 0 and out.startswith("ok:")
    code, out, err = run(capsys, "simulate", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y",
                         "--trace", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["workload"]["batch"] == 6


def test_trace_gen_without_model(capsys, tmp_path):
    path = tmp_path / "c.npz"
    code, _, err = run(capsys, "trace", "gen", "--layers", "2", "--experts", "300", "--top-k", "3", "--requests",
                       "2", "--prompt-len", "3", "--gen-len", "2", "-o", str(path))
    assert code == 0, err
    assert load_trace(path).experts.dtype == np.uint16


def _bad_trace(tmp_path, kind):
    cfg = SynthConfig("olmoe-1b-7b", 16, 64, 8, "uniform", 0.0, 0)
    tr = generate_trace(cfg, np.full(3, 5), np.full(3, 3))
    path = save_trace(tr, tmp_path / f"{kind}.npz")
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind in ("range", "version"):
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if kind == "range":
            arrays["experts"][0, 0, 0] = 64
        else:
            meta = json.loads(arrays["header"].tobytes())
            meta["version"] = 9
            arrays["header"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez(path, **arrays)
    return str(path)


BAD_INPUTS = [
    (lambda p: ["trace", "validate", _bad_trace(p, "range")], "expert id 64 out of range"),
    (lambda p: ["trace", "validate", _bad_trace(p, "truncated")], "truncated"),
    (lambda p: ["trace", "validate", _bad_trace(p, "version")], "unsupported trace version 9"),
    (lambda p: ["trace", "stats", str(p / "missing.npz")], "not found"),
    (lambda p: ["simulate", "--model", "gpt-5", "--system", "a100-80g-8452y", "--batch", "1", "--prompt-len", "1",
                "--gen-len", "1"], "unknown model preset"),
    (lambda p: ["simulate", "--model", "olmoe-1b-7b", "--system", "tpu", "--batch", "1", "--prompt-len", "1",
                "--gen-len", "1"], "unknown system preset"),
    (lambda p: [*SIM[:-2], "--gen-len", "-4"], "must be >= 1"),
    (lambda p: [*SIM, "--batch", "zero"], "expected an integer >= 1"),
    (lambda p: [*SIM, "--policy", "magic"], "unknown policy"),
    (lambda p: [*SIM, "--policy-opt", "attention=tpu"], "attention must be"),
    (lambda p: [*SIM, "--policy-opt", "noequals"], "KEY=VALUE"),
    (lambda p: [*SIM, "--routing", "zipf:abc"], "zipf needs a number"),
    (lambda p: [*SIM, "--routing", "uniform:3"], "use uniform, zipf:ALPHA, table:NAME or preset:NAME"),
    (lambda p: [*SIM, "--reuse-prob", "2"], "must be in [0, 1]"),
    (lambda p: ["simulate", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--policy", "gpu-only",
                "--batch", "1", "--prompt-len", "1", "--gen-len", "2"], "memory exceeded"),
    (lambda p: ["simulate", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--trace",
                _bad_trace(p, "ok")], "trace is for 16 MoE layers"),
    (lambda p: ["trace", "gen", "--requests", "2", "--prompt-len", "3", "--gen-len", "2", "-o",
                str(p / "x.npz")], "give --model"),
    (lambda p: ["trace", "gen", "--model", "olmoe-1b-7b", "--requests", "2", "--prompt-len", "uniform:9:3",
                "--gen-len", "2", "-o", str(p / "x.npz")], "HI must be >= LO"),
    (lambda p: ["presets", "--show", "nothing"], "unknown preset"),
    (lambda p: ["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, *argv(tmp_path))
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert out == ""
    assert not (tmp_path / "x.npz").exists()


def test_console_script_exit_status_and_no_traceback(tmp_path):
    bad = _bad_trace(tmp_path, "range")
    proc = subprocess.run([sys.executable, "-m", "experiments.cli", "trace", "validate", bad],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("coxmoe: error:") and "Traceback" not in proc.stderr


def test_plan_out_then_run_plan(capsys, tmp_path):
    plan = tmp_path / "p.parquet"
    code, out, err = run(capsys, *SIM, "--plan-out", str(plan), "--json")
    assert code == 0, err
    sim = json.loads(out)
    code, out, err = run(capsys, "run-plan", str(plan), "--json", "--timeline", str(tmp_path / "t.json"))
    assert code == 0, err
    again = json.loads(out)
    assert again["total_s"] == sim["total_s"] and again["events"] == sim["events"]
    code, _, err = run(capsys, "run-plan", str(tmp_path / "t.json"))
    assert code == 2 and "not a readable Parquet plan" in err


def test_run_plan_prices_with_the_profile_it_is_given(capsys, tmp_path):
    """A plan file does not record its cost model: run-plan says what it priced with, and `--profile` prices it as
    `simulate --profile` did (the roofline had re-priced such a plan 17x faster without a word)."""
    profile = str(Path(__file__).resolve().parents[1] / "docs" / "reproduce" / "calibration_profile")
    plan = tmp_path / "p.parquet"
    code, out, err = run(capsys, "simulate", "--model", "deepseek-v2-lite", "--system", "a100-80g-8452y", "--policy",
                         "cpu-only", "--batch", "4", "--prompt-len", "8", "--gen-len", "2", "--profile", profile,
                         "--plan-out", str(plan), "--json")
    assert code == 0, err
    sim = json.loads(out)
    code, out, err = run(capsys, "run-plan", str(plan), "--profile", profile, "--json")
    assert code == 0, err
    again = json.loads(out)
    assert again["total_s"] == sim["total_s"] and again["priced_by"] == f"profile {profile}"
    code, out, err = run(capsys, "run-plan", str(plan))
    assert code == 0 and "priced by the roofline" in out


def test_run_plan_verifies_a_plan_against_its_trace(capsys, tmp_path):
    traces = {}
    for seed in (0, 1):
        traces[seed] = str(tmp_path / f"t{seed}.npz")
        code, _, err = run(capsys, "trace", "gen", "--model", "olmoe-1b-7b", "--requests", "8", "--prompt-len", "16",
                           "--gen-len", "4", "--seed", str(seed), "-o", traces[seed])
        assert code == 0, err
    plan = tmp_path / "p.parquet"
    code, _, err = run(capsys, "simulate", "--model", "olmoe-1b-7b", "--system", "a100-80g-8452y", "--policy",
                       "coxmoe", "--trace", traces[0], "--plan-out", str(plan))
    assert code == 0, err
    code, out, err = run(capsys, "run-plan", str(plan), "--verify", traces[0])
    assert code == 0 and "every assignment of" in out, err
    code, _, err = run(capsys, "run-plan", str(plan), "--verify", traces[1])  # another routing: counts disagree
    assert code == 2 and "its scope routes" in err
    other = str(tmp_path / "other.npz")
    for extra, message in ((["--gen-len", "5"], "not the trace the plan was built from"),
                           (["--model", "mixtral-8x7b"], "MoE layers")):
        args = ["--model", "olmoe-1b-7b", "--requests", "8", "--prompt-len", "16", "--gen-len", "4"]
        for flag, value in zip(extra[::2], extra[1::2], strict=True):
            args[args.index(flag) + 1] = value
        code, _, err = run(capsys, "trace", "gen", *args, "-o", other)
        assert code == 0, err
        code, _, err = run(capsys, "run-plan", str(plan), "--verify", other)
        assert code == 2 and message in err, err


def _tiny_model_file(tmp_path):
    import dataclasses

    from sim.specs import ModelSpec

    spec = ModelSpec(name="tiny", num_layers=3, hidden_size=256, vocab_size=1000, num_attention_heads=8,
                     num_kv_heads=2, head_dim=32, num_experts=8, top_k=2, expert_intermediate_size=512)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(spec)))
    return str(path)


def test_compare_on_two_workers_gives_the_same_results(capsys, tmp_path):
    """`compare --workers 2` runs the policies in two processes; every result but the wall times is the same."""
    base = ["compare", "--model-file", _tiny_model_file(tmp_path), "--system", "a100-80g-8452y", "--batch", "8",
            "--prompt-len", "6", "--gen-len", "3", "--policies", "coxmoe,moe-lightning,fiddler", "--json"]
    outs = []
    for workers in ("1", "2"):
        code, out, err = run(capsys, *base, "--workers", workers)
        assert code == 0, err
        d = json.loads(out)
        outs.append({p: {k: v for k, v in r.items() if k not in ("wall_s", "search")}
                     for p, r in d["policies"].items()})
    assert outs[0] == outs[1] and list(outs[0]) == ["coxmoe", "moe-lightning", "fiddler"]


def test_compare_runs_one_process_per_cpu_by_default(tmp_path, monkeypatch):
    """Without `workers`, `compare` (and the CLI without --workers) runs the policies on one process per CPU the
    process may use, at most one per policy."""
    from sim import compare as compare_module

    pools = []

    class Spy(compare_module.ProcessPoolExecutor):
        def __init__(self, max_workers=None, **kwargs):
            pools.append(max_workers)
            super().__init__(max_workers=max_workers, **kwargs)

    monkeypatch.setattr(compare_module, "ProcessPoolExecutor", Spy)
    monkeypatch.setattr(compare_module, "default_workers", lambda: 3)
    monkeypatch.setenv("COXMOE_MAX_GIB", "0.001")  # any machine holds three processes of 1 MiB
    r = compare_module.compare(_tiny_model_file(tmp_path), "a100-80g-8452y", batch=8, prompt_len=6, gen_len=3,
                               policies=("coxmoe", "fiddler"))
    assert pools == [2] and all(v["feasible"] for v in r["policies"].values())
    monkeypatch.setattr(compare_module, "default_workers", lambda: 1)
    compare_module.compare(_tiny_model_file(tmp_path), "a100-80g-8452y", batch=8, prompt_len=6, gen_len=3,
                           policies=("coxmoe", "fiddler"))
    assert pools == [2]  # one CPU: in this process
    monkeypatch.setattr(compare_module, "default_workers", lambda: 64)
    monkeypatch.setenv("COXMOE_MAX_GIB", str(2**20))  # no machine holds two processes of 1 PiB
    assert compare_module.default_compare_workers(7) == 1
    monkeypatch.setenv("COXMOE_MAX_GIB", "0.001")
    assert compare_module.default_compare_workers(7) == 7
    monkeypatch.setattr(compare_module.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    assert compare_module.default_compare_workers(7) == 1  # no fork: a caller's unguarded script stays safe


def test_compare_starts_the_longest_policies_first_and_reports_in_order(tmp_path, monkeypatch):
    """On several workers the jobs start longest typical simulation first (unlisted policies before all, ties in
    the given order); the results come back in the order the policies were asked for."""
    from sim import compare as compare_module

    order = compare_module.submission_order(["gpu-only", "coxmoe", "mine", "moe-lightning", "fiddler", "flexgen"])
    assert order == [2, 3, 5, 1, 4, 0]
    assert compare_module.submission_order(["coxmoe", "moe-lightning", "coxmoe"]) == [1, 0, 2]  # the ablation's
    submitted = []

    class Spy(compare_module.ProcessPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            submitted.append(args[2])
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(compare_module, "ProcessPoolExecutor", Spy)
    r = compare_module.compare(_tiny_model_file(tmp_path), "a100-80g-8452y", batch=8, prompt_len=6, gen_len=3,
                               policies=("fiddler", "coxmoe", "moe-lightning"), workers=2)
    assert submitted == ["moe-lightning", "coxmoe", "fiddler"]
    assert list(r["policies"]) == ["fiddler", "coxmoe", "moe-lightning"]
    assert [v["policy"] for v in r["policies"].values()] == ["fiddler", "coxmoe", "moe-lightning"]


@pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(), reason="needs fork")
def test_compare_workers_inherit_the_trace_instead_of_unpickling_it(tmp_path, monkeypatch):
    """Forked workers read the parent's trace (copy-on-write): a trace that cannot be pickled still runs, and
    the parent keeps no reference to it once the jobs are done."""
    from sim import compare as compare_module
    from traces import RoutingTrace

    def refuse(self):
        raise AssertionError("the trace was pickled for a worker")

    monkeypatch.setattr(RoutingTrace, "__reduce__", refuse, raising=False)
    r = compare_module.compare(_tiny_model_file(tmp_path), "a100-80g-8452y", batch=8, prompt_len=6, gen_len=3,
                               policies=("coxmoe", "fiddler"), workers=2)
    assert all(v["feasible"] for v in r["policies"].values())
    assert compare_module._FORKED_TRACE == []


def test_compare_json_has_every_policy_and_speedups(capsys, tmp_path):
    code, out, err = run(capsys, "compare", "--model-file", _tiny_model_file(tmp_path), "--system",
                         "a100-80g-8452y", "--batch", "8", "--prompt-len", "6", "--gen-len", "3", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert set(d["policies"]) == {"coxmoe", "moe-lightning", "flexgen", "fiddler", "stream-experts", "gpu-only",
                                  "moe-gen"}
    cox = d["policies"]["coxmoe"]
    for key in ("throughput_tok_s", "busy_fraction", "peak_gpu_bytes", "knobs", "analytic_total_s"):
        assert key in cox
    for policy, speedup in d["coxmoe_speedup"].items():
        assert speedup == pytest.approx(cox["throughput_tok_s"] / d["policies"][policy]["throughput_tok_s"])
    code, out, _ = run(capsys, "compare", "--model-file", _tiny_model_file(tmp_path), "--system", "a100-80g-8452y",
                       "--batch", "8", "--prompt-len", "6", "--gen-len", "3", "--policies", "coxmoe,flexgen")
    assert code == 0 and "flexgen" in out and "fiddler" not in out


def test_compare_reports_policies_that_do_not_fit(capsys):
    code, out, err = run(capsys, "compare", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--batch", "2",
                         "--prompt-len", "4", "--gen-len", "2", "--policies", "gpu-only,stream-experts", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["policies"]["gpu-only"]["feasible"] is False and "memory exceeded" in d["policies"]["gpu-only"]["error"]
    assert d["policies"]["stream-experts"]["feasible"] is True


def test_ablation_steps(capsys, tmp_path):
    code, out, err = run(capsys, "ablation", "--model-file", _tiny_model_file(tmp_path), "--system",
                         "rtx6000ada-8452y", "--batch", "8", "--prompt-len", "6", "--gen-len", "3", "--json")
    assert code == 0, err
    steps = json.loads(out)["steps"]
    assert steps[0]["step"].startswith("MoE-Lightning") and steps[0]["speedup_over_moe_lightning"] == 1.0
    assert [s["options"] for s in steps[1:4]] == [{"attention": "gpu", "stratify": "off"}, {"stratify": "off"}, {}]
    assert steps[4]["knobs"]["coalesce"] == "off"


def test_length_distributions_and_requests_that_finish_at_different_steps(capsys):
    """--prompt-len / --gen-len take a distribution: lengths drawn per request (seeded), and a batch whose
    requests finish at different steps decodes for its longest request with a shrinking batch."""
    base = ["simulate", "--model", "olmoe-1b-7b", "--system", "a100-80g-8452y", "--policy", "coxmoe", "--batch", "64",
            "--prompt-len", "lognormal:64:0.5:256", "--json"]
    runs = {}
    for gen in ("16", "lognormal:12:0.9:64"):
        code, out, err = run(capsys, *base, "--gen-len", gen)
        assert code == 0, err
        runs[gen] = json.loads(out)
    fixed, spread = runs["16"], runs["lognormal:12:0.9:64"]
    assert fixed["workload"]["prompt_tokens"] == spread["workload"]["prompt_tokens"]  # same seed, same prompts
    assert fixed["workload"]["prompt_len_max"] > fixed["workload"]["prompt_len_mean"] > 40
    assert spread["workload"]["gen_len_max"] > 2 * spread["workload"]["gen_len_mean"]
    # decode runs until the longest request ends, with fewer requests per step than at the start
    assert spread["decode_s"] / spread["workload"]["generated_tokens"] > \
        fixed["decode_s"] / fixed["workload"]["generated_tokens"]
    code, out, err = run(capsys, *base[:-1], "--gen-len", "lognormal:12:0.9:64")  # the text says they vary
    w = spread["workload"]
    assert code == 0 and (f"prompt mean {w['prompt_len_mean']:.1f} (max {w['prompt_len_max']}), generate mean "
                          f"{w['gen_len_mean']:.1f} (max {w['gen_len_max']}) tokens") in out
    code, _, err = run(capsys, *base, "--gen-len", "lognormal:12:-1")
    assert code == 2 and "SIGMA in [0, 10]" in err


def test_presets_show_json_and_keep_outside_all(capsys, tmp_path):
    code, out, err = run(capsys, "presets", "--show", "mixtral-8x7b", "--json")
    assert code == 0, err
    assert json.loads(out)["num_experts"] == 8  # JSON, as --json says (it printed YAML)
    code, _, err = run(capsys, "reproduce", "table3", "--out", str(tmp_path), "--keep", "fig7")
    assert code == 2 and "--keep carries figures of `reproduce all`" in err


def test_compare_policies_are_stripped_and_a_repeat_refused(capsys, tmp_path):
    base = ["compare", "--model-file", _tiny_model_file(tmp_path), "--system", "a100-80g-8452y", "--batch", "8",
            "--prompt-len", "6", "--gen-len", "3", "--workers", "1", "--json"]
    code, out, err = run(capsys, *base, "--policies", "coxmoe, fiddler,")
    assert code == 0, err
    assert list(json.loads(out)["policies"]) == ["coxmoe", "fiddler"]
    code, out, err = run(capsys, *base, "--policies", "coxmoe,fiddler,coxmoe")
    assert code == 2 and err.count("\n") == 1 and "names coxmoe twice" in err, err


def test_a_run_that_does_not_fit_is_noted_with_its_reason():
    from sim.compare import compare_table, failure_note

    search = "policy flexgen: no configuration fits its memory model on t4 (0.5 GiB of GPU memory)"
    assert failure_note(search) == "no configuration fits its memory model on t4 (0.5 GiB of GPU memory)"
    assert failure_note("GPU (t4) for gpu-only memory exceeded: need 9.1 GiB, have 0.5") == (
        "GPU (t4) for gpu-only memory exceeded")
    table = compare_table({"policies": {"flexgen": {"feasible": False, "error": search}}, "coxmoe_speedup": {}})
    assert table.iloc[0]["note"].startswith("no configuration fits")
    assert "coxmoe_speedup" not in table  # no CoX-MoE in the run: no column of Nones
    assert compare_table({"policies": {}, "coxmoe_speedup": {}}).empty  # nothing ran: an empty table, no KeyError


def test_compare_speedups_are_one_on_coxmoe_and_blank_where_a_side_did_not_fit(capsys):
    base = ["compare", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--batch", "8", "--prompt-len", "8",
            "--gen-len", "2"]
    code, out, err = run(capsys, *base, "--policies", "coxmoe,fiddler,gpu-only", "--workers", "1")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["coxmoe"][2] == "1.00" and float(rows["fiddler"][2]) > 0 and rows["gpu-only"][1:3] == ["-", "-"]
    code, out, err = run(capsys, *base, "--policies", "fiddler,stream-experts", "--workers", "1")
    assert code == 0 and "coxmoe_speedup" not in out and "None" not in out


def test_ablation_runs_a_repeated_step_once(tmp_path, monkeypatch):
    from sim import compare as compare_module

    real, asked = compare_module._run_all, []

    def spy(m, s, jobs, *args):
        asked.append(list(jobs))
        return real(m, s, jobs, *args)

    monkeypatch.setattr(compare_module, "_run_all", spy)
    r = compare_module.ablation(_tiny_model_file(tmp_path), "rtx6000ada-8452y", batch=8, prompt_len=6, gen_len=3,
                                workers=1)
    steps = {row["step"]: row for row in r["steps"]}
    assert len(asked[0]) == len(compare_module.ABLATION_STEPS) - 1  # "+ attention offload" = "without preload"
    same = steps["+ attention offload"], steps["CoX-MoE without hot-expert preload"]
    assert same[0]["throughput_tok_s"] == same[1]["throughput_tok_s"] and same[0]["options"] == {"stratify": "off"}
    assert len(r["steps"]) == len(compare_module.ABLATION_STEPS)
    assert (r["prompt_len_mean"], r["gen_len_mean"], r["seed"]) == (6.0, 3.0, 0)  # as compare reports them


@pytest.mark.parametrize("message", ["CUDA out of memory. Tried to allocate 2.00 GiB", "CUDA error: out of memory",
                                     "CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate",
                                     "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"])
def test_an_allocator_refusal_is_one_line(capsys, monkeypatch, message):
    """torch refuses memory with RuntimeErrors worded by where it failed (the caching allocator, a pinned host
    buffer, cuBLAS's workspace, the CPU allocator): each is one line and exit 2, not a traceback."""
    from experiments.cli import sim_cmds

    def refuse(args):
        raise RuntimeError(message)

    monkeypatch.setattr(sim_cmds, "cmd_simulate", refuse)
    code, _, err = run(capsys, "simulate", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--policy",
                       "gpu-only", "--batch", "1", "--prompt-len", "1", "--gen-len", "1")
    assert code == 2 and err.count("\n") == 1 and "needs more memory than this machine can allocate" in err


def test_other_runtime_errors_still_surface(monkeypatch):
    from experiments.cli import main, sim_cmds

    monkeypatch.setattr(sim_cmds, "cmd_simulate", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["simulate", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--policy", "gpu-only",
              "--batch", "1", "--prompt-len", "1", "--gen-len", "1"])


def test_presets_show_needs_a_name_and_excludes_lengths(capsys):
    """`--show ''` printed every list (exit 0); `--show X --lengths` ignored --show."""
    code, _, err = run(capsys, "presets", "--show", "")
    assert code == 2 and "unknown preset ''" in err
    code, _, err = run(capsys, "presets", "--show", "mixtral-8x7b", "--lengths")
    assert code == 2 and "not allowed with argument --show" in err


def test_calibrate_profile_refuses_a_repeated_thread_count(capsys, tmp_path):
    code, _, err = run(capsys, "calibrate", "profile", "--model", "olmoe-1b-7b", "--out", str(tmp_path / "p"),
                       "--threads", "1,1")
    assert code == 2 and "a count is repeated" in err and not (tmp_path / "p").exists()


@pytest.mark.parametrize("script, argv, message", [
    ("hit_ratio_study.py", ["--batch", "16", "--seeds", "1", "--throughput-sample", "5"], "one of the probe sizes"),
    ("hit_ratio_study.py", ["--batch", "2", "--throughput-sample", "4"], "at least 8 requests"),
    ("hit_ratio_study.py", ["--out", "FILE"], "is a file; give a folder"),
    ("paper_grid.py", ["--workers", "0"], "--workers: must be >= 1"),
    ("paper_grid.py", ["--out", "FILE"], "is a file; give a folder"),
    ("amx_sensitivity.py", ["--out", "FILE"], "is a file; give a folder"),
    ("cpu_validation.py", ["--layers", "0"], "--layers: must be at least 1"),
    ("synth_presets_table.py", ["--requests", "0"], "--requests: must be >= 1"),
])
def test_experiment_scripts_refuse_bad_arguments_before_working(tmp_path, monkeypatch, capsys, script, argv, message):
    """Each of these ran minutes of work (or wrote 1.4 GB of traces) before a traceback; now one line, exit 2."""
    import importlib
    import sys

    (tmp_path / "FILE").write_text("x")
    argv = [str(tmp_path / "FILE") if a == "FILE" else a for a in argv]
    module = importlib.import_module(f"experiments.{script.removesuffix('.py')}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exc:
        module.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1, err
