"""Where FlexGen puts each weight tensor for a `--percent` weight split, and what a layer loads from DRAM.

FlexGen does not split tensors: `init_weight_list` (FlexLLMGen `flex_opt.py`, and `init_weight_list_moe` in the
Mixtral port's `flex_moe.py`) walks one layer object's tensors in order and puts each whole tensor on the device
whose cumulative percent range holds the tensor's midpoint (`get_choice` over [disk, cpu, gpu]). With no disk
share, a tensor is on the GPU when its midpoint lies at or above 100 - w_gpu percent of its layer object's bytes.
Every layer object (attention half, FFN half, input embedding, output embedding) is placed on its own, in both the
sep_layer and the whole-layer schedule (a whole layer's `init_weight` calls its halves'). So at the port's
7-14% no matrix of a Mixtral layer is on the GPU, and at 20% only OPT's attention output projection is.

Tensor lists follow the code that ran: the port's `SelfAttention` (pre-norm, q, k, v, o, post-norm) and
`MoEMLP` (gate, the experts' stacked w1/w3, their w2), FlexLLMGen's OPT halves (weights and biases apart, each
half's LayerNorm at its tail); a model FlexGen never ran (MLA, shared experts) gets its projections at the same
granularity. Norms and biases shift midpoints a little, enough to move a matrix at a split that lands on one
(o_proj of Mixtral at exactly 20%). Placement goes by bytes where FlexGen counts elements: the same but for
int8/int4 experts, which FlexGen never ran.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.specs import ModelSpec


def on_gpu(sizes: list[int], gpu_percent: float) -> list[bool]:
    """FlexGen's placement of one layer object's tensors (`sizes` in allocation order, no disk share): a tensor
    goes to the GPU when its midpoint's percent of the object's bytes is at least 100 - `gpu_percent`."""
    total = sum(sizes)
    if total <= 0:
        return [False] * len(sizes)
    cpu_share = 100.0 - gpu_percent
    out, before = [], 0
    for size in sizes:
        mid = (before + size / 2) / total * 100.0
        out.append(mid >= cpu_share)
        before += size
    return out


def attention_tensors(m: ModelSpec) -> list[int]:
    """Bytes of the attention half's tensors in allocation order. The Mixtral port's `SelfAttention` holds both
    of a layer's norms: [pre-norm, q, k, v, o, post-norm]; FlexLLMGen's OPT one (biased linears) its weights and
    biases apart, then its LayerNorm: [wq, bq, wk, bk, wv, bv, wo, bo, ln w, ln b]. MLA: its low-rank query and
    key-value paths as one tensor."""
    bpp, h = m.bytes_per_param, m.hidden_size
    if m.linear_bias:  # OPT: this half's LayerNorm (weight, bias) at its tail; the other one is the FFN half's
        q, kv = m.num_attention_heads * m.head_dim, m.num_kv_heads * m.head_dim
        o = m.num_attention_heads * m.head_dim
        params = [h * q, q, h * kv, kv, h * kv, kv, o * h, h, h, h]
        params[0] += m.qkv_params - (h * q + q + 2 * (h * kv + kv))  # any q/k norm rides with q
        params[6] += m.o_proj_params - (o * h + h)
        return [p * bpp for p in params]
    if m.attention == "gqa":
        q, kv = h * m.num_attention_heads * m.head_dim, h * m.num_kv_heads * m.head_dim
        projections = [q + m.qkv_params - q - 2 * kv, kv, kv]  # biases and q/k norms ride with q
    else:
        projections = [m.qkv_params]
    norm = m.norm_params_per_layer // 2
    return [norm * bpp] + [p * bpp for p in projections] + [m.o_proj_params * bpp,
                                                           (m.norm_params_per_layer - norm) * bpp]


def ffn_tensors(m: ModelSpec, layer: int) -> list[int]:
    """Bytes of the FFN half's tensors in allocation order: the Mixtral port's `MoEMLP` [router, every expert's
    w1/w3 stacked, every expert's w2] (shared experts after them), a dense layer's [up/gate, down], FlexLLMGen's
    OPT `MLP` [fc1 w, fc1 b, fc2 w, fc2 b, ln w, ln b]. They sum with `attention_tensors` to
    `ModelSpec.layer_bytes`."""
    bpp, h = m.bytes_per_param, m.hidden_size
    if m.linear_bias:  # OPT's one FFN, weights and biases apart, then its final LayerNorm
        f = m.expert_intermediate_size if m.is_moe_layer(layer) else m.dense_intermediate_size
        tensors = [p * bpp for p in (f * h, f, h * f, h, h, h)]
    elif m.is_moe_layer(layer):
        experts = m.num_experts * m.expert_bytes
        down = experts // m.ffn_matrices
        tensors = [m.router_params * bpp, experts - down, down]
        if m.shared_expert_params:
            tensors.append(m.shared_expert_params * bpp)
    else:
        dense = m.dense_ffn_params * bpp
        down = dense // m.ffn_matrices
        tensors = [dense - down, down]
    tensors[-1] += m.layer_bytes(layer) - sum(attention_tensors(m)) - sum(tensors)  # precision rounding, if any
    return tensors


def input_embedding_tensors(m: ModelSpec) -> list[int]:
    """FlexGen's `InputEmbed`: token embedding, then learned positions where the model has them."""
    bpp = m.bytes_per_param
    tensors = [m.vocab_size * m.hidden_size * bpp]
    if m.learned_position_embeddings:
        tensors.append(m.learned_position_embeddings * m.hidden_size * bpp)
    return tensors


def output_embedding_tensors(m: ModelSpec) -> list[int]:
    """FlexGen's `OutputEmbed`: the final norm, then its own copy of the output projection (allocated apart
    from the input embedding even where the model ties them)."""
    bpp = m.bytes_per_param
    return [(2 if m.linear_bias else 1) * m.hidden_size * bpp, m.vocab_size * m.hidden_size * bpp]


@dataclass(frozen=True)
class WeightPlacement:
    """Bytes FlexGen keeps on the GPU and loads from DRAM, per layer half and for the embeddings."""

    attention_load: list[int]  # per decoder layer: the attention half's DRAM tensors
    ffn_load: list[int]  # per decoder layer: the FFN half's
    gpu_bytes: int  # every tensor placed on the GPU (decoder layers and embeddings)
    cpu_bytes: int  # every tensor placed in DRAM
    input_embedding_load: int  # the input embedding's DRAM tensors, loaded once per step
    output_embedding_load: int  # the output embedding's, loaded once per step


def place_weights(m: ModelSpec, gpu_percent: float) -> WeightPlacement:
    """FlexGen's placement of the whole model for a weight split of `gpu_percent` on the GPU, the rest in DRAM."""

    def dram(sizes: list[int]) -> int:
        return sum(s for s, g in zip(sizes, on_gpu(sizes, gpu_percent), strict=True) if not g)

    # Layers differ only in being dense or MoE: place one of each kind and repeat it (a search places thousands).
    first_of_kind: dict[bool, int] = {}
    for layer in range(m.num_layers):
        first_of_kind.setdefault(m.is_moe_layer(layer), layer)
    ffn_of = {kind: ffn_tensors(m, layer) for kind, layer in first_of_kind.items()}
    ffn_dram = {kind: dram(sizes) for kind, sizes in ffn_of.items()}
    attention = attention_tensors(m)
    attn_dram = dram(attention)
    attn = [attn_dram] * m.num_layers
    ffn = [ffn_dram[m.is_moe_layer(layer)] for layer in range(m.num_layers)]
    inp_sizes, out_sizes = input_embedding_tensors(m), output_embedding_tensors(m)
    inp, out = dram(inp_sizes), dram(out_sizes)
    total = (sum(attention) * m.num_layers + sum(sum(ffn_of[m.is_moe_layer(layer)]) for layer in range(m.num_layers))
             + sum(inp_sizes) + sum(out_sizes))
    cpu = sum(attn) + sum(ffn) + inp + out
    return WeightPlacement(attn, ffn, total - cpu, cpu, inp, out)
