"""Expert precision (issue 14): INT8 and INT4 routed experts change bytes everywhere weights are counted or moved,
INT8 experts compute at each unit's INT8 rate, native plans are unchanged, and the executor runs what it has
kernels for (INT8 on the CPU) and refuses the rest in one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from sim.api import simulate
from sim.config import SimConfig
from sim.cost import RooflineCostModel
from sim.errors import SimInputError
from sim.plan import Op, OpKind, Phase
from sim.specs import load_model, load_system


def _precise(model, precision):
    return dataclasses.replace(model, expert_precision=precision)


def test_expert_bytes_per_precision_count_weights_and_scales(mixtral):
    h, i = mixtral.hidden_size, mixtral.expert_intermediate_size
    params = mixtral.expert_params
    assert mixtral.expert_bytes == 2 * params
    # INT8: one byte a weight and a 16-bit scale per output row (gate and up: i rows, down: h rows).
    assert _precise(mixtral, "int8").expert_bytes == params + 2 * (2 * i + h)
    # INT4: half a byte a weight and a 16-bit scale per 128 inputs of each row.
    assert _precise(mixtral, "int4").expert_bytes == params // 2 + 2 * (2 * i * (h // 128) + h * (i // 128))
    m8 = _precise(mixtral, "int8")
    assert m8.routed_expert_bytes == m8.num_moe_layers * m8.num_experts * m8.expert_bytes
    assert m8.weight_bytes == mixtral.non_expert_bytes + m8.routed_expert_bytes
    assert sum(m8.layer_bytes(layer) for layer in range(m8.num_layers)) < mixtral.weight_bytes
    with pytest.raises(SimInputError, match="expert_precision must be one of native, int8, int4"):
        _precise(mixtral, "fp8")


def _expert_op(model, tokens, stream):
    from sim.cost import OpWork

    w = OpWork(model).expert(tokens)
    return Op(0, OpKind.EXPERT, stream, Phase.PREFILL, 0, 0, 0, tokens, w.flops, w.bytes)


@pytest.mark.parametrize("stream", ["gpu", "cpu_experts"])
def test_int8_experts_compute_at_twice_the_rate_and_int4_at_the_bf16_rate(mixtral, paper_system, stream):
    """A compute-bound expert (many tokens) halves its compute roof in INT8; INT4 (weight-only) keeps the BF16
    rate; a memory-bound one (one token) follows its bytes."""
    times = {}
    for precision in ("native", "int8", "int4"):
        model = _precise(mixtral, precision)
        cm = RooflineCostModel(paper_system)
        cm.use_model(model)
        big, small = _expert_op(model, 4096, stream), _expert_op(model, 1, stream)
        assert cm.bound(big) == "compute" and cm.bound(small) == "memory"
        times[precision] = (cm.roofs(big.kind, stream, big.flops, big.bytes)[0],
                            cm.roofs(small.kind, stream, small.flops, small.bytes)[1])
    assert times["int8"][0] == pytest.approx(times["native"][0] / 2, rel=0.01)
    assert times["int4"][0] == pytest.approx(times["native"][0])
    assert times["int8"][1] == pytest.approx(times["native"][1] / 2, rel=0.01)
    assert times["int4"][1] == pytest.approx(times["native"][1] * 0.516 / 2, rel=0.01)  # 0.516 B a weight


def test_the_cost_model_reprices_when_the_plan_changes_precision(mixtral, paper_system):
    cm = RooflineCostModel(paper_system)
    op = _expert_op(mixtral, 4096, "gpu")
    native = cm.op_time_ns(op)
    cm.use_model(_precise(mixtral, "int8"))
    assert cm.op_time_ns(op) < 0.6 * native  # the memo was dropped, not reused
    cm.use_model(mixtral)
    assert cm.op_time_ns(op) == native
    qkv = dataclasses.replace(op, kind=OpKind.QKV)  # only routed experts change precision
    cm.use_model(_precise(mixtral, "int8"))
    t8 = cm.op_time_ns(qkv)
    cm.use_model(mixtral)
    assert cm.op_time_ns(qkv) == t8


def test_int8_experts_fit_more_residents_and_run_faster_end_to_end():
    runs = {p: simulate("mixtral-8x7b", "a100-80g-8452y", "coxmoe", batch=256, prompt_len=128, gen_len=8,
                        decode_sample=4, expert_precision=p) for p in ("native", "int8", "int4")}
    static = {p: r.static_memory for p, r in runs.items()}
    assert static["int8"]["cpu"]["expert_weights"] < 0.51 * static["native"]["cpu"]["expert_weights"]
    assert static["int4"]["cpu"]["expert_weights"] < 0.27 * static["native"]["cpu"]["expert_weights"]
    resident = {p: r.knobs["resident_experts"] for p, r in runs.items()}
    assert resident["native"] < resident["int8"] <= resident["int4"] == 8
    assert runs["int8"].throughput_tok_s > runs["native"].throughput_tok_s


def test_native_precision_keeps_sweep_points_and_profiles_matching():
    """A point at the default precision hashes as it did before the setting existed; another precision, or
    `native` forced, is part of the point and round-trips; an unknown one is refused. (That a profile matches a
    model whatever its experts' precision, and one without their rows refuses it, is checked by the two tests
    below.)"""
    native = SimConfig("mixtral-8x7b", "a100-80g-8452y", "coxmoe", batch=8, prompt_len=4, gen_len=2)
    assert "expert_precision" not in native.point()
    int8 = native.replace(expert_precision="int8")
    assert int8.point()["expert_precision"] == "int8"
    assert SimConfig.from_point(json.loads(json.dumps(int8.point()))).expert_precision == "int8"
    with pytest.raises(SimInputError, match="expert_precision must be one of"):
        native.replace(expert_precision="int2")
    assert "expert_precision" in native.replace(expert_precision="native").point()  # forced: part of the point


def test_native_precision_overrides_a_model_file_that_says_int8(tmp_path):
    """The default keeps a model file's own precision; `native` forces the model's dtype over it (it had been
    read as the default and left the file's int8 in place)."""
    import yaml

    from sim.api import config_model
    from sim.specs.catalog import show_preset

    spec = yaml.safe_load(show_preset("mixtral-8x7b"))
    spec["expert_precision"] = "int8"
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(spec))
    base = SimConfig(str(path), "a100-80g-8452y", "coxmoe", batch=8, prompt_len=4, gen_len=2)
    assert config_model(base).expert_precision == "int8"
    assert config_model(base.replace(expert_precision="native")).expert_precision == "native"
    from sim.cost.profile import model_signature

    mixtral = load_model("mixtral-8x7b")
    assert model_signature(mixtral) == model_signature(_precise(mixtral, "int8"))


