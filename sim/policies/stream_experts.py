"""`stream-experts`: the plain offloading baseline. Non-expert weights stay in VRAM; every MoE layer's experts
live in host DRAM and are copied over PCIe into a two-layer double buffer before the GPU runs them.

Layers run layer-major over the micro-batches (FlexGen's zig-zag), so each layer's experts cross PCIe once per
step. The KV cache stays in VRAM when it fits (`attention=gpu`); otherwise (`attention=cpu`) it lives in DRAM,
decode attention runs on the CPU and prefill stores each micro-batch's K/V over PCIe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.plan import Payload, Phase, Plan
from sim.policies.base import MicroBatchOptions, PlanContext, Policy, require_fits
from sim.policies.layers import (
    CPU,
    GPU,
    H2D,
    BatchSlice,
    LayerEmitter,
    activation_workspace_bytes,
    decode_slices,
    group_requests,
    prefill_slices,
)


@dataclass(frozen=True)
class StreamExpertsOptions(MicroBatchOptions):
    """attention: auto | gpu | cpu (decode attention and KV placement; auto = gpu when the KV cache fits);
    fetch: all | routed (copy every expert of a layer, or only those the step's tokens chose);
    prefill_tokens: prompt tokens per prefill micro-batch; decode_micro_batch: requests per decode
    micro-batch (0 = the whole batch)."""

    policy_name = "stream-experts"
    attention: str = "auto"
    fetch: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.choice("attention", ("auto", "gpu", "cpu"))
        self.choice("fetch", ("all", "routed"))


class StreamExpertsPolicy(Policy):
    name = "stream-experts"
    label = "Stream experts"
    color = "#d68910"
    summary = "non-expert weights in VRAM, each layer's experts streamed over PCIe into a double buffer"
    Options = StreamExpertsOptions
    example_options = ({}, {"attention": "cpu", "decode_micro_batch": "4", "prefill_tokens": "16"},
                       {"attention": "gpu", "fetch": "routed"})

    def build(self, ctx: PlanContext) -> Plan:
        o: StreamExpertsOptions = self.options
        m, wl, sysm = ctx.model, ctx.workload, ctx.system
        prefill_groups, decode_groups, max_tokens = group_requests(ctx, o.prefill_tokens, o.decode_micro_batch)
        layer_expert_bytes = m.num_experts * m.expert_bytes
        gpu = {
            "non_expert_weights": m.non_expert_params * m.bytes_per_param,
            "expert_double_buffer": 2 * layer_expert_bytes,
            "hidden_states": wl.prompt_tokens * m.hidden_size * m.bytes_per_param,
            "workspace": activation_workspace_bytes(ctx, max_tokens),
        }
        kv_bytes = wl.kv_tokens_total * m.kv_bytes_per_token
        attention = o.attention
        if attention == "auto":
            attention = "gpu" if sum(gpu.values()) + kv_bytes <= sysm.gpu_usable_bytes else "cpu"
        cpu = {"expert_weights": m.routed_expert_params * m.bytes_per_param}
        (gpu if attention == "gpu" else cpu)["kv_cache"] = kv_bytes
        require_fits("GPU", sysm.gpu.name, self.name, gpu, sysm.gpu_usable_bytes)
        require_fits("DRAM", sysm.name, self.name, cpu, sysm.dram_usable_bytes)
        knobs = {**self.knobs(), "attention": attention}
        builder = ctx.builder()
        em = LayerEmitter(ctx, builder)
        decode_on = CPU if attention == "cpu" else GPU
        layer_done: dict[int, int] = {}
        seq = 0  # global index of (step, layer) visits: the double buffer alternates on it

        def run(slices: list[BatchSlice], phase: Phase, step: int, attention_on) -> None:
            nonlocal seq
            last = [em.embed(phase, step, s.mb, s.tokens) for s in slices]
            for layer in range(m.num_layers):
                fetch = -1
                if m.is_moe_layer(layer):
                    li = m.moe_index(layer)
                    n = m.num_experts
                    if o.fetch == "routed":
                        n = int(np.count_nonzero(sum(s.counts[li] for s in slices)))
                    fetch = em.copy(H2D, phase, step, layer, -1, n * m.expert_bytes, Payload.EXPERT_WEIGHTS,
                                    (layer_done.get(seq - 2, -1),))
                fronts = [em.attention_front(phase, step, layer, s.mb, s.tokens, s.kv_attended, s.kv_read,
                                             attention_on, attention == "cpu", last[i])
                          for i, s in enumerate(slices)]
                for i, s in enumerate(slices):
                    last[i] = em.attention_back_and_ffn(phase, step, layer, s.mb, s.tokens,
                                                        s.layer_counts(ctx, layer), fronts[i],
                                                        expert_deps=lambda e, f=fetch: f)
                layer_done[seq] = last[-1]
                seq += 1
            for i, s in enumerate(slices):
                em.lm_head(phase, step, s.mb, int(s.requests.size), last[i])

        run(prefill_slices(ctx, prefill_groups), Phase.PREFILL, 0, GPU)
        for step in ctx.steps():
            slices = decode_slices(ctx, step, decode_groups)
            if slices:
                run(slices, Phase.DECODE, step, decode_on)
        return Plan(self.name, knobs, m, sysm, wl, builder.ops, {"gpu": gpu, "cpu": cpu},
                    {"prefill": prefill_groups, "decode": decode_groups}, decode_scale=ctx.decode_scale)
