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
    assert "step failed" in table.set_index("point").loc["broken", "note"]


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
    assert "no GPU GEMMs" in capsys.readouterr().out
