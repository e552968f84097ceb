"""Weights from a local Hugging Face checkpoint (safetensors) that the test writes itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from executor.checkpoint import CheckpointError, load_checkpoint
from executor.reference import reference_forward
from executor.weights import random_weights
from sim.specs import ModelSpec
from sim.workload import Workload
from traces import SynthConfig, generate_trace


def to_hf(mw, mixtral_names: bool) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face tensor names (Mixtral's, or the Qwen/DeepSeek family's)."""
    spec, out = mw.spec, {"model.embed_tokens.weight": mw.embed, "model.norm.weight": mw.final_norm,
                          "lm_head.weight": mw.lm_head}
    for i, lw in enumerate(mw.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"], out[p + "post_attention_layernorm.weight"] = lw.attn_norm, lw.ffn_norm
        a = lw.attn
        if spec.attention == "mla":
            out.update({p + "self_attn.kv_a_proj_with_mqa.weight": a["wkv_a"],
                        p + "self_attn.kv_a_layernorm.weight": a["kv_norm"],
                        p + "self_attn.kv_b_proj.weight": a["wkv_b"], p + "self_attn.o_proj.weight": a["wo"],
                        p + "self_attn.q_proj.weight": a["wq"]})
        else:
            out.update({p + f"self_attn.{k}_proj.weight": a[f"w{k}"] for k in "qkvo"})
        if lw.dense:
            out.update({p + "mlp.gate_proj.weight": lw.dense["w1"], p + "mlp.up_proj.weight": lw.dense["w3"],
                        p + "mlp.down_proj.weight": lw.dense["w2"]})
            continue
        base, names = (p + "block_sparse_moe.", ("w1", "w3", "w2")) if mixtral_names else (
            p + "mlp.", ("gate_proj", "up_proj", "down_proj"))
        out[base + "gate.weight"] = lw.router
        for e in range(spec.num_experts):
            for name, w in zip(names, (lw.w1, lw.w3, lw.w2), strict=True):
                out[f"{base}experts.{e}.{name}.weight"] = w[e]
        if lw.shared:
            out.update({base + "shared_experts.gate_proj.weight": lw.shared["w1"],
                        base + "shared_experts.up_proj.weight": lw.shared["w3"],
                        base + "shared_experts.down_proj.weight": lw.shared["w2"]})
    return {k: v.contiguous().clone() for k, v in out.items()}


SPECS = {
    "mixtral": ModelSpec(name="tiny", num_layers=2, hidden_size=32, vocab_size=50, num_attention_heads=4,
                         num_kv_heads=2, head_dim=8, num_experts=4, top_k=2, expert_intermediate_size=24),
    "deepseek": ModelSpec(name="tiny-mla", num_layers=3, hidden_size=32, vocab_size=50, num_attention_heads=2,
                          num_kv_heads=2, head_dim=12, num_experts=4, top_k=2, expert_intermediate_size=16,
                          attention="mla", kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                          shared_expert_intermediate_size=16, first_dense_layers=1, dense_intermediate_size=40),
}


@pytest.mark.parametrize("family", sorted(SPECS))
def test_round_trip_through_safetensors(tmp_path, family):
    spec = SPECS[family]
    mw = random_weights(spec, seed=4)
    tensors = to_hf(mw, family == "mixtral")
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[: len(names) // 2]}, str(tmp_path / "model-00001.safetensors"))
    save_file({k: tensors[k] for k in names[len(names) // 2:]}, str(tmp_path / "model-00002.safetensors"))
    loaded = load_checkpoint(spec, tmp_path)
    assert torch.equal(loaded.layers[-1].w2, mw.layers[-1].w2) and torch.equal(loaded.embed, mw.embed)
    prompts, gens = np.array([3, 4]), np.array([2, 2])
    trace = generate_trace(SynthConfig(spec.name, spec.num_moe_layers, 4, 2, "uniform", 0.0, 0), prompts, gens)
    a = reference_forward(mw, trace, Workload(prompts, gens))
    b = reference_forward(loaded, trace, Workload(prompts, gens))
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = load_checkpoint(spec, tmp_path, num_layers=spec.first_dense_layers + 1)
    assert len(first.layers) == spec.first_dense_layers + 1 and first.layers[-1].w1 is not None


def test_bad_checkpoints(tmp_path):
    spec = SPECS["mixtral"]
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(spec, tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(spec, tmp_path)
    tensors = to_hf(random_weights(spec), True)
    tensors.pop("model.layers.1.self_attn.q_proj.weight")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks tensor model.layers.1.self_attn.q_proj.weight"):
        load_checkpoint(spec, tmp_path)
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(spec, tmp_path, num_layers=1)


def test_execute_with_a_checkpoint_and_bad_layer_counts(capsys, tmp_path):
    import dataclasses
    import json

    import yaml

    from experiments.cli import main

    spec = SPECS["deepseek"]
    save_file(to_hf(random_weights(spec, seed=4), False), str(tmp_path / "model.safetensors"))
    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(dataclasses.asdict(spec)))
    argv = ["execute", "--model-file", str(model), "--policy", "cpu-only", "--batch", "2", "--prompt-len", "3",
            "--gen-len", "2", "--warmup", "0", "--json", "--checkpoint", str(tmp_path)]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["throughput_tok_s"] > 0
    assert main([*argv, "--layers", "1"]) == 2
    assert "first 1 layers are dense" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    # issue 11: a damaged safetensors file is one line, not a traceback
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:100])
    assert main([*argv[:-1], str(damaged)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable safetensors file" in err


def test_checkpoints_that_would_load_wrong_or_hang(tmp_path, monkeypatch):
    """A FIFO named like a shard blocked the reader forever; integer or FP8 tensors were cast as values; a model
    with q/k/v biases lost them silently; weights past the memory limit were allocated anyway."""
    import dataclasses
    import os

    from traces.limits import LIMIT_ENV, ResourceLimitError

    spec = SPECS["mixtral"]
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(spec, fifo)
    for dtype in (torch.int64, torch.float8_e4m3fn):
        folder = tmp_path / str(dtype).removeprefix("torch.")
        folder.mkdir()
        tensors = to_hf(random_weights(spec), True)
        tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].to(dtype)
        save_file(tensors, str(folder / "model.safetensors"))
        with pytest.raises(CheckpointError, match="floating-point weights of 16 bits or more only"):
            load_checkpoint(spec, folder)
    with pytest.raises(CheckpointError, match="q/k/v projections have biases"):
        load_checkpoint(dataclasses.replace(spec, qkv_bias=True), tmp_path / "int64")
    monkeypatch.setenv(LIMIT_ENV, "0.0000001")
    with pytest.raises(ResourceLimitError, match="the weights of tiny"):
        random_weights(spec)
    with pytest.raises(ResourceLimitError, match="the weights of tiny"):
        load_checkpoint(spec, tmp_path / "int64")
