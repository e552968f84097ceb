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
    with pytest.raises(SimInputError, match="GPU"):
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
