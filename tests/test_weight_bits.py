"""Weights stored at a GGUF-style size (`ModelSpec.weight_bits_per_param`, `expert_bits_per_param`): bytes follow
the bits wherever weights are held, moved or read; activations and the KV cache keep the model's dtype; policies
that cannot honour it (FlexGen's tensor placement, the executor's kernels) refuse in one line."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from sim.api import simulate
from sim.cost.work import OpWork
from sim.errors import SimInputError
from sim.specs import load_model, load_system
from sim.specs.model import ModelSpec
from sim.specs.schema import validate_spec

VALIDATION = Path(__file__).resolve().parents[1] / "experiments" / "validation"


def test_bits_set_the_stored_bytes_of_weights_and_experts(mixtral):
    q = dataclasses.replace(mixtral, weight_bits_per_param=4.5, expert_bits_per_param=4.82)
    assert q.non_expert_bytes == math.ceil(mixtral.non_expert_params * 4.5 / 8)
    h, i = mixtral.hidden_size, mixtral.expert_intermediate_size
    assert q.expert_bytes == 3 * math.ceil(h * i * 4.82 / 8)  # Mixtral's experts have no biases
    assert q.weight_bytes == q.non_expert_bytes + q.routed_expert_bytes
    assert q.layer_bytes(0) == q.weight_param_bytes(mixtral.layer_params(0) - mixtral.num_experts
                                                    * mixtral.expert_params) + mixtral.num_experts * q.expert_bytes
    # unset: the dtype and the expert precision, byte for byte as before
    assert mixtral.non_expert_bytes == mixtral.non_expert_params * mixtral.bytes_per_param
    assert mixtral.kv_bytes_per_token == q.kv_bytes_per_token  # the cache keeps the model's dtype


def test_expert_bits_override_the_precision_layout_but_not_its_rate(mixtral):
    int4 = dataclasses.replace(mixtral, expert_precision="int4")
    sized = dataclasses.replace(int4, expert_bits_per_param=6.5625)
    assert sized.expert_bytes > int4.expert_bytes
    assert sized.expert_bytes == 3 * math.ceil(mixtral.hidden_size * mixtral.expert_intermediate_size * 6.5625 / 8)


@pytest.mark.parametrize("bits", [0.5, 33, -1])
def test_bits_out_of_range_are_refused_in_one_line(mixtral, bits):
    with pytest.raises(SimInputError, match="weight_bits_per_param must be 0"):
        dataclasses.replace(mixtral, weight_bits_per_param=bits)


def test_a_model_file_takes_bits_and_refuses_a_string(tmp_path, mixtral):
    fields = {f.name: getattr(mixtral, f.name) for f in dataclasses.fields(mixtral) if f.name != "sources"}
    m = validate_spec(ModelSpec, {**fields, "weight_bits_per_param": 4.25}, "model file x")
    assert m.weight_bits_per_param == 4.25
    with pytest.raises(SimInputError):
        validate_spec(ModelSpec, {**fields, "weight_bits_per_param": "four"}, "model file x")


def test_op_work_reads_weights_at_their_bits_and_activations_at_the_dtype(tiny_mla_model):
    m = dataclasses.replace(tiny_mla_model, weight_bits_per_param=4.0)
    plain, quant = OpWork(tiny_mla_model), OpWork(m)
    tokens = 7
    for kind in ("qkv", "o_proj", "shared_expert", "lm_head"):
        a, b = getattr(plain, kind)(tokens), getattr(quant, kind)(tokens)
        assert a.flops == b.flops  # compute is priced as before
        params = a.flops // (2 * tokens)
        assert a.bytes - b.bytes == params * m.bytes_per_param - math.ceil(params * 4.0 / 8)
    # MLA's up-projection inside attention reads its weights at the bits too
    att_a, att_b = plain.attention(1, 50, 50), quant.attention(1, 50, 50)
    up = m.attention_up_params
    assert att_a.bytes - att_b.bytes == up * m.bytes_per_param - math.ceil(up * 4.0 / 8)
    # the embedding's table row is a weight, its written hidden state an activation
    e_a, e_b = plain.embed(tokens), quant.embed(tokens)
    assert e_a.bytes - e_b.bytes == tokens * m.hidden_size * m.bytes_per_param - math.ceil(tokens * m.hidden_size / 2)


def test_kt_placement_of_deepseek_v3_fits_a_24gb_card_only_with_its_quantised_weights():
    """KTransformers keeps DeepSeek-V3's non-expert weights on a 24 GB GPU at about 5 bits; at bf16 (34 GB) the
    same placement is refused, naming the GPU."""
    system = str(VALIDATION / "systems" / "ktransformers-v02-1s-4090d.yaml")
    q4 = str(VALIDATION / "models" / "deepseek-v3-q4km.yaml")
    opts = {"resident_experts": "0", "attention": "gpu", "cpu_max_tokens": "100000"}
    with pytest.raises(SimInputError, match=r"GPU \(rtx4090d\) for fiddler memory exceeded: .*non_expert_weights 31.9"):
        simulate("deepseek-v3", system, "fiddler", batch=1, prompt_len=16, gen_len=3, policy_options=opts,
                 routing="uniform")
    r = simulate(q4, system, "fiddler", batch=1, prompt_len=16, gen_len=3, policy_options=opts, routing="uniform",
                 keep_plan=True)
    model = load_model(q4)
    assert r.plan.static_memory["gpu"]["non_expert_weights"] == model.non_expert_bytes
    assert r.plan.static_memory["cpu"]["expert_weights"] == model.routed_expert_bytes
    assert r.knobs["resident_experts_total"] == 0 and r.knobs["fetched_expert_runs"] == 0


def test_batch_one_decode_cannot_beat_streaming_its_experts_from_dram():
    """At batch 1 with every routed expert on the CPU, a decode step reads top-k experts per MoE layer from DRAM:
    the simulated rate stays under the DRAM roof for those bytes, and within 2x of it (the GPU's share and the
    copies add, nothing else)."""
    system = str(VALIDATION / "systems" / "ktransformers-v02-1s-4090d.yaml")
    path = str(VALIDATION / "models" / "deepseek-v3-q4km.yaml")
    m, s = load_model(path), load_system(system)
    r = simulate(path, system, "fiddler", batch=1, prompt_len=32, gen_len=9, routing="uniform",
                 policy_options={"resident_experts": "0", "attention": "gpu", "cpu_max_tokens": "100000"})
    roof_s = m.num_moe_layers * m.top_k * m.expert_bytes / (s.cpu.dram_bytes_per_s * s.cpu.dram_efficiency)
    step_s = r.decode_s / 8
    assert roof_s < step_s < 2 * roof_s


def test_flexgen_and_the_executor_refuse_weights_at_bits(tiny_model):
    from sim.policies import PlanContext, make_policy
    from sim.workload import Workload
    from traces import SynthConfig, generate_trace

    q = dataclasses.replace(tiny_model, weight_bits_per_param=4.5)
    prompts, gens = np.array([5, 3]), np.array([2, 2])
    trace = generate_trace(SynthConfig(q.name, q.num_moe_layers, q.num_experts, q.top_k, "uniform", 0.0, 1),
                           prompts, gens)
    ctx = PlanContext(q, load_system("a100-80g-8452y"), Workload(prompts, gens), trace)
    with pytest.raises(SimInputError, match="flexgen: .*weight_bits_per_param"):
        make_policy("flexgen", {"gpu_batch_size": "2", "num_gpu_batches": "1"}).build(ctx)
    pytest.importorskip("torch")
    from executor.run import execute_plan
    from executor.weights import random_weights

    plan = make_policy("cpu-only", {}).build(ctx)
    with pytest.raises(SimInputError, match="no kernels for weights stored at weight_bits_per_param"):
        execute_plan(plan, random_weights(tiny_model, seed=3), trace, use_cuda=False)


def test_a_profile_refuses_a_plan_whose_weights_it_never_timed_at_that_size(tiny_model):
    """A profile times the model's own kernels: handed a plan whose weights are stored at other bits, it refuses
    rather than price those bytes with the dtype's measured times."""
    from sim.cost.profile import ProfileCostModel
    from sim.policies import PlanContext, make_policy
    from sim.workload import Workload
    from traces import SynthConfig, generate_trace

    q = dataclasses.replace(tiny_model, expert_bits_per_param=4.5)
    prompts, gens = np.array([4]), np.array([2])
    trace = generate_trace(SynthConfig(q.name, q.num_moe_layers, q.num_experts, q.top_k, "uniform", 0.0, 1),
                           prompts, gens)
    plan = make_policy("cpu-only", {}).build(PlanContext(q, load_system("a100-80g-8452y"), Workload(prompts, gens),
                                                         trace))
    profile = ProfileCostModel.__new__(ProfileCostModel)  # only the model checks run before any table is read
    profile.model, profile._plan = tiny_model, None
    with pytest.raises(SimInputError, match="the plan's model stores weights at weight_bits_per_param"):
        profile.prepare(plan)


