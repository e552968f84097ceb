"""Weights of a real MoE decoder stack in torch, built from a `ModelSpec` (seeded random by default).

Layout (per layer, bf16 by default): attention projections (GQA: wq, wk, wv, wo; MLA: wq or wq_a/wq_b,
wkv_a, kv_norm, wkv_b, wo), two RMSNorm weights, and either a router plus stacked expert matrices
(w1 = gate, w3 = up: [E, f, h]; w2 = down: [E, h, f]) and an optional shared expert, or a dense FFN.
Calibration runs use a few real-size layers (`num_layers`), since one Mixtral layer holds 2.8 GB of experts.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from sim.errors import SimInputError
from sim.specs import ModelSpec
from traces.limits import check_memory

INIT_STD = 0.02
# Elements one seeded generator draws. Each block of a tensor has its own seed, derived from (seed, tensor, block),
# so blocks are drawn on torch's threads at once (a generator draws on one core: about 130 M values/s on the dev
# VM, 16 s for the two 2-layer DeepSeek-V2-Lite weight sets a quick calibration drew) and the weights do not
# depend on the thread count.
DRAW_BLOCK = 1 << 22


@dataclass
class LayerWeights:
    attn: dict[str, torch.Tensor]
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    router: torch.Tensor | None = None
    w1: torch.Tensor | None = None
    w3: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    # The routed experts as the CPU runs them (executor.cpu_experts.CpuExperts), packed on first use; a copy of
    # the weights on another device starts without one (packed bf16 doubles the memory of every CPU-run expert).
    cpu_experts: object | None = field(default=None, repr=False, compare=False)
    # MLA's up-projection split for absorbed decode (executor.kernels.absorbed_up): its key half [heads, nope,
    # rank] and value half transposed [heads, rank, v], each contiguous, made on first use on wkv_b's device.
    absorbed_up: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)


DERIVED = frozenset({"cpu_experts", "absorbed_up"})  # made from the weights on first use; not copied by `to`


@dataclass
class ModelWeights:
    spec: ModelSpec
    embed: torch.Tensor
    lm_head: torch.Tensor
    final_norm: torch.Tensor
    layers: list[LayerWeights]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def to(self, device: str | torch.device) -> ModelWeights:
        """A copy on `device` (tensors moved one by one; no intermediate host copies)."""
        def move(t):
            if isinstance(t, torch.Tensor):
                return t.to(device)
            if isinstance(t, dict):
                return {k: move(v) for k, v in t.items()}
            return t

        layers = []
        for layer in self.layers:
            moved = LayerWeights(**{f.name: move(getattr(layer, f.name)) for f in dataclasses.fields(LayerWeights)
                                    if f.name not in DERIVED})
            if moved.w1 is not None and moved.w1 is layer.w1:  # same tensors (already there): same packed experts
                moved.cpu_experts = layer.cpu_experts
            layers.append(moved)
        lm_head = move(self.lm_head) if self.lm_head is not self.embed else None
        embed = move(self.embed)
        return ModelWeights(self.spec, embed, lm_head if lm_head is not None else embed, move(self.final_norm),
                            layers)


def require_executable(spec: ModelSpec) -> None:
    """The executor runs gated (SwiGLU) experts without linear biases; dense OPT-style models are simulated only."""
    if not spec.ffn_gated or spec.linear_bias or spec.learned_position_embeddings:
        raise SimInputError(f"executor: model {spec.name} has a non-gated FFN, linear biases or learned positions "
                            "(OPT-style), which the executor does not implement; simulate it instead")


def truncated(spec: ModelSpec, num_layers: int) -> ModelSpec:
    """The first `num_layers` layers of a model, its leading dense layers included (so at least one MoE layer
    must remain: DeepSeek-V2-Lite needs 2)."""
    low = spec.first_dense_layers + 1
    if not low <= num_layers <= spec.num_layers:
        raise SimInputError(f"{spec.name}: num_layers must be in [{low}, {spec.num_layers}] (its first "
                         f"{spec.first_dense_layers} layers are dense), got {num_layers}")
    return dataclasses.replace(spec, num_layers=num_layers,
                               name=f"{spec.name}[:{num_layers}]" if num_layers < spec.num_layers else spec.name)


def first_layers(weights: ModelWeights, spec: ModelSpec, num_layers: int) -> ModelWeights | None:
    """The weights of `spec`'s first `num_layers` layers, shared with `weights` when those are bf16 CPU weights of
    `spec` truncated at or past them (None otherwise: the caller draws its own)."""
    held = weights.spec.num_layers
    if weights.dtype != torch.bfloat16 or weights.embed.device.type != "cpu" or \
            not num_layers <= held <= spec.num_layers or weights.spec != truncated(spec, held):
        return None
    return dataclasses.replace(weights, spec=truncated(spec, num_layers), layers=weights.layers[:num_layers])


def check_weight_memory(spec: ModelSpec, dtype: torch.dtype) -> None:
    """Refuse, before allocating, weights beyond the memory limit (`--max-gib`): DeepSeek-V3 at 4 layers is 22 GB."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    check_memory(spec.total_params * itemsize, f"the weights of {spec.name} ({spec.num_layers} layers, "
                 f"{spec.total_params / 1e9:.1f} B parameters)")


