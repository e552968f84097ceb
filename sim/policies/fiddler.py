"""`fiddler`: Fiddler / kTransformers-style expert placement (Kamahori et al., ICLR'25).

Non-expert weights and as many of the most popular experts as fit (offline popularity profiling: here the
trace's measured load) live in VRAM; the rest stay in DRAM. As Fiddler places them, popularity is ranked over
every (layer, expert) pair of the model at once (`placement=global`), so a layer whose routing is skewed keeps
more of its experts resident than a flat one, and the VRAM left after whole per-layer rounds is used too;
`placement=per_layer` keeps the same number in every layer. At every step and layer, after the router, each
non-resident expert that received tokens either runs on the CPU (its tokens' hidden states go down and the
outputs come back) or has its weights copied to the GPU and runs there, whichever a latency model of that
expert's token count says is faster. Attention runs on the GPU with the KV cache in VRAM when it fits,
otherwise on the CPU over a DRAM cache. The whole batch runs as one (no micro-batching in decode).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sim.errors import SimInputError
from sim.plan import OpKind, Payload, Phase, Plan, PlanBuilder, Stream
from sim.policies.analytic import Analytic, expected_counts
from sim.policies.base import OptionsBase, PlanContext, Policy, require_fits
from sim.policies.layers import (
    At,
    BatchSlice,
    LayerEmitter,
    activation_workspace_bytes,
    decode_slices,
    prefill_slices,
    split_by_count,
    split_by_tokens,
)

GPU, CPU, CPU_EXPERTS, H2D, H2D_ACT, D2H = (Stream.GPU, Stream.CPU, Stream.CPU_EXPERTS, Stream.H2D, Stream.H2D_ACT,
                                            Stream.D2H)
# On-demand expert copies land in one GPU placeholder (efeslab/fiddler src/fiddler/mixtral.py @7e537a68:
# `self.expert_placeholder`, refilled by `load_state_dict` for each fetched expert), so a fetch waits for the
# previous fetched expert's compute. (2 until 2026-12-07: one computed while the next arrived, a pool the code lacks.)
FETCH_SLOTS = 1


@dataclass(frozen=True)
class FiddlerOptions(OptionsBase):
    """resident_experts: popular experts per layer in VRAM (N: N in every layer; -1 = as many as fit, placed as
    `placement` says; the knobs report the per-layer count, or -1 where layers differ, and the placement used);
    placement: global (the most popular (layer, expert) pairs of the whole model, as Fiddler's
    `set_expert_loc` fills VRAM from one popularity list) | per_layer (the same count in every layer); attention:
    auto | gpu | cpu (auto = the GPU when the KV cache fits); prefill_tokens: prompt tokens per prefill
    micro-batch (0 = the whole batch at once, as Fiddler runs a prompt); cpu_max_tokens: -1 = a non-resident
    expert runs where the latency model says, N = on the CPU with at most N tokens and fetched with more
    (Fiddler's first release hard-codes 7 per token on the CPU against 70 per fetch, so N = 9); pin_weight: on |
    off (off: experts are fetched from pageable memory, as Fiddler's `load_state_dict` from a model loaded by
    `from_pretrained` copies them); cpu_moe: per_expert | fused, how the runtime calls its CPU experts (per_expert:
    Fiddler's loop, each expert's tokens' hidden states down and its outputs up, a dispatch per expert; fused:
    KTransformers' CPU MoE operator, one call per layer taking each token's hidden state once and returning its
    combined output once, no dispatch per expert: the plan's `expert_kernels` is `fused_cpu`, its GPU experts still
    a kernel call each, as both runtimes' GPU loops run them)."""

    policy_name = "fiddler"
    resident_experts: int = -1
    placement: str = "global"
    attention: str = "auto"
    prefill_tokens: int = 0
    cpu_max_tokens: int = -1
    pin_weight: str = "on"
    cpu_moe: str = "per_expert"

    def __post_init__(self) -> None:
        self.at_least("resident_experts", -1)
        self.at_least("cpu_max_tokens", -1)
        self.choice("pin_weight", ("on", "off"))
        self.choice("cpu_moe", ("per_expert", "fused"))
        self.choice("placement", ("global", "per_layer"))
        self.choice("attention", ("auto", "gpu", "cpu"))
        self.at_least("prefill_tokens", 0)


class FiddlerPolicy(Policy):
    name = "fiddler"
    label = "Fiddler"
    color = "#27ae60"
    summary = "Fiddler/kTransformers: popular experts in VRAM, the rest per expert and step on the CPU or fetched"
    Options = FiddlerOptions
    # a Python loop over the experts (efeslab/fiddler src/fiddler/mixtral.py); `cpu_moe=fused`: `fused_cpu`
    example_options = ({}, {"resident_experts": "1", "attention": "cpu", "prefill_tokens": "12"},
                       {"resident_experts": "0", "cpu_max_tokens": "100000", "cpu_moe": "fused"})

    @property
    def expert_kernels(self) -> str:  # type: ignore[override]  # the runtime's CPU call (FiddlerOptions.cpu_moe)
        return "fused_cpu" if self.options.cpu_moe == "fused" else "per_expert"

    def build(self, ctx: PlanContext) -> Plan:
        o: FiddlerOptions = self.options
        m, wl, sysm = ctx.model, ctx.workload, ctx.system
        if o.resident_experts > m.num_experts:
            raise SimInputError(f"policy {self.name}: resident_experts={o.resident_experts} exceeds the "
                                f"{m.num_experts} experts per layer of {m.name}")
        bpp = m.bytes_per_param
        requests = np.arange(wl.batch)
        prefill_groups = split_by_tokens(requests, wl.prompt_lens, o.prefill_tokens or wl.prompt_tokens)
        decode_groups = split_by_count(requests, 0)
        max_tokens = max(max(int(wl.prompt_lens[g].sum()) for g in prefill_groups), wl.batch)
        kv = wl.kv_tokens_total * m.kv_bytes_per_token
        base = {"non_expert_weights": m.non_expert_bytes,
                "expert_fetch_pool": FETCH_SLOTS * m.expert_bytes,
                "hidden_states": 2 * wl.prompt_tokens * m.hidden_size * bpp,
                "workspace": activation_workspace_bytes(ctx, max_tokens)}
        free = sysm.gpu_usable_bytes - sum(base.values())
        attention = o.attention
        if attention == "auto":
            attention = "gpu" if kv <= free - m.num_moe_layers * m.expert_bytes else "cpu"
        if attention == "gpu":
            base["kv_cache"] = kv
            free -= kv
        prefill, decode = expected_counts(ctx)
        residents = _resident_sets(o, m.num_moe_layers, m.num_experts, free // m.expert_bytes,
                                   prefill, decode, wl.max_gen_len - 1)
        total = sum(len(r) for r in residents)
        gpu = {**base, "resident_experts": total * m.expert_bytes}
        cpu = {"expert_weights": m.routed_expert_bytes,
               "hidden_states": 2 * wl.prompt_tokens * m.hidden_size * bpp}
        if attention == "cpu":
            cpu["kv_cache"] = kv
        require_fits("GPU", sysm.gpu.name, self.name, gpu, sysm.gpu_usable_bytes)
        require_fits("DRAM", sysm.name, self.name, cpu, sysm.dram_usable_bytes)
        emit = _Fiddler(ctx, ctx.builder(), residents, attention == "gpu", o.cpu_max_tokens,
                        Payload.EXPERT_WEIGHTS if o.pin_weight == "on" else Payload.PAGEABLE_WEIGHTS,
                        self.expert_kernels)
        emit.phase(prefill_slices(ctx, prefill_groups), Phase.PREFILL, 0)
        for step in ctx.steps():
            slices = decode_slices(ctx, step, decode_groups)
            if slices:
                emit.b.settle()  # earlier steps' ops are not read back
                emit.phase(slices, Phase.DECODE, step)
        per_layer = {len(r) for r in residents}
        knobs = {**asdict(o), "placement": o.placement if o.resident_experts < 0 else "per_layer",  # as placed
                 "resident_experts": per_layer.pop() if len(per_layer) == 1 else -1,
                 "resident_experts_total": total, "resident_experts_per_layer": [len(r) for r in residents],
                 "attention": attention,
                 "cpu_expert_runs": emit.cpu_runs, "fetched_expert_runs": emit.fetch_runs}
        return Plan(self.name, knobs, m, sysm, wl, emit.b.result(), {"gpu": gpu, "cpu": cpu},
                    {"prefill": prefill_groups, "decode": decode_groups}, decode_scale=ctx.decode_scale,
                    expert_kernels=self.expert_kernels)


def _resident_sets(o: FiddlerOptions, layers: int, experts: int, slots: int, prefill: np.ndarray,
                   decode: np.ndarray, decode_steps: int) -> list[set[int]]:
    """Per MoE layer, the experts held in VRAM: `resident_experts` of each layer when given; else, with `slots`
    experts' worth of free VRAM, the most popular (layer, expert) pairs (`global`: ranked by all the tokens the
    run routes to each, layer-major on ties) or the same count in every layer (`per_layer`: ranked within the
    layer by prompt tokens plus one average decode step's)."""
    slots = max(0, int(slots))
    if o.resident_experts >= 0 or o.placement == "per_layer":
        count = o.resident_experts if o.resident_experts >= 0 else min(experts, slots // max(layers, 1))
        popular = np.argsort(-(prefill + decode), axis=1, kind="stable")[:, :count]
        return [set(map(int, row)) for row in popular]
    load = (prefill + decode * decode_steps).ravel()
    chosen = np.argsort(-load, kind="stable")[:min(slots, load.size)]
    out: list[set[int]] = [set() for _ in range(layers)]
    for flat in chosen.tolist():
        out[flat // experts].add(flat % experts)
    return out


class _Fiddler(LayerEmitter):
    def __init__(self, ctx: PlanContext, builder: PlanBuilder, resident: list[set[int]], kv_on_gpu: bool,
                 cpu_max_tokens: int = -1, fetch_payload: Payload = Payload.EXPERT_WEIGHTS,
                 expert_kernels: str = "per_expert"):
        super().__init__(ctx, builder)
        self.resident, self.kv_on_gpu = resident, kv_on_gpu
        self.cpu_moe_call = expert_kernels == "fused_cpu"  # KTransformers' one CPU MoE call a layer
        self.cpu_max_tokens, self.fetch_payload = cpu_max_tokens, fetch_payload
        self.a = Analytic(ctx, expert_kernels)  # the latency model prices experts as the plan's runtime runs them
        self.fetch_t = self.a.copy(H2D, self.m.expert_bytes, fetch_payload)
        self.slot_free: list[int] = [-1] * FETCH_SLOTS   # op after which each fetch slot may be overwritten
        self.fetches = 0
        self.cpu_runs = self.fetch_runs = 0
        self._cpu_faster_memo: dict[int, bool] = {}  # per token count: a plan asks the same few counts again

    def _cpu_faster(self, tokens: int) -> bool:
        """Fiddler's per-expert choice: run on the CPU when that (with its activations' round trip) beats
        fetching the weights and running on the GPU."""
        if self.cpu_max_tokens >= 0:  # the runtime's own threshold
            return tokens <= self.cpu_max_tokens
        hit = self._cpu_faster_memo.get(tokens)
        if hit is None:
            a, w = self.a, self.w
            cpu = (a.t(OpKind.EXPERT, CPU_EXPERTS, w.expert(tokens)) + a.copy(D2H, w.hidden_bytes(tokens))
                   + a.copy(H2D_ACT, w.hidden_bytes(tokens)))
            hit = self._cpu_faster_memo[tokens] = cpu <= self.fetch_t + a.t(OpKind.EXPERT, GPU, w.expert(tokens))
        return hit

    def phase(self, slices: list[BatchSlice], phase: Phase, step: int) -> None:
        m, w = self.m, self.w
        hidden: list[int | tuple[int, ...]] = [self.embed(phase, step, s.mb, s.tokens) for s in slices]
        decode_attention = CPU if (phase is Phase.DECODE and not self.kv_on_gpu) else GPU
        for layer in range(m.num_layers):
            for i, s in enumerate(slices):
                at = At(phase, step, layer, s.mb)
                front = self.attention_front(phase, step, layer, s.mb, s.tokens, s.kv_attended, s.kv_read,
                                             decode_attention, not self.kv_on_gpu, hidden[i])
                if not m.is_moe_layer(layer):
                    hidden[i] = self.attention_back_and_ffn(phase, step, layer, s.mb, s.tokens, None, front)
                    continue
                o = self.op(OpKind.O_PROJ, GPU, at, s.tokens, (front,))
                router = last = self.op(OpKind.ROUTER, GPU, at, s.tokens, (o,))
                if m.shared_expert_intermediate_size:
                    last = self.op(OpKind.SHARED_EXPERT, GPU, at, s.tokens, (router,))
                li = m.moe_index(layer)
                counts = s.counts[li]
                active = [int(e) for e in np.flatnonzero(counts)]
                on_gpu = [e for e in active if e in self.resident[li]]
                offloaded = [e for e in active if e not in self.resident[li]]
                to_cpu = [e for e in offloaded if self._cpu_faster(int(counts[e]))]
                fetched = [e for e in offloaded if e not in to_cpu]
                ran = self.experts(GPU, at, counts, on_gpu, (router,))
                last = max(last, ran)
                for e in fetched:  # on demand, after the router: the copy is on the critical path
                    slot = self.fetches % FETCH_SLOTS
                    copy = self.xfer(H2D, at, m.expert_bytes, self.fetch_payload, (router, self.slot_free[slot]))
                    last = self.experts(GPU, at, counts, [e], (router, copy))
                    self.slot_free[slot] = last
                    self.fetches += 1
                    self.fetch_runs += 1
                back = -1
                if to_cpu:
                    routed = int(sum(int(counts[e]) for e in to_cpu))
                    if self.cpu_moe_call:  # one MoE call: each token's hidden state once each way (the slice's
                        routed = min(routed, s.tokens)  # tokens bound those with a CPU expert; exact, none resident)
                    down = self.xfer(D2H, at, w.hidden_bytes(routed), Payload.ACTIVATIONS, (router,), routed)
                    cpu_last = self.experts(CPU_EXPERTS, at, counts, to_cpu, (down,))
                    back = self.xfer(H2D_ACT, at, w.hidden_bytes(routed), Payload.ACTIVATIONS, (cpu_last,), routed)
                    self.cpu_runs += len(to_cpu)
                hidden[i] = (last, back)  # the next layer waits for both halves of the experts
        for i, s in enumerate(slices):
            self.lm_head(phase, step, s.mb, int(s.requests.size), hidden[i])