WEIGHT_KINDS = {"embed", "qkv", "o_proj", "router", "expert", "shared_expert", "dense_ffn", "lm_head"}
WEIGHT_PAYLOADS = {"expert_weights", "pageable_weights"}


@pytest.mark.parametrize("policy", ["coxmoe", "moe-lightning", "fiddler", "moe-gen", "trimoe", "ndp-experts",
                                    "stream-experts", "zero-inference", "gpu-only", "cpu-only", "expert-parallel"])
def test_every_policy_holds_and_moves_weights_at_their_bits_and_nothing_else(tiny_model, policy):
    """8-bit storage of a bf16 model's weights (experts too) halves exactly each static-memory entry that holds
    weights and each weight copy, and lowers only the weight-reading ops' bytes; hidden states, workspaces, the KV
    cache, activation and KV copies and every op's FLOPs stay as they were."""
    from sim.policies import PlanContext, make_policy
    from sim.workload import Workload
    from traces import SynthConfig, generate_trace

    q = dataclasses.replace(tiny_model, weight_bits_per_param=8.0, expert_bits_per_param=8.0)
    prompts, gens = np.array([5, 3, 7]), np.array([3, 2, 2])
    trace = generate_trace(SynthConfig(tiny_model.name, tiny_model.num_moe_layers, tiny_model.num_experts,
                                       tiny_model.top_k, "uniform", 0.0, 1), prompts, gens)
    system = load_system({"trimoe": "a100-80g-8452y-ndp8", "ndp-experts": "a100-80g-8452y-ndp8",
                          "expert-parallel": "2x-h100-sxm-nvlink-8480"}.get(policy, "a100-80g-8452y"))
    plain, quant = (make_policy(policy, {}).build(PlanContext(m, system, Workload(prompts, gens), trace))
                    for m in (tiny_model, q))
    halved = 0
    for pool, entries in plain.static_memory.items():
        assert set(entries) == set(quant.static_memory[pool])
        for key, value in entries.items():
            if "weight" in key or "expert" in key:
                assert quant.static_memory[pool][key] * 2 == value, (pool, key)
                halved += value > 0
            else:
                assert quant.static_memory[pool][key] == value, (pool, key)
    assert halved  # every policy holds some weights somewhere
    if [(o.kind, o.stream, o.tokens) for o in plain.ops] != [(o.kind, o.stream, o.tokens) for o in quant.ops]:
        return  # a search chose another plan for the smaller weights: the memory check above is the guard
    for a, b in zip(plain.ops, quant.ops, strict=True):
        assert a.flops == b.flops
        if str(a.kind) == "copy":
            assert (b.bytes * 2 == a.bytes) if str(a.payload) in WEIGHT_PAYLOADS else (b.bytes == a.bytes), a
        elif str(a.kind) in WEIGHT_KINDS and a.tokens:
            assert b.bytes < a.bytes, a
        else:
            assert b.bytes == a.bytes, a


