"""Profiles as data: the cost model's look-ups and fall-backs; the profile and validate commands end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from experiments.cli import main
from sim.cost import RooflineCostModel
from sim.cost.profile import PROFILE_VERSION, ProfileCostModel, model_signature
from sim.errors import SimInputError
from sim.plan import Op, OpKind, Phase, Stream


def write_profile(path, spec, rows, version=PROFILE_VERSION, signature=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "profile.json").write_text(json.dumps({"version": version, "model": spec.name,
                                                   "model_signature": signature or model_signature(spec)}))
    pd.DataFrame(rows).to_csv(path / "timings.csv", index=False)
    return path


def op(kind, stream=Stream.CPU, tokens=1, kv=0, phase=Phase.DECODE, flops=10, nbytes=10):
    return Op(0, kind, stream, phase, 1, 0, -1, tokens, flops, nbytes, kv_tokens=kv)


def test_interpolation_fallback_and_cache(tmp_path, tiny_model, paper_system):
    rows = [{"device": "cpu", "kind": "expert", "tokens": t, "kv": 0, "median_s": s}
            for t, s in ((1, 1e-3), (4, 2e-3), (16, 8e-3))]
    rows += [{"device": "cpu", "kind": "attention", "tokens": b, "kv": kv, "median_s": 1e-4 * b * kv}
             for b in (1, 4) for kv in (16, 64)]
    cost = ProfileCostModel(paper_system, write_profile(tmp_path / "p", tiny_model, rows), tiny_model)
    assert cost.op_time_ns(op(OpKind.EXPERT, tokens=4)) == pytest.approx(2_000_000, abs=1)
    assert cost.op_time_ns(op(OpKind.EXPERT, tokens=2)) == pytest.approx(np.sqrt(1e-3 * 2e-3) * 1e9, rel=1e-6)
    # past the grid's top: the last point plus the last segment's cost per token (8 ms + 48 x 0.5 ms at 64)
    assert cost.op_time_ns(op(OpKind.EXPERT, tokens=64)) == pytest.approx(32_000_000, abs=1)
    assert cost.op_time_ns(op(OpKind.EXPERT, tokens=17)) > cost.op_time_ns(op(OpKind.EXPERT, tokens=16))
    # on another device or another kind: the roofline
    roof = RooflineCostModel(paper_system)
    for o in (op(OpKind.EXPERT, Stream.GPU, tokens=4), op(OpKind.QKV, tokens=4)):
        assert cost.op_time_ns(o) == roof.op_time_ns(o)
    # decode attention: (requests, kv per request), bilinear in log space (exact on this power law)
    assert cost.op_time_ns(op(OpKind.ATTENTION, tokens=2, kv=2 * 32)) == pytest.approx(1e-4 * 2 * 32 * 1e9, rel=1e-6)
    # beyond the grid in proportion to requests x KV (exact on this law too); below it the edge's time
    assert cost.op_time_ns(op(OpKind.ATTENTION, tokens=8, kv=8 * 256)) == pytest.approx(1e-4 * 8 * 256 * 1e9,
                                                                                       rel=1e-6)
    assert cost.op_time_ns(op(OpKind.ATTENTION, tokens=1, kv=4)) == pytest.approx(1e-4 * 16 * 1e9, rel=1e-6)
    assert cost.op_time_ns(op(OpKind.ATTENTION, tokens=4, kv=4 * 16, phase=Phase.PREFILL)) == roof.op_time_ns(
        op(OpKind.ATTENTION, tokens=4, kv=4 * 16, phase=Phase.PREFILL))
    assert cost.hits >= 3 and cost.misses >= 3
    # usage: the roofline's, scaled by how much longer the measured op takes (the same bytes at a lower rate)
    expert = op(OpKind.EXPERT, tokens=4)
    share = roof.op_time_ns(expert) / cost.op_time_ns(expert)
    assert share < 1 and cost.usage(expert) == pytest.approx(tuple(u * share for u in roof.usage(expert)))
    fast = op(OpKind.QKV, tokens=4)  # not in the profile: its roofline time, its roofline usage
    assert cost.usage(fast) == roof.usage(fast)


def test_the_extension_past_the_grid_follows_each_op_s_work(tmp_path, tiny_model, paper_system):
    """Prefill attention grows with the square of the prompt past the grid (decode attention linearly); a
    repeated grid point is averaged, not divided by zero; disk reads are not priced from the PCIe copy table."""
    from sim.plan import Payload
    from sim.specs import load_system

    rows = [{"device": "cpu", "kind": "attention_prefill", "tokens": b, "kv": s, "median_s": 1e-6 * b * s * s}
            for b in (1, 2) for s in (8, 16)]
    rows += [{"device": "cpu", "kind": "expert", "tokens": t, "kv": 0, "median_s": s}
             for t, s in ((1, 1e-3), (16, 4e-3), (16, 6e-3))]  # 16 twice: two profiles concatenated
    rows += [{"device": "cuda", "kind": k, "tokens": n, "kv": 0, "median_s": n / 25e9}
             for k in ("copy_h2d_pinned", "copy_d2h_pinned") for n in (2**16, 2**24)]
    cost = ProfileCostModel(paper_system, write_profile(tmp_path / "p", tiny_model, rows), tiny_model,
                            mean_prompt_len=64)
    prefill = op(OpKind.ATTENTION, tokens=2 * 64, kv=2 * 64 * 65 // 2, phase=Phase.PREFILL)  # 2 prompts of 64
    assert cost.op_time_ns(prefill) == pytest.approx(1e-6 * 2 * 64 * 64 * 1e9, rel=1e-6)
    assert cost.op_time_ns(op(OpKind.EXPERT, tokens=16)) == pytest.approx(5e6, abs=1)  # the mean of the two
    assert cost.op_time_ns(op(OpKind.EXPERT, tokens=32)) > cost.op_time_ns(op(OpKind.EXPERT, tokens=16))
    disk_system = load_system("gcp-t4-n1-208g")
    disk_cost = ProfileCostModel(disk_system, tmp_path / "p", tiny_model, mean_prompt_len=64)
    read = Op(0, OpKind.COPY, "disk_read", Phase.DECODE, 1, 0, -1, 0, 0, 2**30, payload=Payload.KV)
    assert disk_cost._lookup(read) is None  # the disk's own rates (the roofline), not a PCIe measurement


def test_shared_expert_and_dense_ffn_scale_the_measured_expert_time(tmp_path, paper_system):
    from sim.specs import load_model

    spec = load_model("deepseek-v2-lite")  # two shared experts and a leading dense layer
    rows = [{"device": "cpu", "kind": "expert", "tokens": t, "kv": 0, "median_s": s}
            for t, s in ((1, 1e-3), (16, 4e-3))]
    cost = ProfileCostModel(paper_system, write_profile(tmp_path / "p", spec, rows), spec)
    expert = cost.op_time_ns(op(OpKind.EXPERT, tokens=16))
    shared = cost.op_time_ns(op(OpKind.SHARED_EXPERT, tokens=16))
    dense = cost.op_time_ns(op(OpKind.DENSE_FFN, tokens=16))
    assert shared == pytest.approx(expert * spec.shared_expert_params / spec.expert_params, rel=1e-6)
    assert dense == pytest.approx(expert * spec.dense_ffn_params / spec.expert_params, rel=1e-6)
    assert spec.shared_expert_params > spec.expert_params and cost.misses == 0
    # past the expert grid they extend it like a routed expert (4 ms + 48 x 0.2 ms at 64 tokens), scaled the same
    far = cost.op_time_ns(op(OpKind.SHARED_EXPERT, tokens=64))
    assert far == pytest.approx(13.6e6 * spec.shared_expert_params / spec.expert_params, rel=1e-6)


def test_profiles_that_do_not_fit(tmp_path, tiny_model, paper_system):
    rows = [{"device": "cpu", "kind": "expert", "tokens": 1, "kv": 0, "median_s": 1e-3}]
    with pytest.raises(SimInputError, match="not a profile"):
        ProfileCostModel(paper_system, tmp_path / "none", tiny_model)
    with pytest.raises(SimInputError, match="version"):
        ProfileCostModel(paper_system, write_profile(tmp_path / "v", tiny_model, rows, version=99), tiny_model)
    other = dataclasses.replace(tiny_model, hidden_size=512)
    with pytest.raises(SimInputError, match="shapes differ"):
        ProfileCostModel(paper_system, write_profile(tmp_path / "s", other, rows), tiny_model)
    bad = write_profile(tmp_path / "c", tiny_model, [{"device": "cpu", "kind": "expert"}])
    with pytest.raises(SimInputError, match="lacks column"):
        ProfileCostModel(paper_system, bad, tiny_model)
    # fewer layers keep the signature: a profile of the full model serves a model cut to its first layers
    assert model_signature(tiny_model) == model_signature(dataclasses.replace(tiny_model, num_layers=1))
    # an attention grid with a hole: refused naming it (it was filled with NaN: 'an op would take nan s')
    holed = [{"device": "cpu", "kind": "attention", "tokens": b, "kv": kv, "median_s": 1e-4 * b * kv}
             for b in (1, 4) for kv in (16, 64) if (b, kv) != (4, 16)]
    with pytest.raises(SimInputError, match="lacks requests 4 x kv 16"):
        ProfileCostModel(paper_system, write_profile(tmp_path / "h", tiny_model, rows + holed), tiny_model)


def test_the_median_record_is_a_schedule_the_plan_allows():
    """Medians taken per op apart could start an op before its dependency ended, or overlap a stream's ops."""
    from types import SimpleNamespace

    from executor.validate import median_record
    from sim.engine import EngineRecord

    plan = SimpleNamespace(ops=[SimpleNamespace(stream="gpu", deps=()), SimpleNamespace(stream="cpu", deps=(0,)),
                                SimpleNamespace(stream="cpu", deps=())])

    def rec(starts, ends):
        return EngineRecord(np.array(starts), np.array(ends), {"gpu": 0, "cpu": 0}, {}, 0)

    runs = [rec([0, 10, 30], [10, 30, 40]), rec([0, 30, 50], [30, 50, 60]), rec([0, 12, 25], [12, 25, 35])]
    merged = median_record(runs, plan)
    # op 0 lasts 12 (median) and op 1's median start 12 is kept; op 2 waits for op 1 on its stream
    assert merged.start_ns.tolist() == [0, 12, 32] and merged.end_ns.tolist() == [12, 32, 42]
    for i, op in enumerate(plan.ops):
        assert all(merged.start_ns[i] >= merged.end_ns[d] for d in op.deps)


