"""`cpu-only`: every op on the CPU (AMX for the GEMMs), weights and KV cache in DRAM.

The reference point for calibrating the CPU side on a machine without a GPU: its plans run for real there.
OP0-OP2 run in micro-batches; experts run on the whole step's tokens (`coalesce=on`) or per micro-batch. A
composed layout (`compose.py`): placement ccc, the residual stream on the CPU, every expert in E_C on the same
CPU worker, so the shared emitter inserts no copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sim.plan import Plan
from sim.policies.base import MicroBatchOptions, PlanContext, Policy, require_fits
from sim.policies.compose import CPU, Layout, Schedule, all_experts, compose_plan, no_experts


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
        schedule = Schedule.split(ctx, o.prefill_tokens, o.decode_micro_batch,
                                  expert_batch=0 if o.coalesce == "on" else 1)
        cpu = {"weights": m.weight_bytes,
               "kv_cache": wl.kv_tokens_total * m.kv_bytes_per_token,
               "hidden_states": 2 * wl.prompt_tokens * m.hidden_size * m.bytes_per_param}
        require_fits("DRAM", sysm.name, self.name, cpu, sysm.dram_usable_bytes)
        layout = Layout("ccc", no_experts(m), no_experts(m), all_experts(m), home=CPU, cpu_lane=CPU)
        return compose_plan(ctx, self.name, asdict(o), schedule, layout, layout, {"gpu": {}, "cpu": cpu},
                            kv_on_gpu=False)