def test_a_precision_that_would_not_move_the_bytes_is_refused_and_model_keeps_the_file(tmp_path):
    """With `expert_bits_per_param` in the model, an explicit expert precision would only relabel the run: refused
    in one line; the default (`model`) runs the file's own sizes."""
    path = tmp_path / "q.yaml"
    path.write_text("name: q\nnum_layers: 2\nhidden_size: 64\nvocab_size: 97\nnum_attention_heads: 4\n"
                    "num_kv_heads: 2\nhead_dim: 16\nnum_experts: 6\ntop_k: 2\nexpert_intermediate_size: 96\n"
                    "expert_bits_per_param: 4.5\n")
    kwargs = dict(batch=2, prompt_len=4, gen_len=2, routing="uniform")
    for precision in ("native", "int8", "int4"):
        with pytest.raises(SimInputError, match=f"--expert-precision {precision} would not change their bytes"):
            simulate(str(path), "a100-80g-8452y", "cpu-only", expert_precision=precision, **kwargs)
    r = simulate(str(path), "a100-80g-8452y", "cpu-only", expert_precision="model", keep_plan=True, **kwargs)
    assert r.plan.model.expert_bytes == 3 * math.ceil(64 * 96 * 4.5 / 8)


def test_compare_reports_flexgen_infeasible_and_runs_the_others(tiny_model):
    from sim.compare import compare

    q = dataclasses.replace(tiny_model, weight_bits_per_param=4.5)
    rows = compare(q, "a100-80g-8452y", batch=4, prompt_len=8, gen_len=3, policies=("coxmoe", "flexgen"),
                   workers=1)["policies"]
    assert not rows["flexgen"]["feasible"] and "weight_bits_per_param" in rows["flexgen"]["error"]
    assert rows["coxmoe"]["feasible"]


def test_a_profile_cannot_be_made_or_used_for_weights_at_bits(tiny_model, tmp_path):
    from sim.cost.profile import ProfileCostModel

    q = dataclasses.replace(tiny_model, expert_bits_per_param=4.5)
    with pytest.raises(SimInputError, match="simulate this model without --profile"):
        ProfileCostModel(load_system("a100-80g-8452y"), tmp_path, q)
    pytest.importorskip("torch")
    from executor.profile import profile

    with pytest.raises(SimInputError, match="cannot profile them"):
        profile(q, tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()
