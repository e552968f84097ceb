"""Software efficiency: how far a runtime's own kernels and dispatch fall short of the modelled rates.

The roofline (and a profile) price ops as well-tuned kernels would run them. A real runtime (FlexGen's PyTorch
MoE loop, MoE-Lightning's kernels) adds Python dispatch, synchronisation and slower kernels. Where that cannot
be measured, it is one learned factor per device class and runtime: every GPU op of the runtime takes
`gpu_time_factor` times its modelled time, every CPU op `cpu_time_factor` times. The stretched op moves the same
bytes over the longer time, so it uses proportionally less of each shared resource. A factor is at least 1: the
modelled rates are what the hardware achieves, and a shorter time would move more bytes (or FLOPs) per second
than a resource's capacity. Factors are learned only on
a declared training subset (`experiments/validation/fit.py`); the validation report gives the error on the
systems left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.cost.roofline import CostModel
from sim.errors import SimInputError
from sim.plan import Op, OpKind, Plan
from sim.topology import UnitKind


@dataclass(frozen=True)
class FrameworkFactors:
    """Time multipliers of one runtime's GPU and CPU ops (1 = as modelled)."""

    gpu_time_factor: float = 1.0
    cpu_time_factor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("gpu_time_factor", "cpu_time_factor"):
            value = getattr(self, name)
            if not 1.0 <= value <= 100:
                raise SimInputError(f"framework factors: {name} must be in [1, 100], got {value} (a runtime never "
                                    "beats the cost model's achievable rates: below 1 its ops would draw more than "
                                    "a resource's capacity; raise the spec's efficiency instead)")


class FrameworkCostModel:
    """Another cost model's times, stretched per device by a runtime's factors; copies are left as they are,
    a host-side staging copy on a CPU stream too (its time comes from the link's rates)."""

    def __init__(self, base: CostModel, factors: FrameworkFactors):
        self.base = base
        self.topology = base.topology
        by_kind = {UnitKind.GPU: factors.gpu_time_factor, UnitKind.CPU: factors.cpu_time_factor, UnitKind.LINK: 1.0,
                   UnitKind.NDP: 1.0}
        self.factor = {stream: by_kind[unit.kind] for stream, unit in self.topology.streams.items()}

    def prepare(self, plan: Plan) -> None:
        prepare = getattr(self.base, "prepare", None)
        if prepare is not None:
            prepare(plan)

    def op_time_ns(self, op: Op) -> int:
        f = 1.0 if op.kind is OpKind.COPY else self.factor[op.stream]  # a host-side staging copy included
        t = self.base.op_time_ns(op)
        return t if f == 1.0 else int(round(t * f))

    def usage(self, op: Op) -> tuple[float, float]:
        f = 1.0 if op.kind is OpKind.COPY else self.factor[op.stream]
        first, memory = self.base.usage(op)
        return (first, memory) if f == 1.0 else (min(1.0, first / f), min(1.0, memory / f))
