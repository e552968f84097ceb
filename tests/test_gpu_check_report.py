"""The GPU check's report (`experiments.gpu_check_report`): it prices what a lent GPU measured, without one."""

from __future__ import annotations

import json

import pytest
import yaml

from executor.weights import truncated
from experiments import gpu_check_report as report
from experiments.validation.gpu_ops import _gemm_rows
from sim.api import simulate
from sim.specs import load_model

FORCED = {"prefill_placement": "ggg", "decode_placement": "ggg", "prefill_micro_batch": "0",
          "decode_micro_batch": "0", "resident_experts": "2", "split": "cpu"}


def _own_point(folder, name, scale):
    """An own_*.json as `coxmoe execute --json` writes it, timed at `scale` x the simulator's own times."""
    sim = simulate(truncated(load_model("mixtral-8x7b"), 2), "h200-8452y", "coxmoe", batch=16, prompt_len=8,
                   gen_len=4, routing="table:mixtral-8x7b", policy_options=FORCED)
    run = {"model": "mixtral-8x7b[:2]", "system": "h200-8452y", "policy": "coxmoe", "knobs": sim.knobs,
           "routing": "table:mixtral-8x7b",
           "workload": {"batch": 16, "prompt_len_mean": 8.0, "prompt_len_max": 8, "gen_len_mean": 4.0,
                        "gen_len_max": 4, "prompt_tokens": 128, "generated_tokens": sim.generated_tokens},
           "prefill_s": scale * sim.prefill_s, "decode_s": scale * sim.decode_s, "total_s": scale * sim.total_s,
           "devices": {"gpu": "cuda:0", "cpu": "cpu"}}
    (folder / f"own_{name}.json").write_text(json.dumps(run))
    return sim


def test_an_own_point_is_resimulated_with_its_forced_knobs(tmp_path):
    sim = _own_point(tmp_path, "cx", 2.0)  # measured twice as slow as simulated
    (tmp_path / "own_broken.json").write_text("Traceback: CUDA error")
    table = report.own_points(tmp_path)
    row = table.set_index("point").loc["cx"]
    assert row["ratio"] == pytest.approx(2.0, rel=1e-6)  # the same plan: derived knob fields were dropped
    assert row["simulated_tok_s"] == pytest.approx(sim.throughput_tok_s)
    assert "no measurement" in table.set_index("point").loc["broken", "note"]


def test_measured_gemms_are_priced_as_gpu_ops_prices_its_sets(tmp_path):
    bench = {"machine": {"gpu": "NVIDIA H200", "measured_at": "2026-12-04T00:00:00Z", "torch": "x",
                         "cuda_version": "y"},
             "gemm_device": "cuda", "gemm": [{"m": 64, "n": 4096, "k": 4096, "seconds": 2.0e-5},
                                             {"m": 4096, "n": 14336, "k": 4096, "seconds": 7.0e-4}]}
    table = report.gemm_table(bench)
    path = tmp_path / "set.yaml"
    path.write_text(yaml.safe_dump({"gemm_sets": [report.gemm_set(bench)]}))
    want = [r["predicted_s"] for r in _gemm_rows(path)]
    assert list(table["predicted_s"]) == want and list(table["measured_s"]) == [2.0e-5, 7.0e-4]
    assert table["ratio"].tolist() == pytest.approx([p / m for p, m in zip(want, [2.0e-5, 7.0e-4], strict=True)])


