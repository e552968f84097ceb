"""`gpu-only`: every weight and the whole KV cache in VRAM; the throughput bound where the model fits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.errors import CapacityError, SimInputError
from sim.plan import Plan, PlanBuilder
from sim.policies.base import PlanContext, Policy
from sim.policies.layers import (
    GPU,
    LayerEmitter,
    activation_workspace_bytes,
    decode_slices,
    prefill_slices,
    split_by_count,
    split_by_tokens,
)


@dataclass(frozen=True)
class GpuOnlyOptions:
    """prefill_tokens: prompt tokens per prefill micro-batch; decode_micro_batch: requests per decode
    micro-batch (0 = the whole batch)."""

    prefill_tokens: int = 8192
    decode_micro_batch: int = 0

    def __post_init__(self) -> None:
        if self.prefill_tokens < 1:
            raise SimInputError("policy gpu-only: prefill_tokens must be >= 1")
        if self.decode_micro_batch < 0:
            raise SimInputError("policy gpu-only: decode_micro_batch must be >= 0")


class GpuOnlyPolicy(Policy):
    name = "gpu-only"
    summary = "all weights and KV in VRAM, every op on the GPU (fails when the model does not fit)"
    Options = GpuOnlyOptions

    def build(self, ctx: PlanContext) -> Plan:
        o: GpuOnlyOptions = self.options
        m, wl = ctx.model, ctx.workload
        requests = np.arange(wl.batch)
        prefill_groups = split_by_tokens(requests, wl.prompt_lens, o.prefill_tokens)
        decode_groups = split_by_count(requests, o.decode_micro_batch)
        max_tokens = max(max(int(wl.prompt_lens[g].sum()) for g in prefill_groups),
                         max(g.size for g in decode_groups))
        static = {
            "gpu": {"weights": m.total_params * m.bytes_per_param,
                    "kv_cache": wl.kv_tokens_total * m.kv_bytes_per_token,
                    "workspace": activation_workspace_bytes(ctx, max_tokens)},
            "cpu": {},
        }
        need = sum(static["gpu"].values())
        if need > ctx.system.gpu_usable_bytes:
            parts = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in static["gpu"].items())
            raise CapacityError(f"GPU ({ctx.system.gpu.name}) for gpu-only", need, ctx.system.gpu_usable_bytes,
                                parts)
        b = PlanBuilder()
        em = LayerEmitter(ctx, b)
        slices = prefill_slices(ctx, prefill_groups)
        for step in range(1, wl.max_gen_len):
            slices += decode_slices(ctx, step, decode_groups)
        for s in slices:  # micro-batch major: each micro-batch runs every layer before the next starts
            last = em.embed(s.phase, s.step, s.mb, s.tokens)
            for layer in range(m.num_layers):
                front = em.attention_front(s.phase, s.step, layer, s.mb, s.tokens, s.kv_attended, s.kv_read,
                                           GPU, False, last)
                last = em.attention_back_and_ffn(s.phase, s.step, layer, s.mb, s.tokens,
                                                 s.layer_counts(ctx, layer), front)
            em.lm_head(s.phase, s.step, s.mb, int(s.requests.size), last)
        return Plan(self.name, self.knobs(), m, ctx.system, wl, b.ops, static,
                    {"prefill": prefill_groups, "decode": decode_groups})
