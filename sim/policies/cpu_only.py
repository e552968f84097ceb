"""`cpu-only`: every op on the CPU (AMX for the GEMMs), weights and KV cache in DRAM.

The reference point for calibrating the CPU side on a machine without a GPU: its plans run for real there.
OP0-OP2 run in micro-batches; experts run on the whole step's tokens (`coalesce=on`) or per micro-batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sim.plan import OpKind, Phase, Plan, PlanBuilder, Stream
from sim.policies.base import MicroBatchOptions, PlanContext, Policy, require_fits
from sim.policies.layers import At, BatchSlice, LayerEmitter, decode_slices, group_requests, prefill_slices

CPU = Stream.CPU


@dataclass(frozen=True)
class CpuOnlyOptions(MicroBatchOptions):
    """prefill_tokens: prompt tokens per prefill micro-batch; decode_micro_batch: requests per decode
    micro-batch (0 = the whole batch); coalesce: on | off (experts once per step, or once per micro-batch)."""

    policy_name = "cpu-only"
    coalesce: str = "on"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.choice("coalesce", ("on", "off"))


class CpuOnlyPolicy(Policy):
    name = "cpu-only"
    label = "CPU only"
    color = "#34495e"
    compared = False
    summary = "every op on the CPU (AMX), weights and KV in DRAM: what a GPU-less machine can run for real"
    Options = CpuOnlyOptions
    example_options = ({}, {"coalesce": "off", "decode_micro_batch": "3", "prefill_tokens": "12"})

    def build(self, ctx: PlanContext) -> Plan:
        o: CpuOnlyOptions = self.options
        m, wl, sysm = ctx.model, ctx.workload, ctx.system
        prefill_groups, decode_groups, _ = group_requests(ctx, o.prefill_tokens, o.decode_micro_batch)
        cpu = {"weights": m.total_params * m.bytes_per_param,
               "kv_cache": wl.kv_tokens_total * m.kv_bytes_per_token,
               "hidden_states": 2 * wl.prompt_tokens * m.hidden_size * m.bytes_per_param}
        require_fits("DRAM", sysm.name, self.name, cpu, sysm.dram_usable_bytes)
        emit = _CpuEmitter(ctx, ctx.builder(), o.coalesce == "on")
        emit.step(prefill_slices(ctx, prefill_groups), Phase.PREFILL, 0)
        for step in ctx.steps():
            slices = decode_slices(ctx, step, decode_groups)
            if slices:
                emit.step(slices, Phase.DECODE, step)
        return Plan(self.name, asdict(o), m, sysm, wl, emit.b.ops, {"gpu": {}, "cpu": cpu},
                    {"prefill": prefill_groups, "decode": decode_groups}, decode_scale=ctx.decode_scale)


class _CpuEmitter(LayerEmitter):
    def __init__(self, ctx: PlanContext, builder: PlanBuilder, coalesce: bool):
        super().__init__(ctx, builder)
        self.coalesce = coalesce

    def step(self, slices: list[BatchSlice], phase: Phase, step: int) -> None:
        m = self.m
        ready = [self.op(OpKind.EMBED, CPU, At(phase, step, -1, s.mb), s.tokens, ()) for s in slices]
        for layer in range(m.num_layers):
            routers = []
            for i, s in enumerate(slices):
                at = At(phase, step, layer, s.mb)
                q = self.op(OpKind.QKV, CPU, at, s.tokens, (ready[i],))
                a = self.attention(CPU, at, s, (q,))
                o = self.op(OpKind.O_PROJ, CPU, at, s.tokens, (a,))
                if not m.is_moe_layer(layer):
                    ready[i] = self.op(OpKind.DENSE_FFN, CPU, at, s.tokens, (o,))
                    continue
                r = self.op(OpKind.ROUTER, CPU, at, s.tokens, (o,))
                if m.shared_expert_intermediate_size:
                    r = self.op(OpKind.SHARED_EXPERT, CPU, at, s.tokens, (r,))
                routers.append(r)
                if not self.coalesce:
                    counts = s.counts[m.moe_index(layer)]
                    ran = self.experts(CPU, at, counts, range(m.num_experts), (r,))
                    ready[i] = max(r, ran)
            if m.is_moe_layer(layer) and self.coalesce:
                li = m.moe_index(layer)
                total = sum(s.counts[li] for s in slices)
                ran = self.experts(CPU, At(phase, step, layer), total, range(m.num_experts), tuple(routers))
                ready = [max(max(routers), ran)] * len(slices)
        for i, s in enumerate(slices):
            self.op(OpKind.LM_HEAD, CPU, At(phase, step, m.num_layers, s.mb), int(s.requests.size), (ready[i],))