def _tiny_spec():
    from sim.specs import ModelSpec

    return ModelSpec(name="tiny", num_layers=2, hidden_size=64, vocab_size=97, num_attention_heads=4, num_kv_heads=2,
                     head_dim=16, num_experts=4, top_k=2, expert_intermediate_size=64)


def _tiny_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(_tiny_spec())))
    return str(path)


def test_profile_validate_and_simulate_with_it(capsys, tmp_path):
    model = _tiny_file(tmp_path)
    prof = tmp_path / "prof"
    assert main(["calibrate", "profile", "--model-file", model, "--out", str(prof), "--rounds", "1",
                 "--max-tokens", "8", "--device", "cpu", "--max-requests", "4", "--max-kv", "7"]) == 0
    capsys.readouterr()
    frame = pd.read_csv(prof / "timings.csv")
    assert {"expert", "qkv", "o_proj", "router", "lm_head", "attention", "attention_prefill", "memcpy"} <= set(
        frame["kind"])
    # Measured ops take time; a per-request overhead is a difference of two timings, clipped at 0, and is 0 when
    # noise hides it (a busy 2-vCPU runner did that to two of them).
    overhead = frame["kind"].str.startswith("overhead_")
    assert (frame.loc[~overhead, "median_s"] > 0).all() and (frame.loc[overhead, "median_s"] >= 0).all()
    meta = json.loads((prof / "profile.json").read_text())
    assert meta["fingerprint"]["threads"] >= 1 and "cpu_model" in meta["fingerprint"]
    code = main(["calibrate", "validate", "--model-file", model, "--profile", str(prof), "--batch", "4",
                 "--prompt-len", "4", "--gen-len", "3", "--json", "--plot", str(tmp_path / "v.png")])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert r["profile_hits"] > 0 and set(r["classes"]) >= {"cpu_experts", "attention", "other"}
    assert r["end_to_end"]["total_s"]["measured"] > 0 and r["end_to_end"]["total_s"]["predicted"] > 0
    assert r["profile_machine_differences"] == []  # profiled and validated here
    for when in ("before", "after"):  # the machine's speed around the profile's measurements
        assert meta["speed"][when]["gemm_tflops"] > 0 and meta["speed"][when]["copy_gb_s"] > 0
    speed = r["machine_speed"]  # ... and around the validation's runs, with their ratios
    assert speed["validation"]["gemm_tflops"] > 0 and speed["ratios"]["gemm_tflops_ratio"] == pytest.approx(
        speed["validation"]["gemm_tflops"] / speed["profile"]["gemm_tflops"])
    assert set(speed["spread"]) == set(speed["ratios"]) and min(speed["spread"].values()) >= 0
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG" and r["plot"] == str(tmp_path / "v.png")
    code = main(["simulate", "--model-file", model, "--system", "a100-80g-8452y", "--policy", "cpu-only",
                 "--batch", "4", "--prompt-len", "4", "--gen-len", "3", "--profile", str(prof), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["total_s"] > 0 and result["generated_tokens"] == 4 * 3
    argv = ["simulate", "--model-file", model, "--system", "a100-80g-8452y", "--policy", "cpu-only", "--batch", "4",
            "--prompt-len", "4", "--gen-len", "3", "--json"]
    assert main(argv) == 0  # the same point on the preset's roofline: the profile's measured times moved it
    assert json.loads(capsys.readouterr().out)["total_s"] != result["total_s"]
    code = main(["simulate", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--batch", "2",
                 "--prompt-len", "2", "--gen-len", "2", "--profile", str(prof)])
    _, err = capsys.readouterr()
    assert code == 2 and "shapes differ" in err


def test_execute_command_labels_gpu_role_on_cpu(capsys, tmp_path):
    code = main(["execute", "--model-file", _tiny_file(tmp_path), "--policy", "coxmoe", "--batch", "4",
                 "--prompt-len", "4", "--gen-len", "3", "--cuda", "off", "--warmup", "0", "--json",
                 "--timeline", str(tmp_path / "t.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert d["measured"] and d["gpu_role_on_cpu"] and d["throughput_tok_s"] > 0
    trace = json.loads((tmp_path / "t.json").read_text())
    assert "GPU role on the CPU" in trace["traceEvents"][0]["args"]["name"]


def test_isa_probe_names_a_kernel():
    from executor.isa import ipex_status, onednn_isa

    r = onednn_isa(m=16, k=256, n=256, reps=2)
    assert r["tflops"] > 0
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "avx512f" in flags:  # torch dispatches bf16 GEMMs to oneDNN, which names its ISA and kernel
        assert r["onednn_used"] and r["isa"] and r["kernels"]
    else:  # an AVX2-only CPU (this project's EPYC dev VM on some sessions): oneDNN is not involved
        assert not r["onednn_used"] and r["isa"] is None
    assert r["uses_amx"] == any("amx" in k for k in r["kernels"])
    assert "available" in ipex_status()


def test_profiles_per_thread_count(capsys, tmp_path, paper_system):
    from sim.specs import load_model

    model = _tiny_file(tmp_path)
    prof = tmp_path / "prof"
    assert main(["calibrate", "profile", "--model-file", model, "--out", str(prof), "--rounds", "1",
                 "--max-tokens", "2", "--device", "cpu", "--threads", "1,2", "--max-requests", "3",
                 "--max-kv", "4"]) == 0
    frame = pd.read_csv(prof / "timings.csv")
    assert set(frame["threads"]) == {1, 2}
    # the attention grids stop at the first values covering the caps
    decode = frame[frame["kind"] == "attention"]
    assert set(decode["tokens"]) == {1, 4} and set(decode["kv"]) == {1, 4}
    assert json.loads((prof / "profile.json").read_text())["grid"] == {"max_tokens": 2, "max_requests": 3, "max_kv": 4}
    spec = load_model(model)
    assert ProfileCostModel(paper_system, prof, spec, threads=1).threads == 1
    assert ProfileCostModel(paper_system, prof, spec).threads == 2
    with pytest.raises(SimInputError, match="no rows for 3 threads"):
        ProfileCostModel(paper_system, prof, spec, threads=3)
    assert main(["calibrate", "profile", "--model-file", model, "--out", str(prof), "--threads", "a"]) == 2


def test_gemm_sweep_reports_fractions_of_its_ceiling():
    from executor.isa import gemm_sweep

    sw = gemm_sweep(rows=(4, 32), k=256, n=256)
    assert max(sw["fraction_of_ceiling"].values()) == 1.0 and sw["ceiling_tflops"] > 0


def test_the_committed_calibration_profile_still_loads_for_its_model():
    """docs/reproduce/calibration_profile is what `coxmoe reproduce calibration` validates against: a change to the
    model presets or to the signature must keep it readable (or re-record it), else the reproduction fails."""
    from sim.api import resolve_model, resolve_system

    prof = Path(__file__).parent.parent / "docs" / "reproduce" / "calibration_profile"
    meta = json.loads((prof / "profile.json").read_text())
    cost = ProfileCostModel(resolve_system("a100-80g-8452y"), prof, resolve_model(meta["model"]))
    assert cost.meta["model"] == meta["model"]


def test_machine_differences_name_what_changed():
    from executor.profile import MACHINE_FIELDS, fingerprint, machine_differences

    here = fingerprint()
    assert machine_differences(dict(here), here) == []
    assert machine_differences({**here, "measured_at": "another day", "python": "3.0"}, here) == []
    other = machine_differences({**here, "cpu_model": "AMD EPYC 7B13", "torch": "2.0"}, here)
    assert len(other) == 2 and other[0].startswith("cpu_model: 'AMD EPYC 7B13' -> ") and other[1].startswith("torch")
    older = {k: v for k, v in here.items() if k != "cpu_experts"}  # a profile made before the field existed
    assert machine_differences(older, here) == [f"cpu_experts: 'not recorded' -> {here['cpu_experts']!r}"]
    assert "measured_at" not in MACHINE_FIELDS


def _small_profile(tmp_path):
    """A one-round profile of the tiny model: (its directory, its profile.json as read, the arguments of a short
    `calibrate validate` with it)."""
    model = _tiny_file(tmp_path)
    prof = tmp_path / "prof"
    assert main(["calibrate", "profile", "--model-file", model, "--out", str(prof), "--rounds", "1",
                 "--max-tokens", "4", "--device", "cpu", "--max-requests", "2", "--max-kv", "4"]) == 0
    args = ["calibrate", "validate", "--model-file", model, "--profile", str(prof), "--batch", "2", "--prompt-len",
            "2", "--gen-len", "2", "--warmup", "0", "--repeats", "1"]
    return prof, json.loads((prof / "profile.json").read_text()), args


def test_validate_without_cuda_keeps_gpu_role_ops_out_of_the_errors(capsys, tmp_path, monkeypatch):
    """Without CUDA a GPU policy's GPU-stream ops run on the CPU and were scored against the GPU's prediction
    (-90..-98% per class, explained only in the header): they now form classes of their own, without an error,
    and the CPU's own classes keep theirs."""
    prof, _, args = _small_profile(tmp_path)
    capsys.readouterr()
    argv = [*args, "--policy", "fiddler", "--policy-opt", "resident_experts=0", "--policy-opt", "cpu_max_tokens=64",
            "--cuda", "off"]
    import executor.validate as validate_module

    plotted = {}
    monkeypatch.setattr(validate_module, "plot_validation",
                        lambda result, path, title: plotted.update(classes=result["_per_op"]["class"], path=path))
    assert main([*argv, "--json"]) == 0
    classes = json.loads(capsys.readouterr().out)["classes"]
    gpu = {c: v for c, v in classes.items() if c.endswith(" (GPU role, run on the CPU)")}
    assert gpu and all(v["error"] is None and v["measured_s"] > 0 for v in gpu.values())
    # the activation copies to and from the GPU did not run (no CUDA): no error against the link's prediction
    assert classes["copies (no CUDA: not copied)"]["error"] is None and "copies" not in classes
    assert classes["cpu_experts"]["error"] is not None  # fiddler's CPU experts: measured and predicted on the CPU
    assert main([*argv, "--plot", str(tmp_path / "v.png")]) == 0
    out = capsys.readouterr().out
    assert out.count("n/a (CPU time against a GPU prediction)") == len(gpu)
    assert out.count("n/a (the copies did not run)") == 1
    assert "(includes ops apart: CPU time against a GPU prediction; the copies did not run)" in out
    assert f"plot: {tmp_path / 'v.png'}" in out  # where it wrote (the plot itself is stubbed here)
    assert set(plotted["classes"]) == set(classes)  # the plot's per-op classes carry the same suffixes


def test_validate_says_when_the_profile_is_from_another_machine(capsys, tmp_path):
    """A profile measured elsewhere prices that machine's kernels: `calibrate validate` still runs (a user may
    want the cross-machine error) but says so, with the fields that differ."""
    prof, meta, args = _small_profile(tmp_path)
    meta["fingerprint"]["cpu_model"] = "AMD EPYC 7B13 elsewhere"
    (prof / "profile.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "note: the profile was measured on another machine" in out and "AMD EPYC 7B13 elsewhere" in out
    assert main([*args, "--json"]) == 0
    (difference,) = json.loads(capsys.readouterr().out)["profile_machine_differences"]
    assert difference.startswith("cpu_model: 'AMD EPYC 7B13 elsewhere' -> ")


def test_validate_reports_the_machines_speed_against_profiling_time(capsys, tmp_path, monkeypatch):
    """`calibrate validate` reads the machine's speed around its runs and prints it against the profile's
    readings, with a note when either moved by more than 10% (a drifting VM, not the cost model); a profile
    without readings (older ones) says so and still validates."""
    prof, meta, args = _small_profile(tmp_path)
    readings = json.loads(json.dumps(meta["speed"]))
    for when in ("before", "after"):  # as if the machine had been ten times faster when profiled (past any noise)
        meta["speed"][when] = {k: 10 * v for k, v in readings[when].items()}
    (prof / "profile.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "note: this machine's speed moved since profiling" in out and "of their speed when the profile" in out
    # The validation's own two readings, seconds apart, 100x apart (10x and 0.1x of the profile's): their mean,
    # about 5x the profile's, is inside that noise.
    import executor.validate as validate_module

    meta["speed"] = readings
    (prof / "profile.json").write_text(json.dumps(meta))
    jumpy = iter([{k: 10 * v for k, v in readings["before"].items()},
                  {k: v / 10 for k, v in readings["before"].items()}])
    monkeypatch.setattr(validate_module, "speed_probe", lambda: next(jumpy))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "moves by itself" in out and "moved since profiling" not in out
    # A slowdown during profiling (readings 1.0x then 0.7x, minutes apart) is drift, not noise, when the
    # validation's steady readings sit 38% below the profile's first (the profile's spread is not noise).
    meta["speed"] = {"before": readings["before"], "after": {k: 0.7 * v for k, v in readings["before"].items()}}
    (prof / "profile.json").write_text(json.dumps(meta))
    steady = {k: 0.62 * v for k, v in readings["before"].items()}
    monkeypatch.setattr(validate_module, "speed_probe", lambda: steady)
    assert main(args) == 0
    assert "moved since profiling" in capsys.readouterr().out
    monkeypatch.undo()
    del meta["speed"]
    (prof / "profile.json").write_text(json.dumps(meta))
    assert main([*args, "--json"]) == 0
    speed = json.loads(capsys.readouterr().out)["machine_speed"]
    assert speed["profile"] is None and speed["ratios"] is None and speed["validation"]["copy_gb_s"] > 0
    assert main(args) == 0
    assert "no speed reading in the profile" in capsys.readouterr().out


def test_speed_ratios_and_when_they_count_as_drift():
    from executor.speed_probe import describe, drift, drifted, mean_reading

    at_profile = mean_reading([{"gemm_tflops": 1.0, "copy_gb_s": 20.0}, {"gemm_tflops": 0.8, "copy_gb_s": 20.0}])
    assert at_profile == {"gemm_tflops": 0.9, "copy_gb_s": 20.0}
    assert mean_reading([{"gemm_tflops": 1.0, "copy_gb_s": 20.0}, None]) is None  # a reading missing
    assert mean_reading([{"gemm_tflops": "fast", "copy_gb_s": 20.0}]) is None
    ratios = drift(at_profile, {"gemm_tflops": 0.855, "copy_gb_s": 21.0})
    assert ratios == pytest.approx({"gemm_tflops_ratio": 0.95, "copy_gb_s_ratio": 1.05})
    assert not drifted(ratios) and "GEMM 0.95x, copy 1.05x" in describe(ratios)
    assert drifted(drift(at_profile, {"gemm_tflops": 0.7, "copy_gb_s": 20.0}))
    assert drift(None, {"gemm_tflops": 1.0, "copy_gb_s": 1.0}) is None and not drifted(None)


def test_a_drift_inside_the_readings_own_spread_counts_as_noise():
    """On a VM whose readings jump between one window's before and after (1.51 and 0.74 TFLOP/s a second apart on
    the AMX development VM), a ratio inside that spread is noise, not drift; outside it, and past DRIFT_NOTE, drift."""
    from executor.speed_probe import drifted, noisy, spread

    steady = [{"gemm_tflops": 1.0, "copy_gb_s": 20.0}, {"gemm_tflops": 1.02, "copy_gb_s": 20.0}]
    jumpy = [{"gemm_tflops": 1.5, "copy_gb_s": 20.0}, {"gemm_tflops": 0.75, "copy_gb_s": 22.0}]
    noise = spread([steady, jumpy])
    assert noise == pytest.approx({"gemm_tflops_ratio": 1.0, "copy_gb_s_ratio": 0.1})
    assert noisy(noise) and not noisy(spread([steady, steady]))
    assert spread([steady, [None, steady[0]]]) is None  # a window without a usable reading
    ratios = {"gemm_tflops_ratio": 1.6, "copy_gb_s_ratio": 1.0}  # +60%: past 10%, inside a 100% spread
    assert drifted(ratios) and not drifted(ratios, noise)
    assert not drifted({"gemm_tflops_ratio": 0.55, "copy_gb_s_ratio": 1.0}, noise)  # 1.8x slower: inside it too
    assert drifted({"gemm_tflops_ratio": 2.2, "copy_gb_s_ratio": 1.0}, noise)  # past the spread too
    assert drifted({"gemm_tflops_ratio": 0.45, "copy_gb_s_ratio": 1.0}, noise)  # 2.2x slower: past it
    assert drifted({"gemm_tflops_ratio": 1.0, "copy_gb_s_ratio": 1.15}, noise)  # copy: past both 10% and its spread
    assert not drifted({"gemm_tflops_ratio": 1.05, "copy_gb_s_ratio": 1.0}, spread([steady, steady]))


def test_reproduce_calibration_profiles_paired_and_replaces_its_kept_profile_only_when_done(tmp_path, monkeypatch):
    """Without --profile, the reproduction profiles this machine in the same rounds as its runs
    (`validate_paired`, quick grid), into a fresh folder that replaces the kept profile once it is complete; a run
    that fails leaves the kept profile as it was."""
    import executor.validate as validate_module
    from experiments.reproduce import ReproduceOptions
    from experiments.reproduce.calibration import _into_fresh, run

    kept = tmp_path / "calibration_profile"
    kept.mkdir()
    (kept / "profile.json").write_text('{"old": true}')
    seen = {}

    def failing(cases, weights, spec, profile_dir, **grid):
        seen.update(cases=len(cases), spec=spec.name, dir=profile_dir, **grid)
        profile_dir.mkdir()
        (profile_dir / "profile.json").write_text('{"half": true}')
        raise KeyboardInterrupt

    monkeypatch.setattr(validate_module, "validate_paired", failing)
    with pytest.raises(KeyboardInterrupt):
        run(ReproduceOptions(out=tmp_path, quick=True))
    assert seen == {"cases": 2, "spec": "deepseek-v2-lite", "dir": tmp_path / "calibration_profile.new",
                    "rounds": 1, "max_tokens": 128, "max_requests": 32, "max_kv": 8}
    assert (kept / "profile.json").read_text() == '{"old": true}'

    def measure(new):
        new.mkdir()
        (new / "profile.json").write_text('{"new": true}')
        return "result"

    assert _into_fresh(kept, measure) == "result"
    assert (kept / "profile.json").read_text() == '{"new": true}'
    assert not (tmp_path / "calibration_profile.new").exists()


@pytest.mark.parametrize("text", ['{"model": "tiny", "fingerprint": null}', '[1, 2]', "{not json", ""])
def test_an_unreadable_fingerprint_counts_as_another_machine(tmp_path, text):
    from executor.profile import machine_differences, recorded_fingerprint

    (tmp_path / "profile.json").write_text(text)
    assert recorded_fingerprint(tmp_path) == {}
    assert "cpu_model: 'not recorded' -> " in machine_differences({})[0]


@pytest.mark.parametrize("text", ['[1, 2]', "{not json", '{"fingerprint": {}}', '{"model": 7}'])
def test_reproduce_calibration_refuses_a_profile_that_is_not_one(capsys, tmp_path, text):
    """Before any plan is measured: one line naming the file, exit status 2."""
    prof = tmp_path / "prof"
    prof.mkdir()
    (prof / "profile.json").write_text(text)
    assert main(["reproduce", "calibration", "--out", str(tmp_path / "out"), "--profile", str(prof)]) == 2
    err = capsys.readouterr().err.strip()
    assert "profile.json is not a profile" in err and len(err.splitlines()) == 1


def test_paired_validation_runs_every_plan_between_the_profile_rounds(tmp_path, monkeypatch):
    """`validate_paired` measures the profile and the plans in the same rounds (each plan once after each timed
    round, after one untimed run before the profile), so drift over minutes hits both alike; each result is a
    normal validation of its plan, marked paired, with the profile's own speed readings (ratio 1)."""
    import executor.validate as V
    from executor.weights import random_weights
    from sim.policies import PlanContext, make_policy
    from sim.specs import load_system
    from sim.workload import Workload
    from traces import SynthConfig, generate_trace

    spec = _tiny_spec()
    cases = []
    for batch in (2, 3):
        prompts, gens = np.full(batch, 2), np.full(batch, 2)
        trace = generate_trace(SynthConfig(spec.name, 2, 4, 2, "uniform", 0.0, 0), prompts, gens)
        plan = make_policy("cpu-only", {}).build(PlanContext(spec, load_system("a100-80g-8452y"),
                                                             Workload(prompts, gens), trace))
        cases.append((plan, trace))
    events: list[str] = []
    real_execute, real_profile = V.execute_plan, V.profile

    def execute(plan, *args, **kwargs):
        events.append(f"run {plan.workload.batch}")
        return real_execute(plan, *args, **kwargs)

    def profile(*args, between_rounds, **kwargs):
        def between(r):
            events.append(f"round {r}")
            between_rounds(r)
        return real_profile(*args, between_rounds=between, **kwargs)

    monkeypatch.setattr(V, "execute_plan", execute)
    monkeypatch.setattr(V, "profile", profile)
    results = V.validate_paired(cases, random_weights(spec, seed=0), spec, tmp_path / "prof", rounds=2,
                                max_tokens=4, progress=False, max_requests=4, max_kv=8)
    assert events == ["run 2", "run 3", "round 0", "run 2", "run 3", "round 1", "run 2", "run 3"]
    assert (tmp_path / "prof" / "profile.json").exists()
    speed = json.loads((tmp_path / "prof" / "profile.json").read_text())["speed"]
    for r in results:
        assert r["paired"] and r["runs"] == 2 and r["profile_hits"] > 0
        assert r["end_to_end"]["total_s"]["measured"] > 0 and r["end_to_end"]["total_s"]["predicted"] > 0
        # the runs spanned the profile's own window: its readings (mean of before and after) stand for both
        assert r["machine_speed"]["validation"] == r["machine_speed"]["profile"] == pytest.approx(
            {k: (speed["before"][k] + speed["after"][k]) / 2 for k in speed["before"]})
    events.clear()  # `warmup` untimed runs of each plan before the profile (the CLI's --warmup)
    V.validate_paired(cases[:1], random_weights(spec, seed=0), spec, tmp_path / "prof2", rounds=1, max_tokens=4,
                      progress=False, max_requests=4, max_kv=8, warmup=2)
    assert events == ["run 2", "run 2", "round 0", "run 2"]
    with pytest.raises(SimInputError, match="at least one round, got 0"):
        V.validate_paired(cases, random_weights(spec, seed=0), spec, tmp_path / "none", rounds=0)
    with pytest.raises(SimInputError, match="already holds a profile"):  # it would overwrite the profile
        V.validate_paired(cases, random_weights(spec, seed=0), spec, tmp_path / "prof", rounds=1)


def test_profile_times_each_kind_after_a_call_of_its_own_kind(tmp_path, monkeypatch):
    """What ran just before a call moves its time (a bf16 expert call after an INT4 one, which allocates and frees
    its dequantised weights, ran 10-25% slower; a QKV with its weights still cached 20-35% faster), so a round
    times the grid kind by kind, each block led by one untimed call of its kind, and every timed call of a kind
    that reuses its weights follows a cache flush: within a round, the calls of a kind are one contiguous run."""
    import executor.profile as P

    spec = _tiny_spec()
    log: list[str] = []
    real_scatter, real_qkv, real_o, real_lm = P.K.expert_scatter, P.K.qkv, P.K.o_proj, P.K.lm_head

    def scatter(lw, *args, **kwargs):
        log.append(f"expert {lw.cpu_experts.precision if lw.cpu_experts is not None else 'bf16'}")
        return real_scatter(lw, *args, **kwargs)

    def qkv(*args, **kwargs):
        log.append("qkv")
        return real_qkv(*args, **kwargs)

    def o_proj(*args, **kwargs):
        log.append("o_proj")
        return real_o(*args, **kwargs)

    def lm_head(*args, **kwargs):
        log.append("lm_head")
        return real_lm(*args, **kwargs)

    monkeypatch.setattr(P.K, "expert_scatter", scatter)
    monkeypatch.setattr(P.K, "qkv", qkv)
    monkeypatch.setattr(P.K, "o_proj", o_proj)
    monkeypatch.setattr(P.K, "lm_head", lm_head)
    monkeypatch.setattr(P, "_cache_flush", lambda device: lambda: log.append("flush"))
    P.profile(spec, tmp_path / "p", rounds=2, max_tokens=4, progress=False, max_requests=1, max_kv=4,
              between_rounds=lambda r: log.append(f"round {r}"))
    second = log[log.index("round 0") + 1:log.index("round 1")]
    calls = [kind for kind in second if kind != "flush"]
    runs = [kind for i, kind in enumerate(calls) if i == 0 or calls[i - 1] != kind]
    assert len(runs) == len(set(runs)) and {"expert bf16", "qkv", "o_proj", "lm_head"} <= set(runs)
    for kind in ("qkv", "o_proj"):  # three grid points (1, 2, 4 tokens) after a lead call; each timed one flushed
        assert calls.count(kind) == 4
        assert sum(1 for i, k in enumerate(second) if k == kind and second[i - 1] == "flush") == 3
    assert not any(k.startswith("expert") and second[i - 1] == "flush" for i, k in enumerate(second) if i)
    frame = pd.read_csv(tmp_path / "p" / "timings.csv")  # the lead calls are not timed: two samples a point
    assert (frame.loc[frame["kind"].isin(["qkv", "o_proj", "lm_head", "expert"]), "repeats"] == 2).all()


def test_paired_validation_profiles_on_the_callers_weights(tmp_path, monkeypatch):
    """The paired validation's profile measures the weights its plans run on (the model's first layers): it draws
    none of its own (a quick calibration drew 2 x 1 G values for DeepSeek-V2-Lite's two layers, 8 s here)."""
    import executor.profile as P
    import executor.validate as V
    from executor.weights import random_weights
    from sim.policies import PlanContext, make_policy
    from sim.specs import load_system
    from sim.workload import Workload
    from traces import SynthConfig, generate_trace

    spec = _tiny_spec()
    prompts, gens = np.full(2, 2), np.full(2, 2)
    trace = generate_trace(SynthConfig(spec.name, 2, 4, 2, "uniform", 0.0, 0), prompts, gens)
    plan = make_policy("cpu-only", {}).build(PlanContext(spec, load_system("a100-80g-8452y"), Workload(prompts, gens),
                                                         trace))
    weights = random_weights(spec, seed=0)
    drawn = []
    monkeypatch.setattr(P, "random_weights", lambda *a, **k: drawn.append(a[0]) or random_weights(*a, **k))
    V.validate_paired([(plan, trace)], weights, spec, tmp_path / "prof", rounds=1, max_tokens=4, progress=False,
                      max_requests=4, max_kv=8)
    # only the fixed-overhead probe's own 32-wide model is drawn
    assert [s.name for s in drawn] == ["overhead-probe"] and (tmp_path / "prof" / "profile.json").exists()
    drawn.clear()
    import threading

    real_overheads, threads = P._overhead_rows, []
    monkeypatch.setattr(P, "_overhead_rows",
                        lambda *a: threads.append(threading.current_thread()) or real_overheads(*a))
    P.profile(spec, tmp_path / "own", rounds=1, max_tokens=4, progress=False, max_requests=4, max_kv=8)
    # the executor's per-request overheads are timed on a worker thread, as its ops run (the main thread had
    # measured 60-300x the worker's on a loaded VM)
    assert threads and threads[0] is not threading.main_thread()
    assert [s.name for s in drawn] == ["tiny[:1]", "overhead-probe"]  # given no weights, it draws its first layer


def test_calibrate_validate_paired_profiles_and_validates_together(capsys, tmp_path):
    """`calibrate validate --paired` profiles into a new folder in the same rounds as its timed runs and says
    so; a folder that already holds a profile, or --cuda on, is refused in one line before any work."""
    model = _tiny_file(tmp_path)
    prof = tmp_path / "paired"
    args = ["calibrate", "validate", "--model-file", model, "--profile", str(prof), "--batch", "2", "--prompt-len",
            "2", "--gen-len", "2", "--repeats", "2", "--paired"]
    assert main([*args, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["paired"] and r["runs"] == 2 and r["profile_hits"] > 0 and r["profile_machine_differences"] == []
    frame = pd.read_csv(prof / "timings.csv")
    assert (frame.loc[frame["kind"] == "expert", "repeats"] == 2).all()
    assert frame.loc[frame["kind"] == "expert", "tokens"].max() == 4  # the grid covers the plan's 2 x 2 prompts
    assert main(args) == 2
    assert "already holds a profile" in capsys.readouterr().err
    assert main([*args[:5], str(tmp_path / "other"), *args[6:], "--cuda", "on"]) == 2
    assert "CPU only" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    (tmp_path / "a-file").write_text("x")  # had been a raw 'File exists' from the profile's mkdir
    assert main([*args[:5], str(tmp_path / "a-file"), *args[6:]]) == 2
    err = capsys.readouterr().err
    assert "a-file is a file, not a folder: --paired profiles into --profile" in err and err.count("\n") == 1


@pytest.mark.parametrize("row, message", [
    ({"device": "tpu"}, "device must be one of cpu, cuda, got 'tpu'"),
    ({"tokens": 1.5}, "tokens must be a whole number"),
    ({"tokens": 1e18}, r"tokens must be a whole number up to 2\^50, got 1e\+18"),
])
def test_profile_rows_no_op_could_read_are_refused(tmp_path, tiny_model, paper_system, row, message):
    """A row of an unknown device, or a fractional or astronomical grid point, would be ignored or read silently
    (the run priced by the roofline or by a nonsense point): refused, naming the row."""
    rows = [{"device": "cpu", "kind": "expert", "tokens": t, "kv": 0, "median_s": 1e-3 * t} for t in (1, 4)]
    rows[1].update(row)
    with pytest.raises(SimInputError, match=message):
        ProfileCostModel(paper_system, write_profile(tmp_path / "p", tiny_model, rows), tiny_model)


def test_a_device_that_fails_leaves_the_profile_of_the_devices_before_it(tmp_path, monkeypatch):
    """The profile was written only once every device finished, so a GPU half that raised (or ran out of a lent
    GPU's window) lost the finished CPU rows too, and every validation after it had no profile."""
    import executor.profile as P

    def measure(spec, device, *args, **kwargs):
        if device == "cuda":
            raise RuntimeError("CUDA error: no kernel image is available")
        return [{"device": "cpu", "kind": "qkv", "tokens": 1, "kv": 0, "median_s": 1e-3}]

    monkeypatch.setattr(P, "_measure", measure)
    with pytest.raises(RuntimeError, match="no kernel image"):
        P.profile(_tiny_spec(), tmp_path / "prof", devices=("cpu", "cuda"), progress=False)
    meta = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert meta["devices"] == ["cpu"] and meta["not_measured"] == ["cuda"]
    assert "no kernel image" in meta["failed"]["cuda"]
    rows = pd.read_csv(tmp_path / "prof" / "timings.csv")
    assert set(rows["device"]) == {"cpu"} and len(rows) == 1
    P.profile(_tiny_spec(), tmp_path / "cpu_only", devices=("cpu",), progress=False)
    assert "not_measured" not in json.loads((tmp_path / "cpu_only" / "profile.json").read_text())


def test_prefill_attention_is_looked_up_at_the_scopes_root_mean_square_prompt(tmp_path, tiny_model, paper_system):
    """Prefill attention's work is the scope's sum of squared prompt lengths: on a grid that is exactly
    requests x length^2, prompts of 2 and 14 tokens price as 2 x 10^2 (the root mean square), not 2 x 8^2 (the
    mean, which under-priced varied lengths)."""
    from types import SimpleNamespace

    rows = [{"device": "cpu", "kind": "attention_prefill", "tokens": b, "kv": s, "median_s": 1e-6 * b * s * s}
            for b in (1, 2, 4) for s in (2, 4, 8, 16)]
    cost = ProfileCostModel(paper_system, write_profile(tmp_path / "p", tiny_model, rows), tiny_model)
    requests = np.array([0, 1])
    cost._plan = SimpleNamespace(scope_of=lambda _op: (requests,),
                                 workload=SimpleNamespace(prompt_lens=np.array([2, 14])))
    prefill = op(OpKind.ATTENTION, tokens=16, kv=0, phase=Phase.PREFILL)
    assert cost._lookup(prefill) == pytest.approx(1e-6 * (2 * 2 + 14 * 14), rel=1e-6)


def test_a_cache_flush_reads_twice_the_largest_cpu_cache(tmp_path, monkeypatch):
    """A 256 MiB flush does not empty a VM that reports a 300 MiB L3 (the 2-vCPU Xeon dev VM): on the CPU the
    flush reads twice the largest cache the kernel reports, never less than FLUSH_BYTES; sizes it cannot read
    count as unknown."""
    import executor.profile as P

    for index, size in ((0, "48K"), (2, "2048K"), (3, "307200K")):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    (tmp_path / "index1").mkdir()
    (tmp_path / "index1" / "size").write_text("garbled\n")
    assert P.largest_cpu_cache_bytes(tmp_path) == 300 * 2**20
    assert P.largest_cpu_cache_bytes(tmp_path / "absent") == 0
    monkeypatch.setattr(P, "largest_cpu_cache_bytes", lambda root=tmp_path: 300 * 2**20)
    assert P.flush_bytes("cpu") == 600 * 2**20 and P.flush_bytes("cuda") == P.FLUSH_BYTES
    monkeypatch.setattr(P, "largest_cpu_cache_bytes", lambda root=tmp_path: 32 * 2**20)
    assert P.flush_bytes("cpu") == P.FLUSH_BYTES
