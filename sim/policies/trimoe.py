"""`trimoe`: TriMoE (Pan et al., arXiv 2603.01058, DAC'26): hot experts on the GPU, warm on the AMX CPU, cold on
near-memory DIMMs.

Needs a system with an `ndp` tier (e.g. `a100-80g-8452y-ndp8`). Everything but OP3 is CoX-MoE's (placement x0 x1
x2 and micro-batches per phase, coalesced OP3, the hottest experts resident, searched the same way): TriMoE
builds on the same GPU + AMX co-execution and adds the third tier. Per MoE layer and phase, the non-resident
experts are assigned by TriMoE's bottleneck-aware greedy makespan rule as this simulator reads it (the paper's
own text is not at hand; its summary: "hot experts to the GPU, warm to the AMX CPU, cold to the DIMM-NDP",
"bottleneck-aware greedy makespan schedule"): in order of expected load, heaviest first, each expert goes to
the tier whose finish time it raises least, where the GPU pays the expert's PCIe copy and its compute (E_M), the
CPU its AMX time (E_C), the DIMMs their time at the tier's rank-parallel bandwidth and compute (E_N); the host
tiers share one copy of the hidden states down and of the outputs up. The experts the greedy leaves to the host
are then tiered by load, the warm (heaviest) on the CPU and the cold (lightest) on the DIMMs, split where the
slower of the two finishes first (`_warm_and_cold`): the greedy alone interleaved them (in every Qwen3 layer
some DIMM expert was heavier than some CPU expert). Not modelled:
TriMoE's run-time re-layout from an EMA of observed load (CoX-MoE's `restratify` is the closest mechanism
here) and its predictor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.errors import SimInputError
from sim.plan import Phase
from sim.policies.base import PlanContext, memo_method, require_fits
from sim.policies.compose import NDP
from sim.policies.coxmoe import CoxMoeOptions, CoxMoePolicy, Op3, _Model


@dataclass(frozen=True)
class TriMoeOptions(CoxMoeOptions):
    """CoX-MoE's knobs (placement, micro-batches, resident experts), with the non-resident experts split three
    ways by the greedy makespan rule; split, split_tokens and restratify do not apply."""

    policy_name = "trimoe"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, default in (("split", "auto"), ("split_tokens", "off"), ("restratify", "off")):
            if getattr(self, name) != default:
                raise SimInputError(f"policy trimoe: {name} does not apply (the three-tier rule places experts)")


def _makespan(t: np.ndarray, host_copy: float) -> float:
    """The layer's time for tier loads t = (GPU, CPU, DIMMs): the host tiers share one copy of the hidden states
    down and of the outputs up."""
    host = max(t[1], t[2])
    return float(max(t[0], host + host_copy if host > 0 else 0.0))


def _warm_and_cold(host: list[int], load: np.ndarray, cpu: np.ndarray, ndp: np.ndarray
                   ) -> tuple[float, float, list[int], list[int]]:
    """The host tiers' experts as TriMoE tiers them: by expected load, the warm (heaviest) on the AMX CPU and the
    cold (lightest) on the DIMMs, split where the slower of the two finishes first. Returns (CPU time, DIMM time,
    CPU experts, DIMM experts); experts with no tokens stay with the CPU's, costing nothing."""
    idle = [e for e in host if load[e] <= 0]
    busy = sorted((e for e in host if load[e] > 0), key=lambda e: (-load[e], e))
    cpu_prefix = np.concatenate([[0.0], np.cumsum([cpu[e] for e in busy])])
    ndp_suffix = np.concatenate([np.cumsum([ndp[e] for e in busy][::-1])[::-1], [0.0]])
    j = int(np.argmin(np.maximum(cpu_prefix, ndp_suffix)))
    return float(cpu_prefix[j]), float(ndp_suffix[j]), busy[:j] + idle, busy[j:]


class _TriModel(_Model):
    """CoX-MoE's analytic model with OP3 split across GPU (E_R + E_M), CPU (E_C) and DIMMs (E_N)."""

    @memo_method
    def op3(self, phase: Phase, resident: int, mu: int, max_fetch: int = -1) -> Op3:
        return self._three_tiers(phase, resident, mu, max_fetch)

    def _three_tiers(self, phase: Phase, resident: int, mu: int, max_fetch: int = -1) -> Op3:
        m = self.m
        counts, n_mb, fetch, shared, host_copy, gpu_all, cpu_all, dense = self.op3_terms(phase, mu)
        ndp_all = self.a.expert_times(NDP, m, counts / n_mb) * n_mb
        total, widest, fetched, on_cpu, on_ndp = 0.0, 0, [], [], []
        for layer in range(m.num_moe_layers):
            order = self.order[layer]
            res, rest = order[:resident], order[resident:]
            t = np.array([shared + gpu_all[layer][res].sum(), 0.0, 0.0])  # GPU, CPU, DIMMs
            tiers: tuple[list[int], list[int], list[int]] = ([], [], [])
            for e in rest[np.argsort(-counts[layer][rest], kind="stable")]:
                if counts[layer][e] <= 0:
                    tiers[1].append(int(e))  # no tokens: nothing runs (kept with E_C, which then costs nothing)
                    continue
                cost = (gpu_all[layer][e] + fetch, cpu_all[layer][e], ndp_all[layer][e])
                finish = [_makespan(t + np.eye(3)[tier] * cost[tier], host_copy) for tier in range(3)]
                if 0 <= max_fetch <= len(tiers[0]):  # the fetch buffers VRAM holds are taken
                    finish[0] = np.inf
                tier = int(np.argmin(finish))
                t[tier] += cost[tier]
                tiers[tier].append(int(e))
            t[1], t[2], tiers[1][:], tiers[2][:] = _warm_and_cold(tiers[1] + tiers[2], counts[layer],
                                                                   cpu_all[layer], ndp_all[layer])
            total += _makespan(t, host_copy)
            widest = max(widest, len(tiers[0]))
            fetched.append(tuple(sorted(tiers[0])))
            on_cpu.append(tuple(sorted(tiers[1])))
            on_ndp.append(tuple(sorted(tiers[2])))
        return Op3(total + dense, widest, tuple(fetched), tuple(on_cpu), ((),) * m.num_moe_layers, tuple(on_ndp))


class TriMoePolicy(CoxMoePolicy):
    name = "trimoe"
    label = "TriMoE"
    color = "#e67e22"
    summary = "TriMoE: hot experts on the GPU, warm on the AMX CPU, cold on near-memory DIMMs (greedy makespan)"
    Options = TriMoeOptions
    Model = _TriModel
    example_options = ({}, {"prefill_placement": "ggg", "decode_placement": "gcg", "resident_experts": "1",
                            "decode_micro_batch": "4", "prefill_micro_batch": "3"})
    example_system = "a100-80g-8452y-ndp8"
    compared = False  # needs a system with an NDP tier

    def search_space(self, ctx: PlanContext):
        if ctx.system.ndp is None:
            raise SimInputError(f"policy {self.name}: system {ctx.system.name} has no NDP tier; give a system with "
                                f"`ndp` (e.g. {self.example_system})")
        m = ctx.model
        need = {"expert_weights": m.routed_expert_bytes}
        require_fits("NDP", ctx.system.ndp.name, self.name, need, ctx.system.ndp.capacity_bytes)
        return super().search_space(ctx)
