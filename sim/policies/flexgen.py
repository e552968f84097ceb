"""`flexgen`: FlexGen (Sheng et al., ICML'23) with its MoE port's rules: zig-zag block schedule, LP search.

The batch of B requests is a block of `num_gpu_batches` GPU batches of `gpu_batch_size` (bls = gbs x ngb). Column by
column (zig-zag): for each layer, its weights are loaded once per block (the next layer's during the current layer's
first GPU batch: a double buffer), then every GPU batch runs the whole layer before the next starts, with a
synchronisation after every (layer, GPU batch) as FlexGen's overlap loop has. Weights are placed by FlexGen's
--percent rule, whole tensors by their midpoints (flexgen_weights.py; the DRAM ones copied for every layer visit),
and a layer's experts are all loaded whatever the routing. The KV cache lives in DRAM when attention runs on the CPU
(`cpu_attention=on`, FlexGen's --cpu-cache-compute: q/k/v go down, the output comes back), else on the GPU when it
fits, else in DRAM with each GPU batch's cache loaded and its new entries stored; FlexGen allocates that DRAM cache
unpinned, so its stores are staged copies at the link's pageable rate and its loads FlexGen's relay (a staging on
the loop's thread, then a pinned DMA). Activations between layers live on the GPU or in DRAM (act_on_cpu). Prompts
are padded to the longest: the padded positions add QKV, attention, O-projection, gate and shared-expert work, and
a dense FFN's, one-expert form (OPT) included (GEMMs over every position); routed experts see the real tokens
only, which the trace routes. Prefill always runs on the GPU.

Search: FlexGen's cost model, T = l x T_pre + (n - 1) x l x T_gen + n x T_emb (T_emb: the embeddings' load where
they stay in DRAM) with
T_pre = max(T_ctog + T_dtoc, T_gtoc + T_ctod, T_comp) and T_gen = T_ctog + max(T_gtoc, T_comp)
(load, store and compute of one layer for the whole block, with roofline compute per GPU batch), over
gpu_batch_size (powers of two), weight placement wg (5% steps), KV placement (25% steps; under CPU attention a
GQA model's cache stays whole, since FlexGen's split-cache path cannot run GQA) and activation placement, under
its memory constraints (home + working set <= 0.8 of each memory). The best few are then simulated.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import numpy as np

from sim.cost import Work
from sim.errors import SimInputError, UnsupportedModel
from sim.plan import PAGEABLE_PAYLOADS, OpKind, Payload, Phase, Plan, PlanBuilder, Stream
from sim.policies.analytic import Analytic, Candidate, SearchSpace
from sim.policies.base import OptionsBase, PlanContext, Policy, published_split, require_fits
from sim.policies.flexgen_weights import (
    COMPRESSED_BYTES_PER_ELEMENT,
    attention_tensors,
    ffn_tensors,
    input_embedding_tensors,
    matrix_flags,
    output_embedding_tensors,
    place_weights,
)
from sim.policies.layers import (
    At,
    BatchSlice,
    Deps,
    LayerEmitter,
    activation_workspace_bytes,
    as_deps,
    split_by_count,
)

GPU, CPU, H2D, H2D_ACT, D2H = Stream.GPU, Stream.CPU, Stream.H2D, Stream.H2D_ACT, Stream.D2H
DISK_READ, DISK_WRITE = "disk_read", "disk_write"  # the system's disk tier (sim/topology.py)
MEMORY_FRACTION = 0.8  # FlexGen cost_model.py: alpha_g = alpha_c = 0.8 ("relaxation ratio")


# FlexGen allocates the DRAM share of its KV cache unpinned (`init_cache_one_gpu_batch`: "disable pin_memory
# due to high memory overhead", in FlexLLMGen and its Mixtral port alike), so every cache copy between GPU and
# DRAM is staged through a pinned buffer.
KV_HOME = Payload.PAGEABLE_KV
# Before a GPU batch's CPU attention, FlexGen copies that batch's cached K and V from their fp16 home into a CPU
# workspace allocated in fp32 (`init_attention_compute_workspace`: "Only CPU requires this fp32 workspace";
# `load_cache` path 1 for an all-DRAM cache, path 2 for a split one: `general_copy(k_buf, indices, k_home,
# indices)`), in FlexLLMGen's `flex_opt.py` / `pytorch_backend.py` and the Mixtral port's `flex_moe.py` /
# `moe_pytorch_backend.py` alike. That copy is the cast: `mha_gen`'s later `k.float()` finds fp32 and copies nothing.
WORKSPACE_BYTES_FP32 = 4  # bytes per cached element in FlexGen's CPU attention workspace
WORKSPACE_BYTES_FP16 = 2  # `fp32_cpu_attention=off`: a what-if fp16 workspace


def cpu_attention_kv_factor(model, fp32: bool) -> int:
    """DRAM bytes FlexGen's CPU decode attention moves per byte of fp16 KV cache it attends over, counted from
    the code that ran, per cached element of 2 B, with w the workspace's bytes per element (4; 2 with
    `fp32_cpu_attention=off`):

    - the workspace copy (`load_cache`): read 2 B from the cache's home, write w;
    - FlexLLMGen's OPT `mha_gen` (one KV head per query head): its bmm reads the workspace (w), since
      `permute(...).reshape(...)` to the same shape is a view and `.float()` on fp32 is a no-op: 2 + 2w B, a
      factor 1 + w (5 in fp32);
    - the Mixtral port's `mha_gen` (FLG-MoE `flexgen/moe_pytorch_backend.py`) first repeats each of the g = heads /
      KV heads groups (`unsqueeze(2).expand(...).reshape(src_s, b * n_head, head_dim)`: read w, write g w), and
      its bmm reads the copies (g w): 2 + 2w + 2gw B, a factor 1 + w + gw (21 for Mixtral's g = 4 in fp32);
    - a cache split between GPU and DRAM runs `_mixed_device_attention` on the CPU segment of the
      workspace, which repeats nothing: 1 + w. That path only runs without grouped-query attention (it pairs
      b x n_head queries with b x n_kv_head cached heads and raises otherwise), so FlexGen's search never splits a
      GQA model's cache under CPU attention; given as a what-if, a split GQA cache is priced as if its heads were
      repeated like the all-DRAM path's: 1 + w + g w.
    MLA caches a latent that is not expanded this way: the MHA factor."""
    w = WORKSPACE_BYTES_FP32 if fp32 else WORKSPACE_BYTES_FP16
    g = kv_heads_repeated(model)
    if g <= 1:
        return 1 + w
    return 1 + w + g * w


def workspace_cast_factor(fp32: bool) -> int:
    """The share of `cpu_attention_kv_factor` that is the copy into the workspace (read 2 B, write w, per 2 B
    cached): for a cache share on disk FlexGen's copy threads make that copy while reading it (`load_cache`
    hands the disk segment to `general_copy`, so it runs beside the previous iteration's compute), leaving the
    attention op the reads after it."""
    w = WORKSPACE_BYTES_FP32 if fp32 else WORKSPACE_BYTES_FP16
    return 1 + w // 2


def kv_heads_repeated(model) -> int:
    """Query heads per cached KV head that FlexGen's CPU attention repeats (1 for MHA and MLA)."""
    return model.num_attention_heads // model.num_kv_heads if model.attention == "gqa" else 1
# FlexGen's prefill attention is eager (flex_opt `mha`, and the Mixtral port's `MixtralAttention_Prefill`): it
# computes every one of the s x s scores per head (the causal mask is applied after the product) and moves the
# score tensor through GPU memory: written by the first bmm, read and written by the mask (`torch.where`), read
# and written by the softmax, read by the second bmm; 6 passes of 2 bytes in FlexLLMGen's fp16 code.
EAGER_SCORE_BYTES = 12
# FlexGen's `TorchCompressedDevice.decompress` on the GPU, per fp16 element of the tensor: unpack the high nibbles
# (`bitwise_right_shift`: read 0.5 B, write 0.5 B; the strided assignment into the fp16 buffer: read 0.5 B, write
# 1 B per element), the low nibbles alike (`bitwise_and`), then `div_(scale)` and `add_(mn)` over the fp16 buffer
# (read 2 B and write 2 B each): 13 bytes moved per element, before the consumer reads the fp16 copy.
DECOMPRESS_BYTES_PER_ELEMENT = 13
# ... and `compress` of new cache entries on the GPU (after each attention): min and max over each group (read 2 B
# each), `data - mn` (read 2, write 2), `mul_`, `clamp_`, `round_` (read 2, write 2 each), `.to(uint8)` (read 2,
# write 1), the packing shift and `bitwise_or` (read 1.5, write 1 in all): 51 half-bytes per element.
COMPRESS_HALF_BYTES_PER_ELEMENT = 51


@dataclass(frozen=True)
class FlexGenOptions(OptionsBase):
    """gpu_batch_size: requests per GPU batch (-1 = search); num_gpu_batches: GPU batches per block, FlexGen's
    --num-gpu-batches (0 = ceil(B / gpu_batch_size); given, it must equal that, so the block is the batch);
    weights_gpu_percent, kv_gpu_percent, act_gpu_percent: FlexGen's --percent for weights (whole tensors placed by
    their midpoints, flexgen_weights.py), the KV cache and the hidden states kept in VRAM, the rest in DRAM (-1 =
    search); weights_cpu_percent, kv_cpu_percent: FlexGen's --percent shares in DRAM, the rest of weights and cache
    going to the system's disk (-1: what the GPU leaves, spilled to disk by the search only where DRAM cannot hold
    it); cpu_attention: on | off (FlexGen's --cpu-cache-compute: decode attention over the DRAM and disk parts of
    the cache runs on the CPU); fp32_cpu_attention: on | off (its CPU path copies K/V into an fp32 workspace first;
    off: a what-if fp16 one); pin_weight: on | off (FlexGen's --pin-weight: off keeps the DRAM weights pageable, so
    each weight load is staged through a bounce buffer); sep_layer: on | off (FlexGen's --sep-layer: attention and
    FFN are separate layers of its schedule, so each half's weights are loaded while the other half computes and the
    double buffer holds a layer object and its neighbour, not two layers; flex_opt's default is on, and the MoE
    port's HELM driver builds its policy with it on); eager_attention: on | off (on: prefill attention as FlexGen
    computes it, every s x s score with the causal mask applied afterwards and the score tensor moved through GPU
    memory six times; off: a fused causal kernel); memory_fraction: share of each memory the search may fill
    (FlexGen's relaxation ratio, 0.8); rescore: candidates simulated; compress_weight, compress_cache: on | off
    (FlexGen's --compress-weight / --compress-cache: 4-bit group-wise matrices and cache, 0.5625 bytes an element
    where they are kept and moved, decompressed on the GPU every time they are used). A configuration with every
    knob given needs only to fit in memory."""

    policy_name = "flexgen"
    gpu_batch_size: int = -1
    num_gpu_batches: int = 0
    weights_gpu_percent: float = -1.0
    kv_gpu_percent: float = -1.0
    act_gpu_percent: float = -1.0
    weights_cpu_percent: float = -1.0
    kv_cpu_percent: float = -1.0
    cpu_attention: str = "on"
    fp32_cpu_attention: str = "on"
    pin_weight: str = "on"
    sep_layer: str = "on"
    eager_attention: str = "on"
    memory_fraction: float = MEMORY_FRACTION
    rescore: int = 3
    compress_weight: str = "off"
    compress_cache: str = "off"

    def __post_init__(self) -> None:
        self.at_least("gpu_batch_size", -1)
        self.at_least("num_gpu_batches", 0)
        for name in ("weights_gpu_percent", "kv_gpu_percent", "act_gpu_percent", "weights_cpu_percent",
                     "kv_cpu_percent"):
            value = getattr(self, name)
            if value != -1.0 and not 0.0 <= value <= 100.0:
                raise SimInputError(f"policy flexgen: {name} must be in [0, 100] (or -1 to search), got {value}")
        for what in ("weights", "kv"):
            gpu, cpu = getattr(self, f"{what}_gpu_percent"), getattr(self, f"{what}_cpu_percent")
            if cpu >= 0 and gpu >= 0 and gpu + cpu > 100.0 + 1e-9:
                raise SimInputError(f"policy flexgen: {what}_gpu_percent {gpu} + {what}_cpu_percent {cpu} exceed "
                                    "100 (the rest goes to disk)")
        self.choice("cpu_attention", ("on", "off"))
        self.choice("fp32_cpu_attention", ("on", "off"))
        self.choice("pin_weight", ("on", "off"))
        self.choice("sep_layer", ("on", "off"))
        self.choice("eager_attention", ("on", "off"))
        self.choice("compress_weight", ("on", "off"))
        self.choice("compress_cache", ("on", "off"))
        if self.compress_cache == "on" and self.cpu_attention == "on":
            raise SimInputError("policy flexgen: compress_cache on with cpu_attention on (CPU attention over a 4-bit "
                                "cache, decompressed into the CPU workspace) is not modelled; give cpu_attention off")
        self.fraction("memory_fraction")
        self.at_least("rescore", 1)

    @property
    def searched(self) -> bool:
        return -1 in (self.gpu_batch_size, self.weights_gpu_percent, self.kv_gpu_percent, self.act_gpu_percent)


class _Layout:
    """Where FlexGen keeps things for one option set, and what that costs in memory."""

    def __init__(self, ctx: PlanContext, o: FlexGenOptions):
        m, wl = ctx.model, ctx.workload
        self.m, self.wl = m, wl
        bpp = m.bytes_per_param
        self.gbs = min(max(o.gpu_batch_size, 1), wl.batch)
        self.ngb = -(-wl.batch // self.gbs)
        self.cg, self.hg = o.kv_gpu_percent / 100.0, o.act_gpu_percent / 100.0
        # the cache's DRAM share (what the GPU leaves unless kv_cpu_percent says); the rest lives on disk
        self.cc = 1.0 - self.cg if o.kv_cpu_percent < 0 else o.kv_cpu_percent / 100.0
        self.cd = 1.0 - self.cg - self.cc
        if self.cd < 1e-9:  # shares given to sum to 100: nothing on disk (not a rounding's worth)
            self.cd = 0.0
        # FlexGen places whole tensors by their midpoints (flexgen_weights.py): what each half of a layer loads
        # from DRAM per visit. Embeddings left in DRAM load once per step; the plan loads them with the first
        # layer's first part and the last layer's last part (FlexGen loads each in the iteration before its own,
        # one GPU batch's compute earlier or later).
        self.compress_weight, self.compress_cache = o.compress_weight == "on", o.compress_cache == "on"
        if m.stored_at_bits:
            raise UnsupportedModel("policy flexgen: it places and moves weights tensor by tensor in the model's dtype "
                                   "(its own 4-bit format is compress_weight); a model with weight_bits_per_param or "
                                   "expert_bits_per_param is not supported")
        pl = place_weights(m, o.weights_gpu_percent, None if o.weights_cpu_percent < 0 else o.weights_cpu_percent,
                           compress=self.compress_weight)
        # bytes the cache takes per fp16 byte (where it is kept and moved), and the GPU traffic of decompressing
        # each layer object's matrices before every GPU batch uses them (`decompress` in FlexGen's mha/mlp/embeds)
        self.kv_scale = COMPRESSED_BYTES_PER_ELEMENT / m.bytes_per_param if self.compress_cache else 1.0

        if self.compress_weight and m.expert_precision != "native":
            raise SimInputError(f"policy flexgen: compress_weight on with {m.expert_precision} experts (FlexGen "
                                "compresses fp16 weights; give expert precision native, or compress_weight off)")

        def unpack(sizes: list[int], flags: list[bool]) -> int:  # (cheap: a handful of tensors per object)
            if not self.compress_weight:
                return 0
            elements = sum(size for size, is_matrix in zip(sizes, flags, strict=True) if is_matrix)
            return DECOMPRESS_BYTES_PER_ELEMENT * (elements // m.bytes_per_param)

        ffn_kind: dict[bool, int] = {}  # dense and MoE layers differ; every layer of a kind decompresses alike
        if self.compress_weight:
            for layer in range(m.num_layers):
                kind = m.is_moe_layer(layer)
                if kind not in ffn_kind:
                    ffn_kind[kind] = unpack(ffn_tensors(m, layer), matrix_flags(m, "ffn", layer))
        self.decompress = {"attention": unpack(attention_tensors(m), matrix_flags(m, "attention")),
                           "input": unpack(input_embedding_tensors(m), matrix_flags(m, "input")),
                           "output": unpack(output_embedding_tensors(m), matrix_flags(m, "output")),
                           "ffn": {layer: ffn_kind.get(m.is_moe_layer(layer), 0) for layer in range(m.num_layers)}}
        halves = [[a, f] for a, f in zip(pl.attention_load, pl.ffn_load, strict=True)]
        on_disk = [[a, f] for a, f in zip(pl.attention_disk, pl.ffn_disk, strict=True)]
        # The weight loads in schedule order: FlexGen's layer objects, the embeddings being layers of their own.
        self.sep_layer = o.sep_layer == "on"
        units = [b for (a, f), (x, y) in zip(halves, on_disk, strict=True)
                 for b in ([a + x, f + y] if self.sep_layer else [a + f + x + y])]
        sequence = [pl.input_embedding_load + pl.input_embedding_disk, *units,
                    pl.output_embedding_load + pl.output_embedding_disk]
        # The object computing and the next one loading share the buffer (the output embedding's successor is the
        # next step's input embedding).
        double_buffer = max(a + b for a, b in zip(sequence, sequence[1:] + sequence[:1], strict=True))
        self.layer_loads = [a + f for a, f in halves]  # a decoder layer's own loads (the cost estimate's)
        self.layer_disk = [a + f for a, f in on_disk]  # and its reads from disk (copied up after them)
        self.embedding_load = pl.input_embedding_load + pl.output_embedding_load  # once per step
        self.embedding_disk = pl.input_embedding_disk + pl.output_embedding_disk
        if halves:
            halves[0][0] += pl.input_embedding_load
            halves[-1][1] += pl.output_embedding_load
            on_disk[0][0] += pl.input_embedding_disk
            on_disk[-1][1] += pl.output_embedding_disk
        self.parts = [[a, f] if self.sep_layer else [a + f] for a, f in halves]
        self.parts_disk = [[a, f] if self.sep_layer else [a + f] for a, f in on_disk]
        self.prompt = int(wl.prompt_lens.max())  # padded
        self.kv_bytes = _kv_held(self, wl.batch * (self.prompt + wl.max_gen_len) * m.kv_bytes_per_token)
        self.cpu_attention = o.cpu_attention == "on"
        self.weight_payload = Payload.EXPERT_WEIGHTS if o.pin_weight == "on" else Payload.PAGEABLE_WEIGHTS
        # A cache split between GPU and DRAM takes FlexGen's mixed-device path over the workspace's CPU segment,
        # which repeats no heads: the same factor for MHA, a what-if for GQA (cpu_attention_kv_factor).
        self.kv_factor = cpu_attention_kv_factor(m, o.fp32_cpu_attention == "on")
        self.kv_factor_disk = self.kv_factor - workspace_cast_factor(o.fp32_cpu_attention == "on")
        self.eager_attention = o.eager_attention == "on"
        hidden = wl.batch * self.prompt * m.hidden_size * bpp
        kv_gpu = int(self.kv_bytes * self.cg)
        kv_disk = int(self.kv_bytes * self.cd)
        # Not counted apart: the buffer GPU decode attention reads a DRAM share of the cache into (two GPU batches'
        # of one layer with the prefetch): with it, two of FlexLLMGen's published OPT-30B runs would not fit by
        # 0.1 GiB, so the other terms' estimates (workspace, CUDA context) already cover it.
        self.gpu = {"resident_weights": pl.gpu_bytes,
                    "weight_double_buffer": double_buffer,
                    "kv_cache": kv_gpu, "hidden_states": int(hidden * self.hg),
                    "workspace": activation_workspace_bytes(ctx, self.gbs * self.prompt, self.gbs)}
        self.cpu = {"weights": pl.cpu_bytes,
                    "kv_cache": self.kv_bytes - kv_gpu - kv_disk, "hidden_states": hidden - int(hidden * self.hg)}
        self.disk = {"weights": pl.disk_bytes, "kv_cache": kv_disk} if pl.disk_bytes or kv_disk else {}


def _kv_held(lay: _Layout, fp16_bytes: float) -> int:
    """Bytes the cache takes where it is kept and moved, for `fp16_bytes` of fp16 entries (4-bit: 0.5625 an
    element)."""
    return int(fp16_bytes * lay.kv_scale) if lay.compress_cache else int(fp16_bytes)


def flexgen_cost(ctx: PlanContext, lay: _Layout) -> dict[str, float]:
    """FlexGen's cost model for one option set: per-layer prefill and decode terms and the total (seconds)."""
    m, wl, w = ctx.model, ctx.workload, ctx.work
    a = Analytic(ctx, FlexGenPolicy.expert_kernels)
    gbs, ngb, s = lay.gbs, lay.ngb, lay.prompt
    n = wl.max_gen_len
    cg, hg = lay.cg, lay.hg
    loaded = max(lay.layer_loads, default=0)
    from_disk = max(lay.layer_disk, default=0)  # read by copy threads, then copied up with the DRAM share
    loaded += from_disk
    embeddings = a.copy(H2D, lay.embedding_load, lay.weight_payload) if lay.embedding_load else 0.0  # per step
    hidden_p = wl.batch * s * m.hidden_size * m.bytes_per_param
    hidden_g = wl.batch * m.hidden_size * m.bytes_per_param
    kv_new_p = _kv_held(lay, wl.batch * s * m.kv_bytes_per_token_layer)
    # Prefill (always on the GPU)
    tok = gbs * s
    # each GPU batch decompresses a layer's 4-bit matrices before using them
    unpack = lay.decompress["attention"] + max(lay.decompress["ffn"].values(), default=0)
    unpack_s = a.copy(GPU, unpack, Payload.DECOMPRESS)

    def pack_s(tokens: int) -> float:  # compressing a GPU batch's new cache entries
        half = COMPRESS_HALF_BYTES_PER_ELEMENT * (w.kv_bytes(tokens) // m.bytes_per_param)
        return a.copy(GPU, half // 2, Payload.DECOMPRESS) if lay.compress_cache else 0.0
    comp_p = ngb * (a.t(OpKind.QKV, GPU, w.qkv(tok)) + a.t(OpKind.O_PROJ, GPU, w.o_proj(tok))
                    + a.t(OpKind.ATTENTION, GPU, prefill_attention_work(ctx, lay, gbs))
                    + a.t(OpKind.ROUTER, GPU, w.router(tok)) + _experts_s(ctx, a, tok) + unpack_s + pack_s(tok))
    ctog_p = a.copy(H2D, loaded, lay.weight_payload) + a.copy(H2D_ACT, int(hidden_p * (1 - hg)))
    gtoc_p = (a.copy(D2H, int(kv_new_p * lay.cc), KV_HOME) + a.copy(D2H, int(kv_new_p * lay.cd), Payload.KV)
              + a.copy(D2H, int(hidden_p * (1 - hg))))
    # FlexGen's terms with a disk: T_pre = max(ctog + dtoc, gtoc + ctod, comp), T_gen = ctog + max(gtoc, dtoc,
    # ctod, comp) (its cost_model.py)
    dtoc_p = a.copy(DISK_READ, from_disk)  # (the embeddings' disk share: once a step, in `embeddings` below)
    ctod_p = a.copy(DISK_WRITE, int(kv_new_p * lay.cd))
    t_pre = max(ctog_p + dtoc_p, gtoc_p + ctod_p, comp_p)
    # Decode, at the mean context length, per GPU batch
    kv = int(gbs * (s + n / 2))
    kv_gpu, kv_cpu = int(kv * cg), kv - int(kv * cg)
    kv_disk = int(kv * lay.cd)  # the share of the non-GPU part read from disk first
    attn_gpu = a.t(OpKind.ATTENTION, GPU, w.attention(gbs, kv_gpu, kv_gpu)) if kv_gpu else 0.0
    kv_io = 0.0
    if lay.cpu_attention:
        cpu_work = _cpu_attention_work(ctx, lay, gbs, kv_cpu, kv_disk)
        attn_cpu = (a.t(OpKind.ATTENTION, CPU, cpu_work) + a.copy(D2H, w.qkv_out_bytes(gbs))
                    + a.copy(H2D_ACT, w.attn_out_bytes(gbs))) if kv_cpu else 0.0
        attn_s = max(attn_gpu, attn_cpu)
    else:
        attn_s = a.t(OpKind.ATTENTION, GPU, w.attention(gbs, kv, kv))
        kv_io = (a.copy(H2D_ACT, _kv_held(lay, (kv_cpu - kv_disk) * m.kv_bytes_per_token_layer), KV_HOME)
                 + a.copy(H2D_ACT, _kv_held(lay, kv_disk * m.kv_bytes_per_token_layer), Payload.KV)
                 + a.copy(D2H, _kv_held(lay, int(w.kv_bytes(gbs) * lay.cc)), KV_HOME)
                 + a.copy(D2H, _kv_held(lay, int(w.kv_bytes(gbs) * lay.cd))))
        if lay.compress_cache:  # the whole cache decompressed before each GPU batch's attention
            kv_io += a.copy(GPU, DECOMPRESS_BYTES_PER_ELEMENT * kv * m.kv_bytes_per_token_layer // m.bytes_per_param,
                            Payload.DECOMPRESS)
    comp_g = ngb * (a.t(OpKind.QKV, GPU, w.qkv(gbs)) + attn_s + a.t(OpKind.O_PROJ, GPU, w.o_proj(gbs))
                    + a.t(OpKind.ROUTER, GPU, w.router(gbs)) + _experts_s(ctx, a, gbs) + kv_io + unpack_s + pack_s(gbs))
    ctog_g = a.copy(H2D, loaded, lay.weight_payload) + a.copy(H2D_ACT, int(hidden_g * (1 - hg)))
    gtoc_g = a.copy(D2H, int(hidden_g * (1 - hg)))
    dtoc_g = a.copy(DISK_READ, from_disk) + ngb * a.copy(DISK_READ, _kv_held(lay, kv_disk * m.kv_bytes_per_token_layer))
    ctod_g = ngb * a.copy(DISK_WRITE, _kv_held(lay, int(w.kv_bytes(gbs) * lay.cd)))
    t_gen = ctog_g + max(gtoc_g, dtoc_g, ctod_g, comp_g)
    if lay.embedding_disk:
        embeddings += a.copy(DISK_READ, lay.embedding_disk) + a.copy(H2D, lay.embedding_disk)
    # every GPU batch decompresses both embeddings each step
    embeddings += ngb * a.copy(GPU, lay.decompress["input"] + lay.decompress["output"], Payload.DECOMPRESS)
    total = m.num_layers * t_pre + (n - 1) * m.num_layers * t_gen + n * embeddings
    return {"t_pre": t_pre, "t_gen": t_gen, "total": total}


def prefill_attention_work(ctx: PlanContext, lay: _Layout, requests: int) -> Work:
    """Work of one GPU batch's prefill attention over its padded prompts: a fused causal kernel, or FlexGen's
    eager one (every score computed, the score tensor moved through GPU memory)."""
    s = lay.prompt
    tokens = requests * s
    if not lay.eager_attention:
        return ctx.work.attention(tokens, requests * s * (s + 1) // 2, tokens, prefill=True)
    base = ctx.work.attention(tokens, requests * s * s, tokens, prefill=True)
    scores = requests * ctx.model.num_attention_heads * s * s
    return base._replace(bytes=base.bytes + EAGER_SCORE_BYTES * scores)


def _cpu_attention_work(ctx: PlanContext, lay: _Layout, tokens: int, kv: int, kv_disk: int = 0) -> Work:
    """Work of FlexGen's CPU attention over `kv` cached entries (its fp32 workspace copy and repeated heads
    multiply the KV bytes: `cpu_attention_kv_factor`); of them, `kv_disk` came from disk, copied into the workspace
    by the copy threads already (`workspace_cast_factor` less)."""
    base = ctx.work.attention(tokens, kv, kv)
    per = ctx.model.kv_bytes_per_token_layer
    extra = (lay.kv_factor - 1) * (kv - kv_disk) * per + (lay.kv_factor_disk - 1) * kv_disk * per
    return base._replace(bytes=base.bytes + int(extra))


def _experts_s(ctx: PlanContext, a: Analytic, tokens: int) -> float:
    """GPU time of one GPU batch's FFN: every expert its expected share of tokens (all are loaded)."""
    m, w = ctx.model, ctx.work
    per = tokens * m.top_k / m.num_experts
    t = m.num_experts * a.t(OpKind.EXPERT, GPU, w.expert(max(int(round(per)), 1)))
    if m.shared_expert_intermediate_size:
        t += a.t(OpKind.SHARED_EXPERT, GPU, w.shared_expert(tokens))
    return t


def _disk_holds(ctx: PlanContext, lay: _Layout, share: float = 1.0) -> bool:
    """Whether the system has a disk and `share` of it holds the layout's disk share (the search's relaxation, as
    FlexGen's LP relaxes its NVMe too)."""
    return ctx.system.disk is not None and sum(lay.disk.values()) <= share * ctx.system.disk.capacity_bytes


def _spill_to_disk(ctx: PlanContext, o: FlexGenOptions, cpu_cap: float) -> tuple[FlexGenOptions, _Layout] | None:
    """Where DRAM cannot hold what the GPU leaves, the search moves weights to the system's disk (5% steps), then
    the cache (25% steps), keeping as much as fits in DRAM; None without a disk, or when even that does not fit.
    Only for shares the options leave to the search (FlexGen's LP places all three tiers at once)."""
    if ctx.system.disk is None:
        return None
    weight_steps = ([o.weights_cpu_percent] if o.weights_cpu_percent >= 0
                    else [5.0 * k for k in range(int((100.0 - o.weights_gpu_percent) / 5.0), -1, -1)])
    kv_steps = ([o.kv_cpu_percent] if o.kv_cpu_percent >= 0
                else [25.0 * k for k in range(int((100.0 - o.kv_gpu_percent) / 25.0), -1, -1)])
    for kc in kv_steps:
        for wc in weight_steps:
            opts = replace(o, weights_cpu_percent=wc, kv_cpu_percent=kc)
            lay = _Layout(ctx, opts)
            if sum(lay.cpu.values()) <= cpu_cap:
                return (opts, lay) if _disk_holds(ctx, lay, o.memory_fraction) else None
    return None


def attention_family(o: FlexGenOptions) -> str:
    """Where a candidate's decode attention runs: FlexGen's cost model prices CPU attention serially with the
    load (`T_gen = T_ctog + max(...)`) while the run overlaps them, so its estimates of the three placements sit
    at different distances from the simulation (CPU attention 41% over it on Mixtral, RTX 6000 Ada, 256 x
    512/32); the re-scoring simulates the best of each placement before near-copies of the favourite."""
    if o.kv_gpu_percent >= 100.0:
        return "gpu"  # the whole cache in VRAM
    return "cpu" if o.cpu_attention == "on" else "gpu-streamed"  # DRAM cache: read in place, or moved per batch


class FlexGenPolicy(Policy):
    name = "flexgen"
    label = "FlexGen"
    color = "#7f8c8d"
    summary = "FlexGen: zig-zag block schedule, percentage placement, all experts loaded per layer, LP search"
    Options = FlexGenOptions
    # the Mixtral port's block_sparse_moe calls a copy of vLLM's fused_moe (lynnliu030/FlexGen
    # flexgen/moe_pytorch_backend.py)
    expert_kernels = "fused"
    example_options = ({}, {"gpu_batch_size": "4", "weights_gpu_percent": "30", "cpu_attention": "off",
                            "act_gpu_percent": "0", "kv_gpu_percent": "50"},
                       {"gpu_batch_size": "3", "weights_gpu_percent": "0", "cpu_attention": "on",
                        "act_gpu_percent": "100", "kv_gpu_percent": "25"})

    def search_space(self, ctx: PlanContext) -> SearchSpace:
        o: FlexGenOptions = self.options
        return SearchSpace(self._candidates(ctx), lambda c, opts: self._plan(c, opts), searched=o.searched,
                           rescore=o.rescore,
                           explain_empty=None if o.searched else lambda: self._require_fits(ctx, _Layout(ctx, o)),
                           family=attention_family)

    def _require_fits(self, ctx: PlanContext, lay: _Layout) -> None:
        require_fits("GPU", ctx.system.gpu.name, self.name, lay.gpu, ctx.system.gpu_usable_bytes)
        require_fits("DRAM", ctx.system.name, self.name, lay.cpu, ctx.system.dram_usable_bytes)
        if lay.disk:
            disk = ctx.system.disk
            if disk is None:
                raise SimInputError(f"policy {self.name}: {sum(lay.disk.values()) / 2**30:.1f} GiB of weights or KV "
                                    f"cache go to disk (weights or kv cpu + gpu percent < 100), but system "
                                    f"{ctx.system.name} has no disk")
            require_fits("disk", disk.name, self.name, lay.disk, disk.capacity_bytes)

    def _candidates(self, ctx: PlanContext) -> list[Candidate]:
        o: FlexGenOptions = self.options
        batch = ctx.workload.batch
        if o.num_gpu_batches:
            o = replace(o, gpu_batch_size=published_split(self.name, "gpu_batch_size", "num_gpu_batches",
                                                          o.gpu_batch_size, o.num_gpu_batches, batch))
        if o.gpu_batch_size > 0:
            sizes = [min(o.gpu_batch_size, batch)]
        elif o.gpu_batch_size == 0:
            sizes = [batch]
        else:  # FlexGen's search: 1, 2, 4, 8, ... (its cost_model.solve doubles the GPU batch)
            sizes = sorted({min(2**k, batch) for k in range(0, 16)})

        def grid(value: float, step: float) -> list[float]:
            return [value] if value >= 0 else [step * k for k in range(int(100 / step) + 1)]

        gpu_cap, cpu_cap = ctx.system.gpu_usable_bytes, ctx.system.dram_usable_bytes
        disk_share = 1.0
        if o.searched:  # FlexGen's search relaxes each memory; a forced configuration needs only to fit
            gpu_cap = min(gpu_cap, o.memory_fraction * ctx.system.gpu.hbm_bytes)
            cpu_cap = min(cpu_cap, o.memory_fraction * ctx.system.dram_bytes)
            disk_share = o.memory_fraction
        kv_grid = grid(o.kv_gpu_percent, 25.0)
        if o.kv_cpu_percent >= 0:  # a DRAM share given: the GPU may take at most what it leaves
            kv_grid = [cg for cg in kv_grid if cg <= 100.0 - o.kv_cpu_percent]
        weight_grid = grid(o.weights_gpu_percent, 5.0)
        if o.weights_cpu_percent >= 0:
            weight_grid = [wg for wg in weight_grid if wg <= 100.0 - o.weights_cpu_percent]
        if o.kv_gpu_percent < 0 and o.cpu_attention == "on" and kv_heads_repeated(ctx.model) > 1:
            # FlexGen's mixed-device attention pairs b x n_head queries with b x n_kv_head cached heads and raises
            # for grouped-query attention: the search keeps the cache whole on one side.
            kv_grid = [cg for cg in kv_grid if cg in (0.0, 100.0)]
        out = []
        for gbs, hg, cg in itertools.product(sizes, grid(o.act_gpu_percent, 100.0), kv_grid):
            for wg in sorted(weight_grid, reverse=True):
                opts = replace(o, gpu_batch_size=gbs, weights_gpu_percent=wg, kv_gpu_percent=cg, act_gpu_percent=hg)
                lay = _Layout(ctx, opts)
                if sum(lay.cpu.values()) > cpu_cap:
                    spilled = _spill_to_disk(ctx, opts, cpu_cap) if o.searched else None
                    if spilled is None:
                        break  # less on the GPU only moves more to the CPU
                    opts, lay = spilled
                if sum(lay.gpu.values()) > gpu_cap or (lay.disk and not _disk_holds(ctx, lay, disk_share)):
                    continue
                cost = flexgen_cost(ctx, lay)
                out.append(Candidate(opts, cost["total"], cost))
                break  # the most weights that fit: loading less never slows a step down
        return out

    def _plan(self, ctx: PlanContext, o: FlexGenOptions) -> Plan:
        m, wl = ctx.model, ctx.workload
        lay = _Layout(ctx, o)
        self._require_fits(ctx, lay)
        groups = split_by_count(np.arange(wl.batch), lay.gbs)
        emit = _ZigZag(ctx, ctx.builder(), lay)
        emit.phase(_padded_prefill(ctx, groups, lay.prompt), Phase.PREFILL, 0)
        for step in ctx.steps():
            slices = _padded_decode(ctx, step, groups, lay.prompt)
            if slices:
                emit.b.settle()  # earlier steps' ops are not read back
                emit.phase(slices, Phase.DECODE, step)
        knobs = {**asdict(o), "num_gpu_batches": lay.ngb}
        static = {"gpu": lay.gpu, "cpu": lay.cpu, **({"disk": lay.disk} if lay.disk else {})}
        return Plan(self.name, knobs, m, ctx.system, wl, emit.b.result(), static,
                    {"prefill": groups, "decode": groups}, decode_scale=ctx.decode_scale,
                    expert_kernels=self.expert_kernels)


def _padded_prefill(ctx: PlanContext, groups: list[np.ndarray], prompt: int) -> list[BatchSlice]:
    tr = ctx.trace
    out = []
    for mb, reqs in enumerate(groups):
        n = int(reqs.size)
        counts = tr.prefill_counts(reqs)
        out.append(BatchSlice(Phase.PREFILL, 0, mb, reqs, n * prompt, n * prompt * (prompt + 1) // 2, n * prompt,
                              counts))
    return out


def _padded_decode(ctx: PlanContext, step: int, groups: list[np.ndarray], prompt: int) -> list[BatchSlice]:
    tr, wl = ctx.trace, ctx.workload
    out = []
    for mb, reqs in enumerate(groups):
        active = reqs[wl.gen_lens[reqs] > step]
        if active.size:
            kv = int(active.size) * (prompt + step)
            out.append(BatchSlice(Phase.DECODE, step, mb, active, int(active.size), kv, kv,
                                  tr.expert_counts(tr.decode_rows(step, active))))
    return out


class _Unit(NamedTuple):
    """One layer of FlexGen's loop: the input embedding, a decoder layer's attention and/or FFN (halves with
    sep_layer), or the output layer; `load` is the bytes of its weights copied from DRAM per visit and `disk` those
    read from disk (the embedding units carry 0: their tensors load with the first decoder unit and the last, see
    `_Layout`)."""

    layer: int
    attention: bool = False
    ffn: bool = False
    load: int = 0
    disk: int = 0


class _ZigZag(LayerEmitter):
    """Emits FlexGen's block schedule as its overlap loop runs it (`generation_loop_overlap_multi_batch`): for
    each layer j of its loop and each GPU batch k, one iteration issues the next layer's weight load (only at
    k = 0: a layer's `load_weight` copies for the first GPU batch alone), the next position's cache and hidden
    loads, the previous position's hidden and cache stores and batch k's compute, then synchronises (`sync()`:
    `torch.cuda.synchronize`). So a weight load overlaps only the first GPU batch's compute, and nothing of one
    iteration overlaps the next."""

    def __init__(self, ctx: PlanContext, builder: PlanBuilder, lay: _Layout):
        super().__init__(ctx, builder)
        self.lay = lay
        m = ctx.model
        units = [_Unit(-1)]
        for layer, (parts, disk) in enumerate(zip(lay.parts, lay.parts_disk, strict=True)):
            if lay.sep_layer:
                units += [_Unit(layer, attention=True, load=parts[0], disk=disk[0]),
                          _Unit(layer, ffn=True, load=parts[1], disk=disk[1])]
            else:
                units.append(_Unit(layer, attention=True, ffn=True, load=parts[0], disk=disk[0]))
        self.units = units + [_Unit(m.num_layers)]
        self.barrier: tuple[int, ...] = ()  # the last op per stream of the iteration before

    def phase(self, slices: list[BatchSlice], phase: Phase, step: int) -> None:
        units, n = self.units, len(slices)
        positions = [(u, k) for u in range(len(units)) for k in range(n)]
        out: list[Deps] = [-1] * n  # each GPU batch's last compute op
        kv_stores: list[tuple[At, int, int, bool, int]] = []  # the previous position's, one iteration on
        held: tuple[_Unit, BatchSlice] | None = None  # the position whose hidden states go down next
        single = n == 1  # FlexGen's single-batch loop: this layer's hidden in, compute, out
        for idx, (u, k) in enumerate(positions):
            unit, s, bar = units[u], slices[k], self.barrier
            nxt = positions[idx + 1] if idx + 1 < len(positions) else None
            first = len(self.ops)
            # The loop's thread issues the next layer's weight load, then the next position's cache load; a load
            # from pageable memory first stages it on that thread (`general_copy`: `pin_memory()`), so everything
            # the thread issues after it waits for the staging, the DMAs themselves running on their own streams.
            staged: list[int] = []
            later: list[Callable[[], int]] = []  # cache DMAs: queued behind the hidden copies on their link here
            if k == 0 and u + 1 < len(units) and units[u + 1].load:
                staged.append(self._load(H2D, At(phase, step, units[u + 1].layer), units[u + 1].load,
                                         self.lay.weight_payload, bar, later))
            if k == 0 and u + 1 < len(units) and units[u + 1].disk:  # a copy thread's read, then its relay up
                self._from_disk(H2D, At(phase, step, units[u + 1].layer), units[u + 1].disk, Payload.EXPERT_WEIGHTS,
                                bar, later)
            if nxt is not None:
                staged.append(self._kv_prefetch(phase, step, units[nxt[0]], slices[nxt[1]],
                                                bar + tuple(op for op in staged if op >= 0), later))
            staged = [op for op in staged if op >= 0]
            # Hidden-state copies run on the default CUDA stream in program order with the compute: the previous
            # position's store, then the next position's load, then this batch's compute. The cache copies run on
            # their own CUDA streams beside them; emitted after the (small) hidden copies that share their link's
            # queue here, they do not hold the compute up.
            chain = bar + as_deps(out[k]) + tuple(staged)
            if single:
                chain += (self._hidden(H2D_ACT, phase, step, unit, s, chain),)
            else:
                if held is not None:
                    chain += (self._hidden(D2H, phase, step, *held, chain),)
                if nxt is not None:
                    chain += (self._hidden(H2D_ACT, phase, step, units[nxt[0]], slices[nxt[1]], chain),)
            for dma in later:
                dma()
            for at, nbytes, disk, from_gpu, tokens in kv_stores:  # issued by the loop's thread, after its staging
                if nbytes:
                    self.xfer(D2H, at, nbytes, KV_HOME, bar + tuple(staged), tokens)
                if disk:  # a copy thread: down through its pinned relay (from the GPU), then into the disk's file
                    down = self.xfer(D2H, at, disk, Payload.KV, bar + tuple(staged), tokens) if from_gpu else -1
                    self.xfer(DISK_WRITE, at, disk, Payload.KV, bar + tuple(staged) + (down,), tokens)
            kv_stores = []
            out[k] = self._compute(phase, step, unit, s, chain, kv_stores)
            held = (unit, s)
            if single:  # this position's output goes down before the loop synchronises
                store = self._hidden(D2H, phase, step, unit, s, as_deps(out[k]))
                out[k] = store if store >= 0 else out[k]
                held = None
            last: dict[str, int] = {}
            for op in self.ops[first:]:
                last[op.stream] = op.id
            self.barrier = tuple(last.values())

    def _hidden(self, stream: str, phase: Phase, step: int, unit: _Unit, s: BatchSlice,
                deps: tuple[int, ...]) -> int:
        """The DRAM share of a unit's input coming up (`h2d_act`: not for the embedding, whose input is token
        ids) or of its output going down (`d2h`: not for the output layer); -1 when there is none."""
        lay = self.lay
        if lay.hg >= 1 or (stream == H2D_ACT and unit.layer < 0) or (stream == D2H and unit.layer >= self.m.num_layers):
            return -1
        return self.xfer(stream, At(phase, step, unit.layer, s.mb), int(self.w.hidden_bytes(s.tokens) * (1 - lay.hg)),
                         Payload.ACTIVATIONS, deps, s.tokens)

    def _kv_prefetch(self, phase: Phase, step: int, unit: _Unit, s: BatchSlice, bar: tuple[int, ...],
                     later: list[Callable[[], int]]) -> int:
        """The next position's decode cache: for GPU attention, its DRAM share (on its own copy stream, its DMA
        queued in `later`) and its disk share (a copy thread's read and relay up); for CPU attention, its disk share
        read into the CPU workspace. Returns the DRAM share's staging op on the loop's thread (-1: none)."""
        lay = self.lay
        if not (unit.attention and phase is Phase.DECODE):
            return -1
        at = At(phase, step, unit.layer, s.mb)
        kv_disk = int(round(s.kv_read * lay.cd))
        per_token = self.m.kv_bytes_per_token_layer
        if lay.cpu_attention:
            if kv_disk:
                self.xfer(DISK_READ, at, _kv_held(lay, kv_disk * per_token), Payload.KV, bar, s.tokens)
            return -1
        kv_cpu = s.kv_read - int(round(s.kv_read * lay.cg)) - kv_disk
        stage = -1
        if kv_cpu:  # on the cache's own CUDA stream, ahead of the copy threads' relay of the disk share
            stage = self._load(H2D_ACT, at, _kv_held(lay, kv_cpu * per_token), KV_HOME, bar, later, s.tokens)
        if kv_disk:
            self._from_disk(H2D_ACT, at, _kv_held(lay, kv_disk * per_token), Payload.KV, bar, later, s.tokens)
        return stage

    def _from_disk(self, stream: str, at: At, nbytes: int, payload: Payload, deps: tuple[int, ...],
                   later: list[Callable[[], int]], tokens: int = 0) -> None:
        """A load from disk as FlexGen's copy threads run it: read into the thread's pinned relay buffer
        (`disk_read`), then a pinned DMA up; the loop's thread does not wait (its iteration's `sync` does). A DMA on
        the link the hidden states share goes to `later`, as `_load`'s."""
        read = self.xfer(DISK_READ, at, nbytes, payload, deps, tokens)

        def dma() -> int:
            return self.xfer(stream, at, nbytes, payload, (read,), tokens)

        if stream == H2D_ACT:
            later.append(dma)
        else:
            dma()

    def _load(self, stream: str, at: At, nbytes: int, payload: Payload, deps: tuple[int, ...],
              later: list[Callable[[], int]], tokens: int = 0) -> int:
        """A host-to-device load. From pinned memory, one DMA; from pageable memory, FlexGen's relay: a staging op
        on the loop's thread (the CPU stream: `pin_memory()`), then the pinned DMA after it. A DMA on the link
        the hidden states share (`h2d_act`) goes to `later`, to be emitted behind them; returns the staging op
        (-1 for a pinned load), which the thread's later work waits for."""
        stage = -1
        if payload in PAGEABLE_PAYLOADS:
            stage = self.xfer(CPU, at, nbytes, Payload.PAGEABLE_STAGING, deps, tokens)
            deps = (stage,)
            payload = Payload.KV if payload is Payload.PAGEABLE_KV else Payload.EXPERT_WEIGHTS

        def dma() -> int:
            return self.xfer(stream, at, nbytes, payload, deps, tokens)

        if stream == H2D_ACT:
            later.append(dma)
        else:
            dma()
        return stage

    def _compute(self, phase: Phase, step: int, unit: _Unit, s: BatchSlice, deps: tuple[int, ...],
                 kv_stores: list[tuple[At, int, int, bool, int]]) -> int:
        """One GPU batch through one unit after `deps`; appends the cache store the next iteration issues."""
        lay, w, m = self.lay, self.w, self.m
        at = At(phase, step, unit.layer, s.mb)
        if unit.layer < 0:
            return self.embed(phase, step, s.mb, s.tokens, self._unpack(at, lay.decompress["input"], deps, s))
        if unit.layer >= m.num_layers:
            return self.lm_head(phase, step, s.mb, int(s.requests.size),
                                self._unpack(at, lay.decompress["output"], deps, s))
        if unit.attention:
            q = self.op(OpKind.QKV, GPU, at, s.tokens, self._unpack(at, lay.decompress["attention"], deps, s))
            a = self._attention(phase, at, s, q)
            deps = (self.op(OpKind.O_PROJ, GPU, at, s.tokens, as_deps(a)),)
            new = w.kv_bytes(s.tokens)
            if lay.compress_cache:  # the new entries, compressed on the GPU before they are stored
                deps = self._unpack(at, COMPRESS_HALF_BYTES_PER_ELEMENT * (new // m.bytes_per_param) // 2, deps, s)
            on_gpu = phase is Phase.PREFILL or not lay.cpu_attention  # where the new entries are
            if lay.cg < 1:  # new entries' DRAM share (from the CPU: written in place) and disk share
                kv_stores.append((at, _kv_held(lay, int(new * lay.cc)) if on_gpu else 0,
                                  _kv_held(lay, int(new * lay.cd)), on_gpu, s.tokens))
        if unit.ffn:
            deps = self._unpack(at, lay.decompress["ffn"][unit.layer], deps, s)
        if not unit.ffn:
            return deps[0]
        return self.ffn(at, s.tokens, s.layer_counts(self.ctx, unit.layer), deps)

    def _unpack(self, at: At, nbytes: int, deps: tuple[int, ...], s: BatchSlice) -> tuple[int, ...]:
        """FlexGen's decompression of 4-bit tensors on the GPU before they are used (memory traffic on the compute
        stream); `deps` unchanged when nothing is compressed."""
        if not nbytes:
            return deps
        return (self.xfer(GPU, at, nbytes, Payload.DECOMPRESS, deps, s.tokens),)

    def _attention(self, phase: Phase, at: At, s: BatchSlice, q: int) -> Deps:
        """Attention of one GPU batch over its cache, split between VRAM (cg) and DRAM (1 - cg); prefill and GPU
        decode attention run on the GPU (the DRAM share of the cache was loaded an iteration earlier)."""
        lay, w = self.lay, self.w
        if phase is Phase.PREFILL:
            return self._op(OpKind.ATTENTION, GPU, at.phase, at.step, at.layer, at.mb, s.tokens,
                            prefill_attention_work(self.ctx, lay, int(s.requests.size)), (q,), kv_tokens=s.kv_read)
        if not lay.cpu_attention:
            # a 4-bit cache is decompressed whole (every position read this step) before the attention reads it
            m = self.m
            cache = (DECOMPRESS_BYTES_PER_ELEMENT * s.kv_read * m.kv_bytes_per_token_layer // m.bytes_per_param
                     if lay.compress_cache else 0)
            return self.attention(GPU, at, s, self._unpack(at, cache, (q,), s))
        kv_gpu = int(round(s.kv_read * lay.cg))
        kv_cpu = s.kv_read - kv_gpu
        parts: list[int] = []
        if kv_gpu:
            part = BatchSlice(s.phase, s.step, s.mb, s.requests, s.tokens, kv_gpu, kv_gpu, s.counts)
            parts.append(self.attention(GPU, at, part, (q,)))
        if kv_cpu:  # q, k, v down; the CPU attends over its share (fp32 workspace copy included); the output comes up
            down = self.xfer(D2H, at, w.qkv_out_bytes(s.tokens), Payload.ACTIVATIONS, (q,), s.tokens)
            cpu_work = _cpu_attention_work(self.ctx, lay, s.tokens, kv_cpu, int(round(s.kv_read * lay.cd)))
            a = self._op(OpKind.ATTENTION, CPU, at.phase, at.step, at.layer, at.mb, s.tokens, cpu_work, (down,),
                         kv_tokens=kv_cpu)
            parts.append(self.xfer(H2D_ACT, at, w.attn_out_bytes(s.tokens), Payload.ACTIVATIONS, (a,), s.tokens))
        return tuple(parts)
