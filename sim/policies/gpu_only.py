"""`gpu-only`: every weight and the whole KV cache in VRAM; the throughput bound where the model fits."""

from __future__ import annotations

from dataclasses import dataclass

from sim.plan import Plan
from sim.policies.base import MicroBatchOptions, PlanContext, Policy, require_fits
from sim.policies.compose import Layout, Schedule, all_experts, compose_plan, no_experts
from sim.policies.layers import activation_workspace_bytes, group_requests


@dataclass(frozen=True)
class GpuOnlyOptions(MicroBatchOptions):
    """prefill_tokens: prompt tokens per prefill micro-batch; decode_micro_batch: requests per decode
    micro-batch (0 = the whole batch)."""

    policy_name = "gpu-only"


class GpuOnlyPolicy(Policy):
    name = "gpu-only"
    label = "GPU-resident"
    color = "#8e44ad"
    summary = "all weights and KV in VRAM, every op on the GPU (fails when the model does not fit)"
    Options = GpuOnlyOptions
    # GPU-resident serving runs a fused MoE call per layer (vLLM fused_moe.py: align, two fused GEMMs, activation,
    # sum)
    expert_kernels = "fused"
    example_options = ({}, {"decode_micro_batch": "3", "prefill_tokens": "20"})

    def build(self, ctx: PlanContext) -> Plan:
        o: GpuOnlyOptions = self.options
        m, wl = ctx.model, ctx.workload
        prefill_groups, decode_groups, max_tokens = group_requests(ctx, o.prefill_tokens, o.decode_micro_batch)
        schedule = Schedule(prefill_groups, decode_groups, expert_batch=1)
        static = {
            "gpu": {"weights": m.weight_bytes,
                    "kv_cache": wl.kv_tokens_total * m.kv_bytes_per_token,
                    "workspace": activation_workspace_bytes(ctx, max_tokens)},
            "cpu": {},
        }
        require_fits("GPU", ctx.system.gpu.name, self.name, static["gpu"], ctx.system.gpu_usable_bytes)
        layout = Layout("ggg", all_experts(m), no_experts(m), no_experts(m))  # all resident: nothing crosses PCIe
        return compose_plan(ctx, self.name, self.knobs(), schedule, layout, layout, static, kv_on_gpu=True,
                            expert_kernels=self.expert_kernels)
