"""Where FlexGen puts each weight tensor for a `--percent` weight split, and what a layer loads from DRAM.

FlexGen does not split tensors: `init_weight_list` (FlexLLMGen `flex_opt.py`, and `init_weight_list_moe` in the
Mixtral port's `flex_moe.py`) walks one layer object's tensors in order and puts each whole tensor on the device
whose cumulative percent range holds the tensor's midpoint (`get_choice` over [disk, cpu, gpu]): below the disk
share (100 - w_gpu - w_cpu) on disk, below 100 - w_gpu in DRAM, else on the GPU.
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

from dataclasses import dataclass, field

from sim.specs import ModelSpec


def tiers(sizes: list[int], gpu_percent: float, cpu_percent: float | None = None) -> list[str]:
    """FlexGen's placement of one layer object's tensors (`sizes` in allocation order): each goes where its
    midpoint's percent of the object's bytes falls in the cumulative [disk, cpu, gpu] ranges (`get_choice`: below
    the disk share, disk; below disk + cpu, cpu; else gpu). `cpu_percent` None: what the GPU leaves (no disk)."""
    total = sum(sizes)
    if total <= 0:
        return ["cpu"] * len(sizes)
    if cpu_percent is None:
        cpu_percent = 100.0 - gpu_percent
    disk_share = 100.0 - gpu_percent - cpu_percent
    cpu_share = 100.0 - gpu_percent
    out, before = [], 0
    for size in sizes:
        mid = (before + size / 2) / total * 100.0
        out.append("disk" if mid < disk_share else ("cpu" if mid < cpu_share else "gpu"))
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
    return [m.final_norm_params * bpp, m.output_projection_params * bpp]


# FlexGen's 4-bit group-wise compression (`--compress-weight`, `--compress-cache`; compression.py,
# CompressionConfig(num_bits=4, group_size=64)): per fp16 element half a byte of packed data plus, per group of 64,
# two fp16 numbers (scale, min): 0.5 + 4/64 = 0.5625 bytes. Only tensors of two or more dimensions are compressed
# (`init_weight_list`: `len(shape) < 2` stays fp16, pinned).
COMPRESSED_BYTES_PER_ELEMENT = 0.5625


def matrix_flags(m: ModelSpec, part: str, layer: int = 0) -> list[bool]:
    """Which tensors of a layer object (`part`: attention, ffn, input, output; in the order of the size lists
    above) are matrices, which FlexGen compresses (vectors, biases and norms, it does not)."""
    if part == "attention":
        if m.linear_bias:  # OPT: [wq, bq, wk, bk, wv, bv, wo, bo, ln w, ln b]
            return [True, False, True, False, True, False, True, False, False, False]
        inner = [True, True, True] if m.attention == "gqa" else [True]
        return [False, *inner, True, False]
    if part == "ffn":
        if m.linear_bias:  # OPT: [fc1 w, fc1 b, fc2 w, fc2 b, ln w, ln b]
            return [True, False, True, False, False, False]
        return [True] * len(ffn_tensors(m, layer))  # router, experts' matrices, shared expert; a dense FFN's two
    if part == "input":
        return [True] * len(input_embedding_tensors(m))  # token (and position) tables
    if part == "output":
        return [False, True]  # the final norm, the output projection
    raise ValueError(f"unknown layer object part {part!r}")


def compressed(sizes: list[int], flags: list[bool], m: ModelSpec) -> list[int]:
    """The bytes each tensor takes under FlexGen's weight compression (vectors stay as they are)."""
    scale = COMPRESSED_BYTES_PER_ELEMENT / m.bytes_per_param
    return [int(size * scale) if is_matrix else size for size, is_matrix in zip(sizes, flags, strict=True)]


@dataclass(frozen=True)
class WeightPlacement:
    """Bytes FlexGen keeps on the GPU, loads from DRAM and reads from disk, per layer half and for the
    embeddings. A load from disk goes through a copy thread's pinned relay to the GPU: read, then copied up."""

    attention_load: list[int]  # per decoder layer: the attention half's DRAM tensors
    ffn_load: list[int]  # per decoder layer: the FFN half's
    gpu_bytes: int  # every tensor placed on the GPU (decoder layers and embeddings)
    cpu_bytes: int  # every tensor placed in DRAM
    input_embedding_load: int  # the input embedding's DRAM tensors, loaded once per step
    output_embedding_load: int  # the output embedding's, loaded once per step
    attention_disk: list[int] = field(default_factory=list)  # per decoder layer: the attention half's disk tensors
    ffn_disk: list[int] = field(default_factory=list)  # per decoder layer: the FFN half's
    disk_bytes: int = 0  # every tensor placed on disk
    input_embedding_disk: int = 0
    output_embedding_disk: int = 0


def place_weights(m: ModelSpec, gpu_percent: float, cpu_percent: float | None = None,
                  compress: bool = False) -> WeightPlacement:
    """FlexGen's placement of the whole model for a weight split of `gpu_percent` on the GPU and `cpu_percent` in
    DRAM (None: the rest), the rest on disk; with `compress`, the bytes FlexGen's 4-bit matrices take (placed by
    their element counts, as FlexGen places them)."""

    def share(sizes: list[int], flags: list[bool], tier: str) -> int:
        held = compressed(sizes, flags, m) if compress else sizes
        return sum(h for h, t in zip(held, tiers(sizes, gpu_percent, cpu_percent), strict=True) if t == tier)

    # Layers differ only in being dense or MoE: place one of each kind and repeat it (a search places thousands).
    first_of_kind: dict[bool, int] = {}
    for layer in range(m.num_layers):
        first_of_kind.setdefault(m.is_moe_layer(layer), layer)
    ffn_of = {kind: ffn_tensors(m, layer) for kind, layer in first_of_kind.items()}
    ffn_flags = {kind: matrix_flags(m, "ffn", layer) for kind, layer in first_of_kind.items()}
    attention, attention_flags = attention_tensors(m), matrix_flags(m, "attention")
    inp_sizes, out_sizes = input_embedding_tensors(m), output_embedding_tensors(m)
    inp_flags, out_flags = matrix_flags(m, "input"), matrix_flags(m, "output")
    kinds = [m.is_moe_layer(layer) for layer in range(m.num_layers)]
    placed = {}
    for tier in ("cpu", "disk"):
        ffn_tier = {kind: share(sizes, ffn_flags[kind], tier) for kind, sizes in ffn_of.items()}
        placed[tier] = ([share(attention, attention_flags, tier)] * m.num_layers, [ffn_tier[k] for k in kinds],
                        share(inp_sizes, inp_flags, tier), share(out_sizes, out_flags, tier))

    def size(sizes: list[int], flags: list[bool]) -> int:
        return sum(compressed(sizes, flags, m)) if compress else sum(sizes)

    total = (size(attention, attention_flags) * m.num_layers + sum(size(ffn_of[k], ffn_flags[k]) for k in kinds)
             + size(inp_sizes, inp_flags) + size(out_sizes, out_flags))
    attn, ffn, inp, out = placed["cpu"]
    attn_d, ffn_d, inp_d, out_d = placed["disk"]
    cpu = sum(attn) + sum(ffn) + inp + out
    disk = sum(attn_d) + sum(ffn_d) + inp_d + out_d
    return WeightPlacement(attn, ffn, total - cpu - disk, cpu, inp, out, attn_d, ffn_d, disk, inp_d, out_d)
