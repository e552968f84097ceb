"""Load real weights from a local Hugging Face checkpoint directory (`*.safetensors`, no network, no pickle).

Tensor names follow the Hugging Face layouts of the supported families: Mixtral
(`block_sparse_moe.experts.{e}.w1/w2/w3`), Qwen2/Qwen3-MoE, OLMoE and DeepSeek-V2/V3
(`mlp.experts.{e}.gate_proj/up_proj/down_proj`, shared experts, leading dense layers, MLA projections).
Only the first `num_layers` layers are read. q/k norms (Qwen3, OLMoE) are not applied by the executor's
kernels and are skipped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from executor.weights import LayerWeights, ModelWeights, check_weight_memory, require_executable, truncated
from sim.errors import SimInputError
from sim.specs import ModelSpec


class CheckpointError(SimInputError):
    """A checkpoint directory that lacks a tensor the model needs, or holds one of the wrong shape."""


class _Tensors:
    """Every tensor name in a directory's safetensors files, opened lazily."""

    def __init__(self, directory: Path):
        files = sorted(directory.glob("*.safetensors"))
        special = [f for f in files if not f.is_file()]  # a FIFO would block the reader forever
        if special:
            raise CheckpointError(f"{special[0]}: not a regular file")
        if not files:
            raise CheckpointError(f"{directory}: no *.safetensors files")
        self.where: dict[str, Path] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as fh:
                    for name in fh.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                        self.where[name] = path
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file "
                                      f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"checkpoint lacks tensor {name}")
        try:
            with safe_open(str(self.where[name]), framework="pt") as fh:
                raw = fh.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.where[name]}: cannot read tensor {name} "
                                  f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if not raw.is_floating_point() or raw.element_size() < 2:
            # integer, boolean or FP8 weights would be cast as if they were values (FP8 checkpoints also need their
            # scale tensors, which this loader does not apply)
            raise CheckpointError(f"tensor {name} is {str(raw.dtype).removeprefix('torch.')}: the executor loads "
                                  "floating-point weights of 16 bits or more only (dequantise the checkpoint first)")
        t = raw.to(dtype)
        if shape is not None and tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        return t


def load_checkpoint(spec: ModelSpec, directory: str | Path, num_layers: int | None = None,
                    dtype: torch.dtype = torch.bfloat16) -> ModelWeights:
    """Weights of the first `num_layers` layers (all by default) from a local checkpoint directory."""
    require_executable(spec)
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if spec.qkv_bias:  # the kernels have no q/k/v biases: a checkpoint's would be dropped, its outputs wrong
        raise CheckpointError(f"{spec.name}: its q/k/v projections have biases, which the executor does not apply "
                              "(random weights time it without them)")
    spec = truncated(spec, num_layers or spec.num_layers)
    check_weight_memory(spec, dtype)
    ts = _Tensors(directory)
    h, n = spec.hidden_size, spec.num_attention_heads
    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        if spec.attention == "mla":
            qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
            latent = spec.kv_lora_rank + spec.qk_rope_head_dim
            attn = {"wkv_a": ts.get(a + "kv_a_proj_with_mqa.weight", dtype, (latent, h)),
                    "kv_norm": ts.get(a + "kv_a_layernorm.weight", dtype, (spec.kv_lora_rank,)),
                    "wkv_b": ts.get(a + "kv_b_proj.weight", dtype,
                                    (n * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank)),
                    "wo": ts.get(a + "o_proj.weight", dtype, (h, n * spec.v_head_dim))}
            if spec.q_lora_rank:
                attn.update(wq_a=ts.get(a + "q_a_proj.weight", dtype, (spec.q_lora_rank, h)),
                            q_norm=ts.get(a + "q_a_layernorm.weight", dtype, (spec.q_lora_rank,)),
                            wq_b=ts.get(a + "q_b_proj.weight", dtype, (n * qk, spec.q_lora_rank)))
            else:
                attn["wq"] = ts.get(a + "q_proj.weight", dtype, (n * qk, h))
        else:
            d, kv = spec.head_dim, spec.num_kv_heads
            attn = {"wq": ts.get(a + "q_proj.weight", dtype, (n * d, h)),
                    "wk": ts.get(a + "k_proj.weight", dtype, (kv * d, h)),
                    "wv": ts.get(a + "v_proj.weight", dtype, (kv * d, h)),
                    "wo": ts.get(a + "o_proj.weight", dtype, (h, n * d))}
        lw = LayerWeights(attn=attn, attn_norm=ts.get(p + "input_layernorm.weight", dtype, (h,)),
                          ffn_norm=ts.get(p + "post_attention_layernorm.weight", dtype, (h,)))
        if spec.is_moe_layer(i):
            _moe(ts, spec, p, lw, dtype)
        else:
            f = spec.dense_intermediate_size
            lw.dense = {"w1": ts.get(p + "mlp.gate_proj.weight", dtype, (f, h)),
                        "w3": ts.get(p + "mlp.up_proj.weight", dtype, (f, h)),
                        "w2": ts.get(p + "mlp.down_proj.weight", dtype, (h, f))}
        layers.append(lw)
    embed = ts.get("model.embed_tokens.weight", dtype, (spec.vocab_size, h))
    lm_head = embed if spec.tie_word_embeddings or not ts.has("lm_head.weight") else ts.get(
        "lm_head.weight", dtype, (spec.vocab_size, h))
    return ModelWeights(spec, embed, lm_head, ts.get("model.norm.weight", dtype, (h,)), layers)


def _moe(ts: _Tensors, spec: ModelSpec, p: str, lw: LayerWeights, dtype: torch.dtype) -> None:
    h, f, e = spec.hidden_size, spec.expert_intermediate_size, spec.num_experts
    if ts.has(p + "block_sparse_moe.gate.weight"):  # Mixtral
        base, names = p + "block_sparse_moe.", ("w1", "w3", "w2")
    else:  # Qwen2/Qwen3-MoE, OLMoE, DeepSeek
        base, names = p + "mlp.", ("gate_proj", "up_proj", "down_proj")
    lw.router = ts.get(base + "gate.weight", dtype, (e, h))
    w1, w3, w2 = ([ts.get(f"{base}experts.{x}.{name}.weight", dtype, shape) for x in range(e)]
                  for name, shape in zip(names, ((f, h), (f, h), (h, f)), strict=True))
    lw.w1, lw.w3, lw.w2 = torch.stack(w1), torch.stack(w3), torch.stack(w2)
    fs = spec.shared_expert_intermediate_size
    if fs:
        shared = base + ("shared_expert." if ts.has(base + "shared_expert.gate_proj.weight") else "shared_experts.")
        lw.shared = {"w1": ts.get(shared + "gate_proj.weight", dtype, (fs, h)),
                     "w3": ts.get(shared + "up_proj.weight", dtype, (fs, h)),
                     "w2": ts.get(shared + "down_proj.weight", dtype, (h, fs))}
        if spec.shared_expert_gate:
            lw.shared["gate"] = ts.get(base + "shared_expert_gate.weight", dtype, (1, h))
