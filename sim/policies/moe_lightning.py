"""`moe-lightning`: MoE-Lightning (Cao et al., ASPLOS'25): CGOPipe with paged expert weights and HRM search.

Decode, per layer and micro-batch k (CGOPipe): the GPU runs pre-attention (norm + QKV) of micro-batch k+2
while the CPU runs attention of micro-batch k+1 over its CPU-resident KV cache and the GPU runs
post-attention (O-proj, router, experts) of micro-batch k: micro-batched experts. floor(wg x E) experts of every
layer stay in VRAM (the first by index: routing is not used); the others of the *next* layer stream over PCIe
as n_ub pages, one per micro-batch, each copied by a CPU thread into a pinned relay first, into a GPU double
buffer of two layers. Every non-resident expert moves whatever the routing. Non-expert weights stay in VRAM.
Prefill runs on the GPU, layer by layer over micro-batches, storing K/V to the CPU and offloading hidden
states between layers; the next layer's experts arrive as one page.

Search: the paper's hierarchical roofline model as an optimisation over (micro-batch size ubs, number of
micro-batches n_ub = B / ubs, wg), decode only, per layer T = max(T_ctog, T_cpu, T_gpu) with
T_ctog = expert bytes x (1 - wg) / PCIe, T_cpu = n_ub x max(attention FLOPs / CPU FLOPS, attention bytes / DRAM
BW), T_gpu = n_ub x max(MoE FLOPs / GPU FLOPS, MoE bytes / HBM BW) where a micro-batch's MoE bytes read all
experts; memory limits gpu_home + gpu_w <= 0.86 x VRAM and cpu_home + cpu_w <= 0.8 x DRAM (`fastmoe` LP).
The best few are then simulated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from sim.plan import OpKind, Payload, Phase, Plan, PlanBuilder, Stream
from sim.policies.analytic import Analytic, Candidate, SearchSpace
from sim.policies.base import OptionsBase, PlanContext, Policy, published_split, require_fits
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

GPU, CPU, RELAY, H2D, H2D_ACT, D2H = (Stream.GPU, Stream.CPU, Stream.CPU_EXPERTS, Stream.H2D, Stream.H2D_ACT,
                                      Stream.D2H)
GPU_MEMORY_FRACTION = 0.86  # fastmoe policy LP: gpu_home + gpu_w <= 0.86 * gmem
CPU_MEMORY_FRACTION = 0.8   # fastmoe policy LP: cpu_home + cpu_w <= 0.8 * cmem


@dataclass(frozen=True)
class MoELightningOptions(OptionsBase):
    """micro_batch: requests per decode micro-batch, ubs (-1 = search); wg: share of each layer's experts
    pinned in VRAM, floor(wg x E) of them (-1 = search); prefill_tokens: prompt tokens per prefill
    micro-batch (0 = ubs requests, as the fastmoe runtime runs prefill); num_micro_batches: N/ubs, the
    artifact's n_ub (0 = ceil(B / ubs); given, it must equal that); memory_fraction: share of each memory the
    search may fill (-1: the LP's own relaxations, 0.86 of VRAM and 0.8 of DRAM); rescore: candidates the
    simulation re-scores. A configuration with every knob given needs only to fit in memory."""

    policy_name = "moe-lightning"
    micro_batch: int = -1
    num_micro_batches: int = 0
    wg: float = -1.0
    prefill_tokens: int = 0
    memory_fraction: float = -1.0
    rescore: int = 3

    def __post_init__(self) -> None:
        self.at_least("micro_batch", -1)
        self.at_least("num_micro_batches", 0)
        if self.wg != -1.0:
            self.fraction("wg")
        self.at_least("prefill_tokens", 0)
        if self.memory_fraction != -1.0:
            self.fraction("memory_fraction")
        self.at_least("rescore", 1)

    def resident(self, num_experts: int) -> int:
        """Experts per layer pinned in VRAM: the floor, as the fastmoe runtime takes it (wg=0.06 of 8 pins 0)."""
        return int(np.floor(self.wg * num_experts + 1e-9))


def hrm_layer_s(ctx: PlanContext, a: Analytic, ubs: int, resident: int) -> dict[str, float]:
    """The hierarchical roofline model of one decode layer: its three terms (seconds)."""
    m, wl, w = ctx.model, ctx.workload, ctx.work
    batch = wl.batch
    n_ub = -(-batch // ubs)
    wi = m.num_experts * m.expert_bytes
    ctog = wi * (m.num_experts - resident) / m.num_experts / (a.cm.h2d_bw)
    kv = int(ubs * (wl.prompt_lens.mean() + wl.gen_lens.mean()))  # the LP's cpu_T: attention over s + n
    attn = w.attention(ubs, kv, kv)
    # MLA's up-projection inside attention runs at the CPU's GEMM rate, the rest at its vector rate (as priced)
    compute = (attn.flops - attn.gemm_flops) / a.cm.cpu_vector_flops + attn.gemm_flops / a.cm.rates(CPU).flops
    cpu = n_ub * max(compute, attn.bytes / a.cm.cpu_bw)
    mlp_flops = ubs * m.top_k * 2 * m.expert_params
    mlp_bytes = 2 * ubs * (m.hidden_size + m.expert_intermediate_size) + wi
    compute, memory, _ = a.cm.roofs(OpKind.EXPERT, GPU, mlp_flops, mlp_bytes)  # at the experts' precision
    gpu = n_ub * max(compute, memory)
    return {"ctog": ctog, "cpu": cpu, "gpu": gpu}


def hrm_memory(ctx: PlanContext, ubs: int, resident: int) -> tuple[int, int]:
    """(GPU bytes, CPU bytes) the `fastmoe` LP's memory constraints count (`solve_lp`, one GPU, attention on the
    CPU). The GPU holds the larger of its decode home (hidden states of the batch) and its prefill home (two
    hidden-state buffers of a micro-batch's prompts, the whole batch's prompt residuals, a double-buffered KV
    staging buffer), the paged experts' double buffer, and the fused-MoE workspace sized for a prefill micro-batch
    (ubs requests x s prompt tokens, x 1.2). The CPU holds the paged experts, the KV cache, the batch's prompt
    hidden states and the pinned relay."""
    m, wl = ctx.model, ctx.workload
    bpp = m.bytes_per_param
    h = m.hidden_size
    wi = m.num_experts * m.expert_bytes
    wg = resident / m.num_experts
    layers = m.num_moe_layers
    bls = wl.batch
    s = float(wl.prompt_lens.mean())
    kv_per_token_layer = m.kv_bytes_per_token / m.num_layers  # the LP's 4 h_kv: K and V in 16 bits
    home = m.non_expert_bytes + wi * layers * wg
    home_decode = home + 2 * bpp * h * bls
    home_prefill = home + bpp * h * s * (2 * ubs + bls) + 2 * kv_per_token_layer * s * ubs
    # the LP's intermediate term with its own 1.2 margin (shared/reference/baselines.md, MoE-Lightning's fastmoe LP)
    inter = bpp * s * (ubs * m.top_k * h + ubs * m.top_k * 3 * m.expert_intermediate_size) * 1.2
    gpu = max(home_decode, home_prefill) + 2 * wi * (1 - wg) + inter
    kv = wl.kv_tokens_total * m.kv_bytes_per_token
    cpu = wi * layers * (1 - wg) + kv + bpp * h * bls * s + 2 * wi * (1 - wg)
    return int(gpu), int(cpu)


class MoELightningPolicy(Policy):
    name = "moe-lightning"
    label = "MoE-Lightning"
    color = "#2e86c1"
    summary = "MoE-Lightning: CGOPipe (GPU pre/post-attention, CPU attention, paged expert weights), HRM search"
    Options = MoELightningOptions
    # stacked_fused_moe, one Triton call per projection over its expert pool (caoshiyi/artifacts
    # fastmoe/layers/stacked_fused_moe.py)
    expert_kernels = "fused"
    example_options = ({}, {"micro_batch": "3", "wg": "0.25", "prefill_tokens": "16"}, {"micro_batch": "0", "wg": "0"})

    def search_space(self, ctx: PlanContext) -> SearchSpace:
        o: MoELightningOptions = self.options
        # nothing fits: name the memory the most frugal candidate (the smallest micro-batch, no resident expert)
        # overflows, and by how much
        given = self._published(ctx, o).micro_batch
        smallest = given if given > 0 else (ctx.workload.batch if given == 0 else 1)
        frugal = replace(o, micro_batch=smallest, num_micro_batches=0, wg=max(o.wg, 0.0))
        return SearchSpace(self._candidates(ctx), lambda c, opts: self._plan(c, opts),
                           searched=o.micro_batch < 0 or o.wg < 0, rescore=o.rescore,
                           explain_empty=lambda: self._require_fits(ctx, frugal))

    def _candidates(self, ctx: PlanContext) -> list[Candidate]:
        o: MoELightningOptions = self.options
        m, wl = ctx.model, ctx.workload
        a = Analytic(ctx, self.expert_kernels)
        batch = wl.batch
        o = self._published(ctx, o)
        if o.micro_batch > 0:
            sizes = [min(o.micro_batch, batch)]
        elif o.micro_batch == 0:
            sizes = [batch]
        else:  # the fastmoe search: 1, 2, 3, 4, then steps of 32
            sizes = sorted({s for s in [1, 2, 3, 4, *range(36, batch + 1, 32), batch] if s <= batch})
        # most residents first: once CPU attention or the GPU binds, the LP's estimate is flat in wg, and a stable
        # ranking then re-scores the tied candidates that page least (it had taken the fewest residents that
        # balance the link against the CPU, which the simulation's shared host DRAM punishes: Qwen3-30B-A3B on the
        # H100, 800/256, wg 0.57 at 1234 tok/s; the most the LP's memory model admits, 0.80, reaches 1651). Ties
        # across micro-batch sizes still go to the smaller size (the outer loop).
        residents = [o.resident(m.num_experts)] if o.wg >= 0 else list(range(m.num_experts, -1, -1))
        steps = max(wl.max_gen_len - 1, 1)
        out = []
        gpu_cap, cpu_cap = self._caps(ctx)
        for ubs in sizes:
            for resident in residents:
                if resident > m.num_experts:
                    continue
                gpu_b, cpu_b = hrm_memory(ctx, ubs, resident)
                if gpu_b > gpu_cap or cpu_b > cpu_cap:
                    continue
                terms = hrm_layer_s(ctx, a, ubs, resident)
                per_layer = max(terms.values())
                # HRM ranks by decode throughput only (prefill is ignored, as in the paper's LP)
                wg = o.wg if o.wg >= 0 else resident / m.num_experts
                out.append(Candidate(replace(o, micro_batch=ubs, wg=wg),
                                     per_layer * m.num_layers * steps, {**terms, "n_ub": -(-batch // ubs)}))
        return out

    def _published(self, ctx: PlanContext, o: MoELightningOptions) -> MoELightningOptions:
        """The options with a published split (num_micro_batches) turned into its micro-batch size."""
        if not o.num_micro_batches:
            return o
        return replace(o, micro_batch=published_split(self.name, "micro_batch", "num_micro_batches", o.micro_batch,
                                                      o.num_micro_batches, ctx.workload.batch))

    def _caps(self, ctx: PlanContext) -> tuple[float, float]:
        """Memory the candidates may use: the LP's relaxed shares when searching, all of it when forced."""
        o: MoELightningOptions = self.options
        gpu_cap, cpu_cap = ctx.system.gpu_usable_bytes, ctx.system.dram_usable_bytes
        if o.micro_batch < 0 or o.wg < 0:
            gpu_share, cpu_share = ((GPU_MEMORY_FRACTION, CPU_MEMORY_FRACTION) if o.memory_fraction < 0
                                    else (o.memory_fraction, o.memory_fraction))
            gpu_cap = min(gpu_cap, gpu_share * ctx.system.gpu.hbm_bytes)
            cpu_cap = min(cpu_cap, cpu_share * ctx.system.dram_bytes)
        return gpu_cap, cpu_cap

    def _require_fits(self, ctx: PlanContext, o: MoELightningOptions) -> None:
        gpu_b, cpu_b = hrm_memory(ctx, max(o.micro_batch, 1), o.resident(ctx.model.num_experts))
        gpu_cap, cpu_cap = self._caps(ctx)
        require_fits("GPU", ctx.system.gpu.name, self.name, {"fastmoe LP estimate": gpu_b}, int(gpu_cap))
        require_fits("DRAM", ctx.system.name, self.name, {"fastmoe LP estimate": cpu_b}, int(cpu_cap))

    def _static(self, ctx: PlanContext, o: MoELightningOptions, mb_tokens: int) -> dict[str, dict[str, int]]:
        m, wl = ctx.model, ctx.workload
        bpp = m.bytes_per_param
        resident = o.resident(m.num_experts)
        paged = m.num_experts - resident
        gpu = {"non_expert_weights": m.non_expert_bytes,
               "resident_experts": resident * m.num_moe_layers * m.expert_bytes,
               "expert_page_buffers": 2 * paged * m.expert_bytes,
               "hidden_states": 2 * wl.batch * m.hidden_size * bpp,
               "workspace": activation_workspace_bytes(ctx, mb_tokens)}
        cpu = {"expert_weights": m.routed_expert_bytes,
               "kv_cache": wl.kv_tokens_total * m.kv_bytes_per_token,
               "pinned_relay": 2 * paged * m.expert_bytes,
               "hidden_states": wl.prompt_tokens * m.hidden_size * bpp}
        return {"gpu": gpu, "cpu": cpu}

    def _plan(self, ctx: PlanContext, o: MoELightningOptions) -> Plan:
        m, wl = ctx.model, ctx.workload
        requests = np.arange(wl.batch)
        ubs = o.micro_batch or wl.batch
        prefill_groups = (split_by_tokens(requests, wl.prompt_lens, o.prefill_tokens) if o.prefill_tokens
                          else split_by_count(requests, ubs))
        decode_groups = split_by_count(requests, o.micro_batch)
        mb_tokens = max(max(int(wl.prompt_lens[g].sum()) for g in prefill_groups), o.micro_batch)
        static = self._static(ctx, o, mb_tokens)
        require_fits("GPU", ctx.system.gpu.name, self.name, static["gpu"], ctx.system.gpu_usable_bytes)
        require_fits("DRAM", ctx.system.name, self.name, static["cpu"], ctx.system.dram_usable_bytes)
        emit = _CGOPipe(ctx, ctx.builder(), o.resident(m.num_experts))
        emit.prefill(prefill_slices(ctx, prefill_groups))
        steps = [(t, decode_slices(ctx, t, decode_groups)) for t in ctx.steps()]
        emit.decode([(t, s) for t, s in steps if s])
        knobs = {**asdict(o), "n_ub": len(decode_groups), "resident_experts": o.resident(m.num_experts)}
        return Plan(self.name, knobs, m, ctx.system, wl, emit.b.result(), static,
                    {"prefill": prefill_groups, "decode": decode_groups}, decode_scale=ctx.decode_scale,
                    expert_kernels=self.expert_kernels)