def test_a_profile_times_quantized_cpu_experts_and_the_simulator_reads_them(tmp_path):
    """`calibrate profile` writes expert_int8 (where oneDNN's INT8 runs) and expert_int4 rows on the CPU; a profile
    cost model for a model with quantised experts prices CPU expert ops from those rows, shared experts and GPU
    experts from the native rows and the roofline."""
    pytest.importorskip("torch")
    from executor import cpu_experts as C
    from executor.profile import profile
    from sim.cost.profile import ProfileCostModel
    from sim.specs import ModelSpec

    tiny = ModelSpec(name="tiny", num_layers=2, hidden_size=64, vocab_size=97, num_attention_heads=4,
                     num_kv_heads=2, head_dim=16, num_experts=6, top_k=2, expert_intermediate_size=96)
    out = profile(tiny, tmp_path / "p", rounds=1, max_tokens=8, progress=False, max_requests=1, max_kv=4)
    import pandas as pd

    kinds = set(pd.read_csv(out / "timings.csv")["kind"])
    assert "expert_int4" in kinds and ("expert_int8" in kinds) == C.onednn_int8()
    system = load_system("a100-80g-8452y")
    for precision in ("native", "int4"):
        model = dataclasses.replace(tiny, expert_precision=precision)
        cost = ProfileCostModel(system, out, model)
        op = _expert_op(model, 8, "cpu_experts")
        _, plan, _, _ = _tiny_plan(precision)
        cost.prepare(dataclasses.replace(plan, model=model))
        assert cost._lookup(op) is not None  # a measured row, not the roofline
    native, int4 = (ProfileCostModel(system, out, dataclasses.replace(tiny, expert_precision=p)) for p in
                    ("native", "int4"))
    op = _expert_op(tiny, 8, "cpu_experts")
    assert native._lookup(op) != int4._lookup(op)  # different rows
    old = tmp_path / "native-only"  # a profile written before quantised rows existed
    old.mkdir()
    (old / "profile.json").write_text((out / "profile.json").read_text())
    frame = pd.read_csv(out / "timings.csv")
    frame[~frame["kind"].str.startswith("expert_int")].to_csv(old / "timings.csv", index=False)
    with pytest.raises(SimInputError, match="no expert_int4 rows for the model's int4 experts"):
        ProfileCostModel(system, old, dataclasses.replace(tiny, expert_precision="int4"))


