"""The machine microbenchmarks (`executor.machine_bench`): what they write, on the CPU here and on CUDA where lent."""

from __future__ import annotations

import json

import pytest
import torch

from executor import machine_bench


def test_a_quick_cpu_run_writes_every_gemm_and_the_dram_reading(tmp_path):
    out = tmp_path / "mb.json"
    assert machine_bench.main(["--out", str(out), "--gemm-device", "cpu", "--quick"]) == 0
    data = json.loads(out.read_text())
    assert data["gemm_device"] == "cpu" and data["machine"]["threads"] == torch.get_num_threads()
    shapes = {(r["m"], r["n"], r["k"]) for r in data["gemm"]}
    assert (64, 4096, 4096) in shapes and (1, 4096, 14336) in shapes
    for r in data["gemm"]:  # each time is a real, positive measurement consistent with its rate
        assert r["seconds"] > 0 and r["tflops"] == pytest.approx(2 * r["m"] * r["n"] * r["k"] / r["seconds"] / 1e12)
    assert data["dram_sharing"]["cpu_copy_alone_gb_per_s"] > 0.1
    assert ("host_copies" in data) == torch.cuda.is_available()


def test_cuda_without_a_device_is_refused_in_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert machine_bench.main(["--out", str(tmp_path / "x.json"), "--gemm-device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def test_rotated_copies_cover_the_asked_bytes_and_stay_bounded():
    rows = machine_bench.gemm_sweep([(4, 64, 64), (64, 512, 512)], "cpu", repeats=1, rotate_bytes=2**20)
    one = [2 * (m * k + n * k + m * n) for m, n, k in ((4, 64, 64), (64, 512, 512))]
    assert [r["copies"] for r in rows] == [min(machine_bench.MAX_COPIES, -(-2**20 // b)) for b in one]
    assert all(r["calls"] == r["copies"] for r in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_and_dram_sharing_are_measured():
    copies = machine_bench.host_copies(sizes=(2**20,), repeats=2)
    assert {(r["direction"], r["pinned"]) for r in copies} == {("h2d", True), ("h2d", False), ("d2h", True),
                                                               ("d2h", False)}
    assert all(r["gb_per_s"] > 0 for r in copies)
    shared = machine_bench.dram_sharing(nbytes=16 * 2**20, seconds=0.2, cuda=True)
    assert shared["h2d_alone_gb_per_s"] > 0 and shared["h2d_with_cpu_copy_gb_per_s"] > 0
    duplex = machine_bench.duplex(nbytes=16 * 2**20, repeats=2)
    assert duplex["h2d_with_d2h_gb_per_s"] > 0 and duplex["d2h_with_h2d_gb_per_s"] > 0


def test_a_failing_part_is_recorded_and_the_rest_still_measured_and_saved(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cuBLAS said no")

    monkeypatch.setattr(machine_bench, "gemm_sweep", broken)
    saved = []
    result = machine_bench.run("cpu", quick=True, save=lambda r: saved.append(sorted(r)))
    assert result["errors"] == {"gemm": "RuntimeError: cuBLAS said no"} and "gemm" not in result
    assert result["dram_sharing"]["cpu_copy_alone_gb_per_s"] > 0
    assert len(saved) == (5 if torch.cuda.is_available() else 2)  # after every part, the failed one included