def test_the_report_renders_a_partial_run_and_refuses_a_missing_folder(tmp_path, capsys):
    (tmp_path / "steps.txt").write_text("env rc=0 1s\npytest_cuda rc=1 30s\n")
    (tmp_path / "pytest_cuda.log").write_text("....F\n1 failed, 4 passed in 30s\n")
    (tmp_path / "validate_x.log").write_text("error: boom")
    _own_point(tmp_path, "cx", 1.0)
    out = tmp_path / "r.md"
    assert report.main([str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "pytest_cuda rc=1" in text and "1 failed, 4 passed" in text and "failed (see its log)" in text
    assert "| cx | coxmoe |" in text
    assert report.main([str(tmp_path / "nope")]) == 2
    assert report.main([str(tmp_path), "--gemm-yaml", str(tmp_path / "g.yaml")]) == 2
    assert "no GPU GEMMs" in capsys.readouterr().err  # errors go to stderr, the report to stdout or --out


def test_every_own_step_has_a_row_and_an_unclean_exit_is_noted(tmp_path):
    """A step that wrote only its log (no JSON) still shows; a JSON measured by a step that ran out of time
    (rc 124 after printing) is kept with a note."""
    _own_point(tmp_path, "late", 1.0)
    (tmp_path / "own_crashed.log").write_text("Traceback ...\nRuntimeError: CUDA error")
    (tmp_path / "steps.txt").write_text("own_late                           rc=124  75s  (at 200s)\n"
                                        "own_crashed                        rc=1     3s  (at 203s)\n")
    table = report.own_points(tmp_path).set_index("point")
    assert "exit status 1" in table.loc["crashed", "note"] and "no measurement" in table.loc["crashed", "note"]
    assert table.loc["late", "ratio"] == pytest.approx(1.0, rel=1e-6)
    assert "exit status 124" in table.loc["late", "note"]


def test_an_h100_run_is_priced_as_an_h100(tmp_path):
    """The lent GPU is read from the driver's name: an H100 is not priced as the H200 the plans were built for."""
    assert report.gpu_preset_of("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert report.gpu_preset_of("NVIDIA H100 PCIe") == "h100-pcie"
    assert report.gpu_preset_of("NVIDIA H200") == "h200"
    assert report.gpu_preset_of("NVIDIA B200") is None and report.gpu_preset_of("NVIDIA GH200 480GB") is None
    bench = {"machine": {"gpu": "NVIDIA H100 80GB HBM3"}, "gemm_device": "cuda",
             "gemm": [{"m": 4096, "n": 14336, "k": 4096, "seconds": 7.0e-4}]}
    (tmp_path / "machine_bench.json").write_text(json.dumps(bench))
    _own_point(tmp_path, "cx", 1.0)  # timed at the H200 simulation's own times
    gemm_yaml = tmp_path / "new" / "g.yaml"
    out = tmp_path / "r.md"
    assert report.main([str(tmp_path), "--out", str(out), "--gemm-yaml", str(gemm_yaml)]) == 0
    text = out.read_text()
    assert "`h100-sxm` GPU preset" in text and "h200-8452y` with `h100-sxm`" in text
    assert yaml.safe_load(gemm_yaml.read_text())["gemm_sets"][0]["gpu"] == "h100-sxm"
    h100 = report.own_points(tmp_path, report.lent_system("h200-8452y", "h100-sxm")).set_index("point")
    h200 = report.own_points(tmp_path).set_index("point")
    assert h200.loc["cx", "ratio"] == pytest.approx(1.0, rel=1e-6)
    assert h100.loc["cx", "ratio"] < h200.loc["cx", "ratio"]  # the slower GPU predicts fewer tokens a second


def test_without_machine_bench_the_gpu_comes_from_the_env_log_and_a_failed_gemm_part_says_so(tmp_path):
    """A run whose machine_bench step failed was priced as an H200 whatever GPU ran it, and a GEMM part that failed
    on CUDA was reported as "GEMMs ran on the CPU"."""
    (tmp_path / "env.log").write_text("+-----+\n| 0  NVIDIA H100 80GB HBM3   On | 00000000:18:00.0 Off |\n"
                                      "2.11.0 12.8 NVIDIA H100 80GB HBM3\n")
    _own_point(tmp_path, "cx", 1.0)
    text = report.render(tmp_path)
    assert "`h100-sxm` GPU preset" in text and "NVIDIA H100 80GB HBM3" in text
    (tmp_path / "env.log").write_text("no GPU here\n")
    assert "no GPU named" in report.render(tmp_path) and "`h200` GPU preset" in report.render(tmp_path)
    bench = {"machine": {"gpu": "NVIDIA H200"}, "gemm_device": "cuda", "errors": {"gemm": "RuntimeError: CUDA"}}
    (tmp_path / "machine_bench.json").write_text(json.dumps(bench))
    text = report.render(tmp_path)
    assert "The GEMM part failed" in text and "ran on the CPU" not in text


def test_incomplete_measurements_are_rows_that_say_so(tmp_path, capsys):
    """machine_bench.json without its machine record, a GEMM row without n, an own point without its policy: each
    was a KeyError traceback; the report now renders and names what is missing."""
    (tmp_path / "machine_bench.json").write_text(json.dumps({
        "gemm_device": "cuda", "gemm": [{"m": 64, "k": 4096, "seconds": 2e-5},
                                        {"m": 64, "n": 4096, "k": 4096, "seconds": 2e-5}]}))
    _own_point(tmp_path, "cx", 1.0)
    run = json.loads((tmp_path / "own_cx.json").read_text())
    del run["policy"]
    (tmp_path / "own_nopolicy.json").write_text(json.dumps(run))
    assert report.main([str(tmp_path), "--out", str(tmp_path / "r.md"), "--gemm-yaml", str(tmp_path / "g.yaml")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "| cx | coxmoe |" in text and "incomplete measurement (missing 'policy'" in text
    gemms = yaml.safe_load((tmp_path / "g.yaml").read_text())["gemm_sets"][0]["gemms"]
    assert gemms == [[64, 4096, 4096, 2e-5]]  # the complete row only
    assert report.measured_gpu({}) is None and report.measured_gpu({"machine": "x"}) is None


def test_incomplete_validations_copies_and_zero_times_are_noted(tmp_path):
    (tmp_path / "validate_a.log").write_text(json.dumps({"end_to_end": {"total_s": {"error": 0.1}}}))
    (tmp_path / "machine_bench.json").write_text(json.dumps({
        "machine": {"gpu": "NVIDIA H200"}, "host_copies": [{"direction": "h2d"}], "d2d_copy": {"gb_per_s": 1.0},
        "duplex": {}, "dram_sharing": [1, 2]}))
    _own_point(tmp_path, "cx", 1.0)
    run = json.loads((tmp_path / "own_cx.json").read_text())
    (tmp_path / "own_zero.json").write_text(json.dumps({**run, "total_s": 0}))
    assert report.main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "incomplete (missing 'classes')" in text and "Host-device copies: incomplete measurement" in text
    assert "Host DRAM sharing: incomplete measurement" in text and "| zero |" in text and "division by zero" in text


def test_malformed_errors_and_null_validation_errors(tmp_path):
    (tmp_path / "machine_bench.json").write_text(json.dumps({"machine": {"gpu": "NVIDIA H200"}, "errors": []}))
    (tmp_path / "validate_b.log").write_text(json.dumps({"end_to_end": {"total_s": {"error": None}},
                                                         "classes": {"attention": {"error": 0.05}}}))
    assert report.main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "| b | n/a | +5.0% |" in text and "None" not in text