class _CGOPipe(LayerEmitter):
    """Emits MoE-Lightning's schedule."""

    def __init__(self, ctx: PlanContext, builder: PlanBuilder, resident: int):
        super().__init__(ctx, builder)
        self.resident = list(range(resident))
        self.paged = list(range(resident, self.m.num_experts))
        self.paged_bytes = len(self.paged) * self.m.expert_bytes
        self.layer_done: dict[int, int] = {}   # visit index -> last GPU op of that layer's experts
        self.pages_done: dict[int, int] = {}   # visit index -> last page copy of that layer
        self.seq = 0

    def _fetch(self, at: At, nbytes: int, visit: int, deps: tuple[int, ...]) -> int:
        """CPU memcpy into the pinned relay, then the copy over PCIe (into the GPU slot of visit - 2). The relay
        is a double buffer of one layer's pages too (`pinned_relay`): the memcpy waits until the pages of visit
        - 2 have left it over PCIe."""
        if nbytes == 0:
            return -1
        pinned = self.xfer(RELAY, at, nbytes, Payload.EXPERT_WEIGHTS, (*deps, self.pages_done.get(visit - 2, -1)))
        return self.xfer(H2D, at, nbytes, Payload.EXPERT_WEIGHTS, (pinned, self.layer_done.get(visit - 2, -1)))

    def _ffn(self, at: At, s: BatchSlice, front: int, visit: int) -> int:
        m = self.m
        o = self.op(OpKind.O_PROJ, GPU, at, s.tokens, (front,))
        if not m.is_moe_layer(at.layer):
            return self.op(OpKind.DENSE_FFN, GPU, at, s.tokens, (o,))
        last = router = self.op(OpKind.ROUTER, GPU, at, s.tokens, (o,))
        if m.shared_expert_intermediate_size:
            last = self.op(OpKind.SHARED_EXPERT, GPU, at, s.tokens, (router,))
        counts = s.counts[m.moe_index(at.layer)]
        pages = self.pages_done.get(visit, -1)
        ran = self.experts(GPU, at, counts, self.resident, (router,))
        ran = max(ran, self.experts(GPU, at, counts, self.paged, (router, pages)))  # paged ones wait for their pages
        return max(last, ran)

    def prefill(self, slices: list[BatchSlice]) -> None:
        m, w = self.m, self.w
        phase = Phase.PREFILL
        hidden = [self.embed(phase, 0, s.mb, s.tokens) for s in slices]
        for layer in range(m.num_layers):
            visit = self.seq
            if m.is_moe_layer(layer):
                self.pages_done[visit] = self._fetch(At(phase, 0, layer), self.paged_bytes, visit, ())
            last = -1
            for i, s in enumerate(slices):
                at = At(phase, 0, layer, s.mb)
                dep = hidden[i]
                if layer:
                    dep = self.xfer(H2D_ACT, at, w.hidden_bytes(s.tokens), Payload.ACTIVATIONS, (dep,), s.tokens)
                q = self.op(OpKind.QKV, GPU, at, s.tokens, (dep,))
                a = self.attention(GPU, at, s, (q,))
                self.xfer(D2H, at, w.kv_bytes(s.tokens), Payload.KV, (a,), s.tokens)
                last = self._ffn(at, s, a, visit)
                hidden[i] = last
                if layer < m.num_layers - 1:  # hidden states wait in host memory between layers
                    hidden[i] = self.xfer(D2H, at, w.hidden_bytes(s.tokens), Payload.ACTIVATIONS, (last,), s.tokens)
            self.layer_done[visit] = last
            self.seq += 1
        for i, s in enumerate(slices):
            self.lm_head(phase, 0, s.mb, int(s.requests.size), hidden[i])

    def decode(self, steps: list[tuple[int, list[BatchSlice]]]) -> None:
        m, w = self.m, self.w
        phase = Phase.DECODE
        # Linear order of (step, layer, micro-batch) tasks; pre-attention runs two tasks ahead.
        tasks = [(t, layer, i) for t, slices in steps for layer in range(m.num_layers) for i in range(len(slices))]
        slices_of = dict(steps)
        visit_of = {}
        for t, _ in steps:
            for layer in range(m.num_layers):
                visit_of[(t, layer)] = self.seq
                self.seq += 1
        hidden: dict[tuple[int, int], int] = {}   # (step, micro-batch id) -> op producing its hidden state
        front: dict[tuple[int, int, int], int] = {}
        # Two tasks ahead (CGOPipe), but never past the task whose output the look-ahead task needs.
        ahead = min(2, min((len(slices) for _, slices in steps), default=1))

        def pre(task: tuple[int, int, int]) -> None:
            t, layer, i = task
            s = slices_of[t][i]
            at = At(phase, t, layer, s.mb)
            if layer == 0:
                hidden[(t, s.mb)] = self.embed(phase, t, s.mb, s.tokens, hidden.get((t - 1, s.mb), -1))
            q = self.op(OpKind.QKV, GPU, at, s.tokens, (hidden[(t, s.mb)],))
            down = self.xfer(D2H, at, w.qkv_out_bytes(s.tokens), Payload.ACTIVATIONS, (q,), s.tokens)
            a = self.attention(CPU, at, s, (down,))
            front[task] = a

        def page(t: int, layer: int, k: int, n_pages: int) -> None:
            """Page k of (t, layer)'s paged experts, issued with micro-batch k of the layer before it."""
            visit = visit_of[(t, layer)]
            if not m.is_moe_layer(layer) or not self.paged_bytes:
                return
            nbytes = self.paged_bytes // n_pages + (self.paged_bytes % n_pages if k == n_pages - 1 else 0)
            self.pages_done[visit] = self._fetch(At(phase, t, layer, k), nbytes, visit, ())

        # the step planned after each (t + 1, or the next sampled step: its layer-0 pages follow this step's last
        # layer as they would in the full plan; a sampled plan had left them out)
        next_step = {a: b for (a, _), (b, _) in zip(steps, steps[1:], strict=False)}
        first_t = steps[0][0] if steps else 0
        if steps:  # the first decoded layer's pages: one page after prefill
            page(first_t, 0, 0, 1)
        for task in tasks[:ahead]:
            pre(task)
        order = {task: j for j, task in enumerate(tasks)}
        for task in tasks:
            self.b.settle()  # nothing here reads an earlier op back (ids only)
            t, layer, i = task
            s = slices_of[t][i]
            at = At(phase, t, layer, s.mb)
            visit = visit_of[(t, layer)]
            back = self.xfer(H2D_ACT, at, w.attn_out_bytes(s.tokens), Payload.ACTIVATIONS, (front.pop(task),),
                             s.tokens)
            last = self._ffn(at, s, back, visit)
            hidden[(t, s.mb)] = last
            if i == len(slices_of[t]) - 1:
                self.layer_done[visit] = last
            nxt = (t, layer + 1) if layer + 1 < m.num_layers else (next_step.get(t, -1), 0)
            if nxt in visit_of:
                page(nxt[0], nxt[1], i, len(slices_of[t]))
            if layer == m.num_layers - 1:
                hidden[(t, s.mb)] = self.lm_head(phase, t, s.mb, int(s.requests.size), last)
            if order[task] + ahead < len(tasks):
                pre(tasks[order[task] + ahead])