def random_weights(spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                   device: str = "cpu") -> ModelWeights:
    """Seeded N(0, 0.02) weights (norms at 1) for every tensor the spec implies, drawn in blocks on torch's
    threads (`DRAW_BLOCK`): the same seed gives the same weights whatever the thread count."""
    require_executable(spec)
    check_weight_memory(spec, dtype)
    with ThreadPoolExecutor(max(torch.get_num_threads(), 1), thread_name_prefix="weights") as pool:
        return _random_weights(spec, seed, dtype, device, pool)


def _block_seed(seed: int, tensor: int, block: int) -> int:
    """The seed of one block of one tensor, mixed so that nearby (seed, tensor, block) give unrelated streams."""
    return int(np.random.SeedSequence([seed & (2**64 - 1), tensor, block]).generate_state(1, np.uint64)[0])


def _normal(shape: tuple[int, ...], seed: int, tensor: int, dtype: torch.dtype, pool: ThreadPoolExecutor
            ) -> torch.Tensor:
    """An N(0, INIT_STD) tensor drawn in the target dtype (no fp32 copy), block by block on `pool`."""
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)

    def draw(block: int) -> None:
        gen = torch.Generator(device="cpu").manual_seed(_block_seed(seed, tensor, block))
        flat[block * DRAW_BLOCK:(block + 1) * DRAW_BLOCK].normal_(0.0, INIT_STD, generator=gen)

    list(pool.map(draw, range(-(-flat.numel() // DRAW_BLOCK))))
    return out


def _random_weights(spec: ModelSpec, seed: int, dtype: torch.dtype, device: str, pool: ThreadPoolExecutor
                    ) -> ModelWeights:
    drawn = 0  # tensors drawn so far: each has its own seeds

    def rnd(*shape: int) -> torch.Tensor:
        nonlocal drawn
        drawn += 1
        return _normal(shape, seed, drawn, dtype, pool).to(device)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    h, n = spec.hidden_size, spec.num_attention_heads
    layers = []
    for layer in range(spec.num_layers):
        if spec.attention == "mla":
            qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
            attn = {"wkv_a": rnd(spec.kv_lora_rank + spec.qk_rope_head_dim, h), "kv_norm": ones(spec.kv_lora_rank),
                    "wkv_b": rnd(n * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank),
                    "wo": rnd(h, n * spec.v_head_dim)}
            if spec.q_lora_rank:
                attn.update(wq_a=rnd(spec.q_lora_rank, h), q_norm=ones(spec.q_lora_rank),
                            wq_b=rnd(n * qk, spec.q_lora_rank))
            else:
                attn["wq"] = rnd(n * qk, h)
        else:
            d, kv = spec.head_dim, spec.num_kv_heads
            attn = {"wq": rnd(n * d, h), "wk": rnd(kv * d, h), "wv": rnd(kv * d, h), "wo": rnd(h, n * d)}
        lw = LayerWeights(attn=attn, attn_norm=ones(h), ffn_norm=ones(h))
        if spec.is_moe_layer(layer):
            e, f = spec.num_experts, spec.expert_intermediate_size
            lw.router, lw.w1, lw.w3, lw.w2 = rnd(e, h), rnd(e, f, h), rnd(e, f, h), rnd(e, h, f)
            if spec.shared_expert_intermediate_size:
                fs = spec.shared_expert_intermediate_size
                lw.shared = {"w1": rnd(fs, h), "w3": rnd(fs, h), "w2": rnd(h, fs)}
                if spec.shared_expert_gate:
                    lw.shared["gate"] = rnd(1, h)
        else:
            f = spec.dense_intermediate_size
            lw.dense = {"w1": rnd(f, h), "w3": rnd(f, h), "w2": rnd(h, f)}
        layers.append(lw)
    embed = rnd(spec.vocab_size, h)
    lm_head = embed if spec.tie_word_embeddings else rnd(spec.vocab_size, h)
    return ModelWeights(spec, embed, lm_head, ones(h), layers)
