"""Model and hardware specs: derived sizes, presets, YAML round trips, HF configs, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from sim.errors import SimInputError
from sim.specs import load_model, load_system, preset_names, show_preset
from sim.specs.catalog import _PRESET_LOADER, CATALOGS, PRESET_DIR, _raw_catalog
from sim.specs.hf_config import model_from_hf_config


@pytest.mark.parametrize("name", preset_names("models"))
def test_preset_parameter_count_matches_published_total(name):
    m = load_model(name)
    assert m.published_total_params > 0
    assert abs(m.total_params / m.published_total_params - 1) < 0.02


def test_required_presets_exist():
    assert {"mixtral-8x7b", "mixtral-8x22b", "deepseek-v2-lite", "qwen3-30b-a3b", "dbrx", "qwen1.5-moe-a2.7b",
            "olmoe-1b-7b", "deepseek-v3"} <= set(preset_names("models"))
    assert {"t4", "l4", "a10", "rtx6000ada", "a100-40g", "a100-80g-pcie", "h100-pcie", "h100-sxm",
            "h200"} <= set(preset_names("gpus"))
    assert {"xeon-8452y", "xeon-8480", "xeon-8592", "xeon-6980p", "xeon-8280"} <= set(preset_names("cpus"))
    assert {"pcie3x16", "pcie4x16", "pcie5x16"} <= set(preset_names("links"))
    assert {"rtx6000ada-8452y", "a100-80g-8452y", "h100-80g-8452y"} <= set(preset_names("systems"))


def test_dense_opt_is_a_one_expert_model_without_router():
    m = load_model("opt-6.7b")
    assert (m.num_experts, m.top_k, m.has_router, m.router_params, m.ffn_matrices) == (1, 1, False, 0, 2)
    h, f = 4096, 16384
    # fc1 + fc2 with biases; q, k, v, o with biases; two LayerNorms with weight and bias
    assert m.expert_params == 2 * h * f + f + h
    assert m.layer_params(0) == (4 * h * h + 4 * h) + (2 * h * f + f + h) + 4 * h
    # tied head: the embedding (tokens + 2050 learned positions) is counted once, the head GEMM is vocab x h
    assert m.lm_head_params == 0 and m.embedding_params == (50272 + 2050) * h
    assert m.total_params == 6_658_473_984  # transformers' OPTForCausalLM("facebook/opt-6.7b").num_parameters()
    # its embedding reads a token row and a learned position row per token, and writes the hidden state (the
    # position row had been left out, found by a cost audit); a model with rotary positions reads one row
    from sim.cost.work import OpWork

    assert OpWork(m).embed(7).bytes == 3 * 7 * h * 2
    # a shared expert is an FFN of the model's kind (it had been counted as gated and bias-free whatever the model)
    assert m.shared_expert_params == 0
    shared = dataclasses.replace(m, shared_expert_intermediate_size=f)
    assert shared.shared_expert_params == m.expert_params == 2 * h * f + f + h
    assert OpWork(load_model("mixtral-8x7b")).embed(7).bytes == 2 * 7 * 4096 * 2


def test_mixtral_derived_sizes_match_reference(mixtral):
    # models.md: 176.2M params and 352 MB per expert, 2.82 GB of experts per layer.
    assert mixtral.expert_params == 3 * 4096 * 14336
    assert abs(mixtral.expert_bytes / 1e6 - 352.3) < 0.5
    assert mixtral.kv_bytes_per_token_layer == 2 * 8 * 128 * 2
    assert mixtral.num_moe_layers == 32


def test_deepseek_v2_lite_structure():
    m = load_model("deepseek-v2-lite")
    assert m.attention == "mla" and m.num_moe_layers == 26 and not m.is_moe_layer(0)
    assert m.kv_bytes_per_token_layer == (512 + 64) * 2  # MLA caches the latent and the rope key
    assert abs(m.expert_bytes / 1e6 - 17.3) < 0.1  # models.md: 17.3 MB per expert


def test_mla_attention_flops_follow_the_phase():
    """DeepSeek's MLA: prefill as multi-head attention over decompressed K and V (2 (nope + rope) + 2 v per head and
    key), decode absorbed over the latent (2 (latent + rope) + 2 latent); other attention is the same in both."""
    m = load_model("deepseek-v2-lite")
    heads = m.num_attention_heads
    assert m.attention_flops(1, 1, prefill=True) == heads * (2 * (128 + 64) + 2 * 128)
    assert m.attention_flops(1, 1) == heads * (2 * (512 + 64) + 2 * 512)
    mixtral = load_model("mixtral-8x7b")
    assert mixtral.attention_flops(3, 10, prefill=True) == mixtral.attention_flops(3, 10)


def test_paper_systems_compose_the_right_parts():
    for name, gpu, link in (("rtx6000ada-8452y", "rtx6000ada", "pcie4x16"), ("a100-80g-8452y", "a100-80g-pcie",
                            "pcie4x16"), ("h100-80g-8452y", "h100-pcie", "pcie5x16")):
        s = load_system(name)
        assert (s.gpu.name, s.cpu.name, s.link.name) == (gpu, "xeon-8452y", link)
        assert s.cpu.cores == 36 and s.dram_bytes == 512 * 2**30
        assert abs(s.cpu.dram_bytes_per_s - 307.2e9) < 1


@pytest.mark.parametrize("kind", sorted(CATALOGS))
def test_presets_read_by_libyaml_equal_the_pure_python_safe_loader(kind):
    """The catalog parses shipped presets with libyaml where PyYAML has it; what it reads must be what the
    pure-Python safe loader reads, so a machine without libyaml simulates the same numbers."""
    text = (PRESET_DIR / f"{kind}.yaml").read_text(encoding="utf-8")
    pure = yaml.load(text, Loader=yaml.SafeLoader)  # noqa: S506 - a safe loader
    fast = yaml.load(text, Loader=_PRESET_LOADER)  # noqa: S506 - a safe loader
    assert repr(fast) == repr(pure)
    assert _raw_catalog(kind) == {name: entry for name, entry in pure.items() if not name.startswith("_")}


@pytest.mark.parametrize("kind", ["gpus", "cpus", "links", "ndps", "disks", "systems", "models"])
def test_every_number_has_a_source(kind):
    import dataclasses

    from sim.specs.catalog import component_preset, model_preset, system_preset

    for name in preset_names(kind):
        if kind in ("models", "systems"):
            spec = (model_preset if kind == "models" else system_preset)(name)
        else:
            spec = component_preset(kind, name)
        numeric = [f.name for f in dataclasses.fields(spec) if f.type in ("int", "float")]
        if kind == "models":
            assert "config" in spec.sources and "published_total_params" in spec.sources
            continue
        if kind == "systems":
            numeric = ["dram_bytes", "gpu_reserved_bytes", "dram_reserved_bytes"]
        missing = [n for n in numeric if n not in spec.sources]
        assert not missing, f"{kind} {name} lacks sources for {missing}"


@pytest.mark.parametrize("name", ["a100-80g-8452y", "h100-pcie", "xeon-8452y", "pcie5x16", "qwen3-30b-a3b"])
def test_show_is_yaml_the_loaders_accept_unchanged(tmp_path, name):
    text = show_preset(name)
    data = yaml.safe_load(text)
    assert data["name"] == name
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    if name in preset_names("systems"):
        assert load_system(str(path)) == load_system(name)
    elif name in preset_names("models"):
        assert load_model(str(path)) == load_model(name)
    else:  # a component: inline in a system file in its preset's place, it loads as the preset
        from sim.specs.catalog import component_preset

        kind, section = next((k, sec) for k, sec in (("gpus", "gpu"), ("cpus", "cpu"), ("links", "link"))
                             if name in preset_names(k))
        system = yaml.safe_load(show_preset("a100-80g-8452y"))
        system[section] = data
        path.write_text(yaml.safe_dump(system))
        loaded = getattr(load_system(str(path)), section)
        assert loaded == component_preset(kind, name) and dataclasses.asdict(loaded) == dataclasses.asdict(
            component_preset(kind, name))


def test_custom_system_file_with_nested_overrides(tmp_path):
    data = yaml.safe_load(show_preset("a100-80g-8452y"))
    data["gpu"]["hbm_bytes"] = 40 * 2**30
    data["cpu"] = "xeon-8480"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    s = load_system(str(path))
    assert s.gpu.hbm_bytes == 40 * 2**30 and s.cpu.name == "xeon-8480"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(bogus=1), "unknown field"),
    (lambda d: d.pop("dram_bytes"), "missing field"),
    (lambda d: d["gpu"].update(gemm_efficiency=1.5), "gemm_efficiency"),
    (lambda d: d["gpu"].update(hbm_bytes="lots"), "expected a number"),
    (lambda d: d.update(cpu="no-such-cpu"), "unknown cpu preset"),
])
def test_bad_system_files_are_one_line_errors(tmp_path, mutate, message):
    data = yaml.safe_load(show_preset("a100-80g-8452y"))
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SimInputError, match=message) as info:
        load_system(str(path))
    assert "\n" not in str(info.value)


def test_unknown_presets_and_files():
    with pytest.raises(SimInputError, match="unknown model preset"):
        load_model("mixtral-9x9b")
    with pytest.raises(SimInputError, match="unknown system preset"):
        load_system("nope")
    with pytest.raises(SimInputError, match="not found"):
        load_system("missing.yaml")


def test_unparseable_spec_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("gpu: [unclosed\n")
    with pytest.raises(SimInputError, match="cannot parse"):
        load_system(str(path))


HF_CONFIGS = {
    "mixtral-8x7b": {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32000,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "intermediate_size": 14336, "tie_word_embeddings": False},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
                      "vocab_size": 151936, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                      "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                      "intermediate_size": 6144, "tie_word_embeddings": False},
    "deepseek-v2-lite": {"model_type": "deepseek_v2", "hidden_size": 2048, "num_hidden_layers": 27,
                         "vocab_size": 102400, "num_attention_heads": 16, "num_key_value_heads": 16,
                         "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                         "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2,
                         "num_experts_per_tok": 6, "moe_intermediate_size": 1408, "intermediate_size": 10944,
                         "first_k_dense_replace": 1, "tie_word_embeddings": False},
    "dbrx": {"model_type": "dbrx", "d_model": 6144, "n_layers": 40, "n_heads": 48, "vocab_size": 100352,
             "attn_config": {"kv_n_heads": 8}, "ffn_config": {"moe_num_experts": 16, "moe_top_k": 4,
                                                               "ffn_hidden_size": 10752}},
    "opt-6.7b": {"model_type": "opt", "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 50272,
                 "num_attention_heads": 32, "ffn_dim": 16384, "max_position_embeddings": 2048,
                 "word_embed_proj_dim": 4096, "enable_bias": True, "do_layer_norm_before": True},
}


@pytest.mark.parametrize("preset", sorted(HF_CONFIGS))
def test_hf_config_gives_the_preset_parameter_count(tmp_path, preset):
    path = tmp_path / preset / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(HF_CONFIGS[preset]))
    m = load_model(str(path))
    assert m.name == preset
    assert m.total_params == load_model(preset).total_params


def test_hf_config_layouts_that_transformers_5_saves_and_dense_layer_keys(tmp_path):
    """transformers 5 saves Qwen's expert count as num_local_experts: read as num_experts. Keys that make layers
    dense are modelled where they make leading layers dense, refused otherwise (they had been ignored)."""
    def load(name, **changes):
        cfg = {**HF_CONFIGS["qwen3-30b-a3b"], **changes}
        path = tmp_path / name / "config.json"
        path.parent.mkdir()
        path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
        return load_model(str(path))

    assert load("q5", num_experts=None, num_local_experts=128).total_params == load_model("qwen3-30b-a3b").total_params
    lead = load("lead", mlp_only_layers=[0, 1])
    assert lead.first_dense_layers == 2 and lead.num_moe_layers == 46 and lead.dense_intermediate_size == 6144
    with pytest.raises(SimInputError, match="only leading dense layers"):
        load("step", decoder_sparse_step=2)
    with pytest.raises(SimInputError, match="only leading dense layers"):
        load("odd", mlp_only_layers=[3])
    with pytest.raises(SimInputError, match=r"num_hidden_layers must be in \[1, 4096\]"):  # before the layer walk
        load("huge", num_hidden_layers=10**8, decoder_sparse_step=2)
    with pytest.raises(SimInputError, match="moe_layer_freq"):
        model_from_hf_config({**HF_CONFIGS["deepseek-v2-lite"], "moe_layer_freq": 2})


DEEPSEEK_V3_FP8 = {"model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61, "vocab_size": 129280,
                   "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
                   "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
                   "n_shared_experts": 1, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
                   "intermediate_size": 18432, "first_k_dense_replace": 3, "topk_method": "noaux_tc",
                   "tie_word_embeddings": False,
                   # deepseek-ai/DeepSeek-V3 config.json: the checkpoint is FP8 with a float32 scale per 128 x 128
                   "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                           "weight_block_size": [128, 128]}}


def test_a_quantised_checkpoint_is_sized_as_stored():
    """A config's quantization_config sizes the weights as the checkpoint stores them (it had been read as 16 bits
    a weight): DeepSeek-V3's FP8 blocks, GPTQ/AWQ groups; the embedding, LM head, routers and norms stay in the
    model's dtype; compute and the KV cache do not change."""
    m = model_from_hf_config(DEEPSEEK_V3_FP8, name="dsv3")
    plain = model_from_hf_config({k: v for k, v in DEEPSEEK_V3_FP8.items() if k != "quantization_config"})
    assert m.total_params == plain.total_params == load_model("deepseek-v3").total_params
    assert m.expert_bits_per_param == 8 + 32 / (128 * 128) and plain.expert_bits_per_param == 0
    assert m.expert_bytes == 3 * math.ceil(7168 * 2048 * m.expert_bits_per_param / 8)
    kept = m.embedding_params + m.lm_head_params + m.final_norm_params + 61 * m.norm_params_per_layer \
        + m.num_moe_layers * m.router_params
    assert m.non_expert_bytes == pytest.approx(2 * kept + (m.non_expert_params - kept) * m.expert_bits_per_param / 8,
                                               abs=1)
    assert 670e9 < m.weight_bytes < 680e9 < plain.weight_bytes / 1.9  # one byte a weight, not two
    assert m.kv_bytes_per_token == plain.kv_bytes_per_token and "float32 scales" in m.sources["expert_bits_per_param"]
    # GPTQ: packed 4-bit weights, an fp16 scale and a packed 4-bit zero per group of 128 inputs and output row, an
    # int32 group index per input row; Mixtral's experts are w1, w3 (14336 x 4096) and w2 (4096 x 14336)
    h, i = 4096, 14336
    want = (2 * (4 + 20 * (h // 128) / h + 32 / i) + (4 + 20 * (i // 128) / i + 32 / h)) / 3
    gptq = model_from_hf_config({**HF_CONFIGS["mixtral-8x7b"], "quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "modules_to_not_convert": ["gate", "lm_head"]}})
    assert gptq.expert_bits_per_param == pytest.approx(want, rel=1e-12)
    per_row = model_from_hf_config({**HF_CONFIGS["mixtral-8x7b"], "quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": -1}})  # AWQ: no group index; one scale and zero a row
    assert per_row.expert_bits_per_param == pytest.approx(4 + 20 * (2 / h + 1 / i) / 3, rel=1e-12)


# Qwen3-30B-A3B-Thinking-2507-FP8 as a public weight report lists it (config keys and every tensor's shape and
# dtype): FP8 e4m3 projections with a bf16 inverse scale per 128 x 128 block; embedding, LM head, routers and norms
# in bf16; its config lists each layer's norms and router in modules_to_not_convert.
QWEN3_FP8_KEEP = ["lm_head"] + [f"model.layers.{n}.{k}" for n in range(48)
                                for k in ("input_layernorm", "mlp.gate", "post_attention_layernorm")]


def test_qwens_fp8_checkpoint_comes_to_its_tensors_bytes():
    cfg = {**HF_CONFIGS["qwen3-30b-a3b"], "quantization_config": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
        "modules_to_not_convert": QWEN3_FP8_KEEP}}
    layers, experts = 48, 128

    def fp8(rows, cols):  # e4m3 bytes and a bf16 scale per block, as the report's weight_scale_inv shapes say
        return rows * cols + 2 * -(-rows // 128) * -(-cols // 128)
    tensors = (2 * 151936 * 2048 * 2 + 2048 * 2  # embedding, LM head, final norm
               + layers * (2 * 2048 * 2 + 2 * 128 * 2 + 128 * 2048 * 2  # layer norms, q/k norms, router
                           + fp8(4096, 2048) + 2 * fp8(512, 2048) + fp8(2048, 4096)
                           + experts * (2 * fp8(768, 2048) + fp8(2048, 768))))
    assert tensors == 31_170_895_872
    m = model_from_hf_config(cfg)
    assert m.weight_bytes == pytest.approx(tensors, rel=2e-4)  # the scales counted as float32 (DeepSeek's)


def test_show_prints_a_config_json_as_the_simulator_reads_it_and_it_reads_back(tmp_path):
    """`presets --show config.json`: the mapped spec with the stored size its quantization_config gives (and their
    sources), as YAML that --model-file reads back to the same spec."""
    from sim.specs import show_preset

    path = tmp_path / "dsv3" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(DEEPSEEK_V3_FP8))
    text = show_preset(str(path))
    assert "expert_bits_per_param: 8.001953125" in text and "float32 scales" in text
    out = tmp_path / "dsv3.yaml"
    out.write_text(text)
    assert load_model(str(out)) == load_model(str(path))


def _ct(fmt, weights, ignore=("lm_head",)):
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": list(ignore),
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}


def test_compressed_tensors_checkpoints_are_sized_by_their_scheme():
    """llm-compressor's checkpoints (one scheme for every Linear): packed INT4 groups, FP8 per channel, NVFP4
    groups of 16 with fp8 scales; `ignore` keeps the LM head and the routers (a regex is checked against the
    family's module names), and the Linear target quantises whatever it does not name."""
    q3 = HF_CONFIGS["qwen3-30b-a3b"]
    h, i = 2048, 768
    w4 = model_from_hf_config({**q3, "quantization_config": _ct(
        "pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True})})
    # 4-bit words, a 16-bit scale per 128 inputs and row; gate/up are 768 x 2048, down 2048 x 768
    assert w4.expert_bits_per_param == pytest.approx(4 + 16 / 128, rel=1e-12)
    asym = model_from_hf_config({**q3, "quantization_config": _ct(
        "pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": False,
                           "actorder": "group"})})
    want = (2 * (4 + 20 / 128 + 32 / i) + (4 + 20 / 128 + 32 / h)) / 3  # zero points and int32 group indices
    assert asym.expert_bits_per_param == pytest.approx(want, rel=1e-12)
    # FP8 per channel, scales in the model's bf16 (compressed-tensors keeps the observed dtype)
    fp8 = model_from_hf_config({**q3, "quantization_config": _ct(
        "float-quantized", {"num_bits": 8, "type": "float", "strategy": "channel"}, ("lm_head", "re:.*mlp.gate$"))})
    assert fp8.expert_bits_per_param == pytest.approx((2 * (8 + 16 / h) + (8 + 16 / i)) / 3, rel=1e-12)
    for alias in ("dynamic", True):  # the group ordering's alias and its old spelling store the index too
        assert model_from_hf_config({**q3, "quantization_config": _ct("pack-quantized", {
            "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
            "actorder": alias})}).expert_bits_per_param == pytest.approx((2 * (4.125 + 32 / i) + 4.125 + 32 / h) / 3)
    nvfp4 = model_from_hf_config({**q3, "quantization_config": _ct(
        "nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16})})
    assert nvfp4.expert_bits_per_param == pytest.approx(4.5 + 32 / (h * i), rel=1e-9)
    # the router kept by a regex in fp8's ignore, quantised by the Linear target in w4's: w4's non-expert weights
    # hold it at 4.125 bits; the LM head, in both ignore lists, stays 16-bit
    assert "routers" in fp8.sources["weight_bits_per_param"].split(";")[1]
    kept = w4.embedding_params + w4.lm_head_params + w4.final_norm_params + 48 * w4.norm_params_per_layer
    linear = 4 + 16 / 128
    assert w4.non_expert_bytes == pytest.approx((2 * kept + (w4.non_expert_params - kept) * linear / 8), abs=2)
    tied = model_from_hf_config({**q3, "quantization_config": _ct(
        "pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, ())})
    assert tied.non_expert_bytes < w4.non_expert_bytes  # without ignore the LM head is quantised too


def test_a_compressed_tensors_config_as_llm_compressor_writes_it():
    """The keys a saved config carries besides the scheme (an empty sparsity_config, transform_config, version) are
    read as nothing; the ignore list names each layer's router by its full name, so the routers stay 16-bit only
    when every MoE layer's is listed (a bare `gate` names no module and keeps none)."""
    q3 = HF_CONFIGS["qwen3-30b-a3b"]
    scheme = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
    saved = {**_ct("float-quantized", scheme, ["lm_head"] + [f"model.layers.{n}.mlp.gate" for n in range(48)]),
             "sparsity_config": {}, "transform_config": {}, "version": "0.12.2", "quantization_status": "compressed"}
    every = model_from_hf_config({**q3, "quantization_config": saved})
    bare = model_from_hf_config({**q3, "quantization_config": {**saved, "ignore": ["lm_head", "gate"]}})
    some = model_from_hf_config({**q3, "quantization_config": {**saved, "ignore": saved["ignore"][:-1]}})
    assert every.non_expert_bytes > bare.non_expert_bytes == some.non_expert_bytes  # routers at 16 bits, or at 8
    assert every.non_expert_bytes - bare.non_expert_bytes == pytest.approx(48 * 128 * 2048 * (16 - 8.0078125) / 8,
                                                                           rel=1e-3)


@pytest.mark.parametrize("qc, message", [
    (_ct("marlin-24", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}),
     "format 'marlin-24' is not modelled"),
    ({**_ct("float-quantized", {"num_bits": 8, "type": "float", "strategy": "tensor"}),
      "kv_cache_scheme": {"num_bits": 8, "type": "float"}}, "kv_cache_scheme is not modelled"),
    (_ct("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
         ("re:.*self_attn.*",)), "keeps model.layers.0.self_attn.q_proj unquantised"),
    (_ct("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, ("re:((",)),
     r"ignore 're:\(\(' is not a regex the importer evaluates"),
    (_ct("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
         ("re:a{4294967296}",)), "is not a regex the importer evaluates"),
    (_ct("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
         ("re:(.*)*x$",)), "a repeat inside a repeat"),
    (_ct("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
         ("model.layers.5.self_attn.q_proj",)), "keeps 'model.layers.5.self_attn.q_proj' unquantised"),
    (_ct("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
         ("re:.*layers.[1-9].*",)), "keeps model.layers.1.self_attn.q_proj unquantised"),
    (_ct("float-quantized", {"num_bits": 4, "type": "float", "strategy": "channel"}), "does not hold float4"),
    (_ct("pack-quantized", {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 16}),
     "does not hold float4"),
    (_ct("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
                            "symmetric": "false"}), "symmetric must be true or false"),
    ({**_ct("float-quantized", {"num_bits": 8, "type": "float", "strategy": "tensor"}),
      "sparsity_config": {"format": "sparse-bitmask"}}, "sparsity_config is not modelled"),
    (_ct("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group"}), "group_size must be a positive"),
    (_ct("int-quantized", {"num_bits": 3, "type": "int", "strategy": "channel"}), "num_bits 3"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "a": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "channel"}},
        "b": {"targets": ["re:.*experts.*"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}},
     "config_groups must hold one scheme"),
])
def test_a_compressed_tensors_scheme_the_importer_cannot_size_is_refused(tmp_path, capsys, qc, message):
    """One line and exit status 2 through the command line (a regex that would overflow or backtrack for ever had
    been a traceback or a hang)."""
    from experiments.cli import main

    path = tmp_path / "q" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**HF_CONFIGS["qwen3-30b-a3b"], "quantization_config": qc}))
    assert main(["simulate", "--model-file", str(path), "--system", "a100-80g-8452y", "--batch", "2",
                 "--prompt-len", "4", "--gen-len", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and re.search(message, err), err


def test_naive_quantized_and_dbrx():
    """naive-quantized (one byte a value, as older neuralmagic FP8 configs say) is sized; DBRX's experts are fused
    parameters no Linear target reaches, so a quantised DBRX config is refused rather than sized."""
    naive = model_from_hf_config({**HF_CONFIGS["mixtral-8x7b"], "quantization_config": _ct(
        "naive-quantized", {"num_bits": 8, "type": "float", "strategy": "tensor"})})
    assert 8 < naive.expert_bits_per_param < 8.001
    with pytest.raises(SimInputError, match="a quantization_config on DBRX is not modelled"):
        model_from_hf_config({**HF_CONFIGS["dbrx"], "quantization_config": _ct(
            "float-quantized", {"num_bits": 8, "type": "float", "strategy": "tensor"})})


def test_show_tells_a_system_missing_a_part_and_a_component_file_apart(tmp_path):
    from sim.specs import show_preset

    (tmp_path / "s.yaml").write_text("gpu: rtx4090d\ncpu: xeon-8452y\n")
    with pytest.raises(SimInputError, match="system file .*s.yaml: missing field link"):
        show_preset(str(tmp_path / "s.yaml"))
    (tmp_path / "g.yaml").write_text(show_preset("rtx4090"))
    with pytest.raises(SimInputError, match="looks like a gpu spec: --show reads a file only as a model or a system"):
        show_preset(str(tmp_path / "g.yaml"))


def test_the_package_ships_every_spec_and_points_file_the_experiments_read():
    """The wheel's package data covers every YAML under experiments/ (the validation's systems and models had
    been left out, so an installed copy could not run KTransformers' points)."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["experiments"]
    files = [p.relative_to(root / "experiments").as_posix() for p in (root / "experiments").rglob("*.yaml")]
    assert files and all(any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs) for f in files), \
        [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not modelled"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size must be two positive integers"),
    ({"quant_method": "gptq", "bits": 5}, "bits must be 2, 3, 4 or 8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 0}, "group_size must be a positive integer or -1"),
    ({"quant_method": "gptq", "bits": 4, "modules_to_not_convert": ["model.layers.0.self_attn"]},
     "keeps 'model.layers.0.self_attn' unquantised"),
    ({"quant_method": "fp8", "ignored_layers": ["model.layers.0.self_attn.q_proj"]},
     "ignored_layers keeps 'model.layers.0.self_attn.q_proj' unquantised"),
    ({"quant_method": "gptq", "bits": 4, "dynamic": {"-:.*attn.*": {}}}, "dynamic .* is not modelled"),
    ({"quant_method": "gptq", "bits": 4, "lm_head": True}, "lm_head changes which modules are quantised"),
    ({"quant_method": "gptq", "bits": 4, "modules_in_block_to_quantize": [["self_attn.q_proj"]]},
     "modules_in_block_to_quantize changes which modules"),
    ("fp8", "quantization_config must be a mapping"),
])
def test_a_quantisation_the_importer_cannot_size_is_refused_in_one_line(tmp_path, qc, message):
    path = tmp_path / "q" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**HF_CONFIGS["mixtral-8x7b"], "quantization_config": qc}))
    with pytest.raises(SimInputError, match=message):
        load_model(str(path))


def test_a_bare_gate_is_a_router_for_mixtral_but_every_gate_proj_for_qwen():
    """AutoAWQ and transformers match a bare name by substring: `gate` keeps Mixtral's router only, but also every
    `gate_proj` of a Qwen or DeepSeek checkpoint, which the importer refuses rather than size as quantised."""
    qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "modules_to_not_convert": ["gate"]}
    assert model_from_hf_config({**HF_CONFIGS["mixtral-8x7b"], "quantization_config": qc}).expert_bits_per_param
    for name in ("qwen3-30b-a3b", "deepseek-v2-lite"):
        with pytest.raises(SimInputError,
                           match=r"as a substring it also matches model\.layers\.0\.mlp\.(experts\.0\.)?gate_proj"):
            model_from_hf_config({**HF_CONFIGS[name], "quantization_config": qc})


def test_a_dotted_keep_entry_is_matched_by_substring_too():
    """transformers matches every `modules_to_not_convert` entry by substring of the module's full name, dotted or
    not: `mlp.experts.0.gate` keeps each layer's `experts.0.gate_proj` in 16 bits, which is refused, not sized."""
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "modules_to_not_convert": ["mlp.experts.0.gate"]}
    with pytest.raises(SimInputError, match=r"also matches model\.layers\.0\.mlp\.experts\.0\.gate_proj"):
        model_from_hf_config({**HF_CONFIGS["qwen3-30b-a3b"], "quantization_config": qc})
    qc["modules_to_not_convert"] = ["model.layers.3.input_layernorm", "block_sparse_moe.gate"]
    assert model_from_hf_config({**HF_CONFIGS["mixtral-8x7b"], "quantization_config": qc}).expert_bits_per_param


CT_INT4 = {"quant_method": "compressed-tensors", "format": "pack-quantized",
           "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
                                                                      "strategy": "group", "group_size": 128,
                                                                      "symmetric": True}}}}


@pytest.mark.parametrize("pattern", [r"re:.*experts\.(1[1-9]|[2-9][1-9])\..*", r"re:.*layers\.(1[1-9]|2[1-9])\..*",
                                     r"re:.*layers\.47\.mlp\.experts\.127\.down_proj"])
def test_an_ignore_regex_is_checked_against_every_layer_and_expert(pattern):
    """A compressed-tensors `ignore` regex that keeps some layers' or experts' matrices in 16 bits is refused
    whichever indices it names (the importer had tried only a sample of them and sized such a model as quantised)."""
    qc = {**CT_INT4, "ignore": ["lm_head", pattern]}
    with pytest.raises(SimInputError, match="unquantised"):
        model_from_hf_config({**HF_CONFIGS["qwen3-30b-a3b"], "quantization_config": qc})


def test_ignore_entries_naming_modules_the_model_lacks_are_accepted():
    """Qwen3-30B-A3B has neither a shared expert nor a dense layer: a regex that matches only its routers, or only
    shared-expert names, keeps nothing it quantises."""
    for extra in (r"re:.*mlp.gate", r"re:.*shared_expert.*"):
        qc = {**CT_INT4, "ignore": ["lm_head", extra]}
        assert model_from_hf_config({**HF_CONFIGS["qwen3-30b-a3b"], "quantization_config": qc}).expert_bits_per_param
    with pytest.raises(SimInputError, match="shared_expert"):  # Qwen2-MoE's shared expert is quantised
        model_from_hf_config({**HF_CONFIGS["qwen3-30b-a3b"], "model_type": "qwen2_moe",
                              "shared_expert_intermediate_size": 2560,
                              "quantization_config": {**CT_INT4, "ignore": [r"re:.*shared_expert\..*"]}})


def test_too_fine_scale_blocks_name_the_quantization_config():
    qc = {"quant_method": "fp8", "weight_block_size": [1, 1]}
    with pytest.raises(SimInputError, match=r"quantization_config .*more than 32"):
        model_from_hf_config({**HF_CONFIGS["mixtral-8x7b"], "quantization_config": qc})


def test_a_bare_config_json_is_named_by_the_current_folder(tmp_path, monkeypatch):
    folder = tmp_path / "my-checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF_CONFIGS["mixtral-8x7b"]))
    monkeypatch.chdir(folder)
    assert load_model("config.json").name == "my-checkpoint"


def test_hf_config_unsupported_and_incomplete():
    with pytest.raises(SimInputError, match="not supported"):
        model_from_hf_config({"model_type": "llama"})
    with pytest.raises(SimInputError, match="missing field num_local_experts"):
        model_from_hf_config({k: v for k, v in HF_CONFIGS["mixtral-8x7b"].items() if k != "num_local_experts"})


def test_a_name_that_would_break_the_one_line_error_is_refused():
    """Names are quoted in every later message: one with a newline or another control character is refused first
    (found by the system-spec fuzz: a GPU named '\\n' with a zero peak gave a two-line error)."""
    from sim.specs.catalog import build_system

    for bad in ("a\nb", "tab\there", "\x00"):
        with pytest.raises(SimInputError, match="name must be printable text on one line") as exc:
            build_system("x", {"gpu": {"name": bad, "bf16_flops_per_s": 0}, "cpu": "xeon-8452y", "link": "pcie4x16",
                               "dram_bytes": 2**39, "gpu_reserved_bytes": 0, "dram_reserved_bytes": 0}, "f")
        assert "\n" not in str(exc.value)


def test_a_hugging_face_cache_snapshot_names_the_model_by_its_snapshot_folder(tmp_path):
    """The cache links a snapshot's config.json into blobs/: the name comes from the link's folder."""
    blobs = tmp_path / "models--x" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc").write_text(json.dumps(HF_CONFIGS["mixtral-8x7b"]))
    snap = tmp_path / "models--x" / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to("../../blobs/abc")
    assert load_model(str(snap / "config.json")).name == "rev1"


def test_a_spec_path_that_is_no_regular_file_says_so(tmp_path):
    import os

    fifo = tmp_path / "f.yaml"
    os.mkfifo(fifo)
    with pytest.raises(SimInputError, match="is not a regular file"):
        load_system(str(fifo))
    with pytest.raises(SimInputError, match="not found"):
        load_system(str(tmp_path / "missing.yaml"))
