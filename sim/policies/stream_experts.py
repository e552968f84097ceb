"""`stream-experts`: the plain offloading baseline. Non-expert weights stay in VRAM; every MoE layer's experts
live in host DRAM and are copied over PCIe into a two-layer double buffer before the GPU runs them.

Layers run layer-major over the micro-batches (FlexGen's zig-zag), so each layer's experts cross PCIe once per
step. The KV cache stays in VRAM when it fits (`attention=gpu`); otherwise (`attention=cpu`) it lives in DRAM,
decode attention runs on the CPU and prefill stores each micro-batch's K/V over PCIe.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.plan import Plan
from sim.policies.base import MicroBatchOptions, PlanContext, Policy, require_fits
from sim.policies.compose import Layout, Schedule, all_experts, compose_plan, no_experts
from sim.policies.layers import activation_workspace_bytes, group_requests


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
    # the plain offloading baseline runs fused MoE calls, as the FlexGen port it follows
    expert_kernels = "fused"
    example_options = ({}, {"attention": "cpu", "decode_micro_batch": "4", "prefill_tokens": "16"},
                       {"attention": "gpu", "fetch": "routed"})

    def build(self, ctx: PlanContext) -> Plan:
        o: StreamExpertsOptions = self.options
        m, wl, sysm = ctx.model, ctx.workload, ctx.system
        prefill_groups, decode_groups, max_tokens = group_requests(ctx, o.prefill_tokens, o.decode_micro_batch)
        schedule = Schedule(prefill_groups, decode_groups, expert_batch=1)
        layer_expert_bytes = m.num_experts * m.expert_bytes
        gpu = {
            "non_expert_weights": m.non_expert_bytes,
            "expert_double_buffer": 2 * layer_expert_bytes,
            "hidden_states": wl.prompt_tokens * m.hidden_size * m.bytes_per_param,
            "workspace": activation_workspace_bytes(ctx, max_tokens),
        }
        kv_bytes = wl.kv_tokens_total * m.kv_bytes_per_token
        attention = o.attention
        if attention == "auto":
            attention = "gpu" if sum(gpu.values()) + kv_bytes <= sysm.gpu_usable_bytes else "cpu"
        cpu = {"expert_weights": m.routed_expert_bytes}
        (gpu if attention == "gpu" else cpu)["kv_cache"] = kv_bytes
        require_fits("GPU", sysm.gpu.name, self.name, gpu, sysm.gpu_usable_bytes)
        require_fits("DRAM", sysm.name, self.name, cpu, sysm.dram_usable_bytes)
        knobs = {**self.knobs(), "attention": attention}
        none, every, routed = no_experts(m), all_experts(m), o.fetch == "routed"
        decode = Layout("gcg" if attention == "cpu" else "ggg", none, every, none, fetch_routed=routed)
        return compose_plan(ctx, self.name, knobs, schedule, Layout("ggg", none, every, none, fetch_routed=routed),
                            decode, {"gpu": gpu, "cpu": cpu}, kv_on_gpu=attention == "gpu",
                            expert_kernels=self.expert_kernels)