def test_the_cli_takes_a_precision_and_refuses_a_bad_one(capsys):
    from experiments.cli import main

    assert main(["simulate", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--policy", "cpu-only",
                 "--batch", "4", "--prompt-len", "8", "--gen-len", "2", "--expert-precision", "int4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["static_memory"]["cpu"]["weights"] < load_model("mixtral-8x7b").weight_bytes / 3
    assert main(["simulate", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--batch", "4",
                 "--prompt-len", "8", "--gen-len", "2", "--expert-precision", "fp4"]) == 2
    err = capsys.readouterr().err
    assert "expert_precision must be one of model, native, int8, int4" in err and len(err.strip().splitlines()) == 1


def _tiny_plan(precision, policy="cpu-only"):
    from sim.policies import PlanContext, make_policy
    from sim.specs import ModelSpec
    from sim.workload import Workload
    from traces import SynthConfig, generate_trace

    spec = ModelSpec(name="tiny", num_layers=2, hidden_size=64, vocab_size=97, num_attention_heads=4,
                     num_kv_heads=2, head_dim=16, num_experts=6, top_k=2, expert_intermediate_size=96,
                     expert_precision=precision)
    prompts, gens = np.array([5, 3, 7]), np.array([3, 1, 2])
    trace = generate_trace(SynthConfig(spec.name, spec.num_moe_layers, spec.num_experts, spec.top_k, "zipf:1.0",
                                       0.2, 1), prompts, gens)
    workload = Workload(prompts, gens)
    plan = make_policy(policy, {}).build(PlanContext(spec, load_system("a100-80g-8452y"), workload, trace))
    return spec, plan, trace, workload


@pytest.mark.parametrize("precision, tolerance", [("int8", 0.02), ("int4", 0.05)])
def test_the_executor_runs_quantized_cpu_experts_within_tolerance(precision, tolerance):
    """A plan with INT8 or INT4 experts on the CPU runs with those kernels: the model's outputs (residual stream
    included) stay within the stated tolerance of the bf16 reference, and are not bit-equal to it."""
    pytest.importorskip("torch")
    from executor import cpu_experts as C
    from executor.reference import reference_forward
    from executor.run import execute_plan
    from executor.weights import random_weights

    if precision == "int8" and not C.onednn_int8():
        pytest.skip("INT8 experts need VNNI or AMX-INT8 (oneDNN quantised linear)")
    spec, plan, trace, workload = _tiny_plan(precision)
    weights = random_weights(dataclasses.replace(spec, expert_precision="native"), seed=3)
    want = reference_forward(weights, trace, workload)
    got = execute_plan(plan, weights, trace, use_cuda=False).outputs
    assert all(lw.cpu_experts is None for lw in weights.layers)  # the caller's weights keep their own runners
    worst = max(float((got[k].float() - want[k].float()).norm() / want[k].float().norm()) for k in want)
    assert 0 < worst < tolerance


def test_the_executor_refuses_quantized_experts_on_a_gpu_stream():
    pytest.importorskip("torch")
    from executor.run import execute_plan
    from executor.weights import random_weights

    spec, plan, trace, _ = _tiny_plan("int4", policy="gpu-only")
    with pytest.raises(SimInputError, match="int4 experts on the CPU only"):
        execute_plan(plan, random_weights(dataclasses.replace(spec, expert_precision="native"), seed=3), trace,
                     use_cuda=False)


def test_compare_and_the_real_commands_apply_the_precision(capsys):
    """`compare` (and `ablation`, `execute`, `calibrate validate` through `config_model`) simulate the precision
    asked for, not the model's native weights."""
    from experiments.cli import main
    from sim.api import config_model

    base = ["compare", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--policies", "coxmoe", "--batch",
            "64", "--prompt-len", "64", "--gen-len", "2", "--json"]
    runs = {}
    for precision in ("native", "int8"):
        assert main([*base, "--expert-precision", precision]) == 0
        runs[precision] = json.loads(capsys.readouterr().out)["policies"]["coxmoe"]
    assert runs["int8"]["expert_precision"] == "int8" and runs["native"]["expert_precision"] == "native"
    assert runs["int8"]["throughput_tok_s"] > 1.2 * runs["native"]["throughput_tok_s"]
    config = SimConfig("mixtral-8x7b", "a100-80g-8452y", "cpu-only", batch=2, prompt_len=2, gen_len=2,
                       expert_precision="int4")
    assert config_model(config).expert_precision == "int4"
    assert config_model(config.replace(expert_precision="native")).expert_precision == "native"


def test_a_profile_refuses_a_plan_with_quantized_experts(mixtral):
    """Handed to `simulate` directly, a profile built for native experts refuses to price an INT8 plan rather than
    mix native profile times with INT8 bytes."""
    from sim.cost.profile import ProfileCostModel

    profile = ProfileCostModel.__new__(ProfileCostModel)  # only the precision check runs before any table is read
    profile.model, profile._plan = mixtral, None
    _, plan, _, _ = _tiny_plan("int8")
    with pytest.raises(SimInputError, match="prices native experts; the plan's are int8"):
        profile.prepare(plan)


def test_stored_points_read_back_with_the_settings_they_omit():
    from sim.config import DEFAULTS, OMITTED_DEFAULTS

    assert all(DEFAULTS[k] == v for k, v in OMITTED_DEFAULTS.items())


def test_moe_gen_names_itself_in_its_errors():
    from sim.policies import make_policy

    with pytest.raises(SimInputError, match="policy moe-gen: attention=gpu contradicts"):
        make_policy("moe-gen", {"attention": "gpu"})
    r = pytest.raises(SimInputError, match="policy moe-gen: resident_experts 9 exceeds")
    with r:
        simulate("mixtral-8x7b", "a100-80g-8452y", "moe-gen", batch=8, prompt_len=8, gen_len=2,
                 policy_options={"resident_experts": "9"})
