"""Roofline cost model: time = max(FLOPs / achievable peak, bytes / achievable bandwidth) + fixed overhead (on a CPU
with `gemm_overlap` below 1, a GEMM also pays that share of its shorter roof: 0 adds the two times).

This is the default `CostModel`. Besides an op's standalone time it reports how much of two shared resources the
op uses while running alone: (compute, memory) for the GPU (SMs, HBM) and the CPU (cores, host DRAM), (link,
host DRAM) for a PCIe direction, whose DMA reads or writes host memory at the link's rate. The engine uses these
usages to share resources fairly between concurrent streams (host DRAM is one resource for the CPU and both
PCIe directions). A measured profile (issue 4) plugs in through the same two methods.
"""

from __future__ import annotations

import math
from typing import Protocol

from sim.errors import SimInputError
from sim.plan import EXPERT_KERNELS, PAGEABLE_PAYLOADS, Op, OpKind, Payload, Phase, Plan
from sim.specs import ModelSpec, SystemSpec
from sim.topology import Topology, Unit, UnitKind, topology_of

_CPU_VECTOR_KINDS = frozenset({OpKind.ATTENTION, OpKind.EMBED})


class CostModel(Protocol):
    """Anything that prices an op in integer nanoseconds and says what it uses of its unit, on a topology. An op
    is priced by its kind, stream, phase, micro-batch, scope, payload, tokens, KV entries, FLOPs and bytes, not
    by its id, step, layer, expert or dependencies: the engine prices a grouped op's members once per distinct
    shape (`sim.cost.GroupPrices`). Cost models price single ops; a grouped op goes through
    `sim.cost.op_time_ns`."""

    topology: Topology

    def op_time_ns(self, op: Op) -> int: ...

    def usage(self, op: Op) -> tuple[float, float]: ...


def grouped_op_error(op: Op) -> ValueError:
    """A cost model prices single ops; a grouped expert op is priced member by member (`sim.cost.op_time_ns`)."""
    return ValueError(f"op {op.id} is a grouped expert op: price it with sim.cost.op_time_ns (its members' sum)")


MAX_OP_SECONDS = 1e9  # one op longer than ~31 years is a spec or profile error (a near-zero efficiency), not a time


def seconds_to_ns(seconds: float) -> int:
    if not seconds <= MAX_OP_SECONDS:  # NaN included
        raise SimInputError(f"an op would take {seconds:.3g} s (over {MAX_OP_SECONDS:.0e} s): a rate or efficiency in "
                            "the system spec or profile is near zero")
    return int(math.ceil(seconds * 1e9))


class _Rates:
    """Achievable rates of the unit one stream runs on, computed once per stream."""

    __slots__ = ("kind", "flops", "int8_flops", "vector_flops", "bw", "attention_bw", "overhead", "pageable_bw",
                 "memory_bw", "gemm_overlap", "attention_overhead")

    def __init__(self, unit: Unit, host_bw: float):
        self.kind = unit.kind
        self.pageable_bw = 0.0
        self.memory_bw = host_bw  # the host DRAM a host-link DMA draws from
        self.gemm_overlap = 1.0  # the share of a GEMM's shorter roof hidden under its longer one
        self.attention_overhead = 0.0  # a CPU attention call's fixed cost (CPUs only)
        spec = unit.spec
        if unit.kind is UnitKind.GPU:
            self.flops = self.vector_flops = spec.bf16_flops_per_s * spec.gemm_efficiency
            self.int8_flops = spec.int8_gemm_ops_per_s
            self.bw = self.attention_bw = spec.hbm_bytes_per_s * spec.hbm_efficiency
            self.overhead = spec.kernel_launch_s
        elif unit.kind is UnitKind.NDP:
            self.flops = self.vector_flops = self.int8_flops = spec.flops_per_s  # no INT8 rate published for NDP
            self.bw = self.attention_bw = spec.internal_bytes_per_s
            self.overhead = spec.launch_s
        elif unit.kind is UnitKind.CPU:
            self.flops, self.vector_flops = spec.gemm_flops_per_s, spec.vector_flops_per_s
            self.int8_flops = spec.int8_gemm_ops_per_s
            self.bw, self.attention_bw = spec.dram_bytes_per_s * spec.dram_efficiency, spec.attention_bytes_per_s
            self.overhead = spec.op_overhead_s
            self.attention_overhead = spec.attention_call_s
            self.gemm_overlap = spec.gemm_overlap
        else:
            self.flops = self.vector_flops = self.int8_flops = 0.0
            self.bw = self.attention_bw = spec.achievable_bytes_per_s
            self.overhead = spec.latency_s
            if unit.memory >= 0:  # a host link: pageable host memory is staged through a pinned buffer
                self.pageable_bw = self.bw * spec.pageable_ratio
            else:  # a peer link draws no host DRAM
                self.memory_bw = 0.0


def _link_speed(r: _Rates, pageable: bool) -> tuple[float, float]:
    """(bytes/s, host DRAM bytes drawn per byte moved) of a copy on link `r` running alone: the link's pinned
    rate (one DRAM pass), or its pageable rate (a bounce buffer: three passes); a host link never moves data
    faster than host DRAM can supply those passes (a peer link draws none)."""
    rate, draw = (r.pageable_bw, 3.0) if pageable else (r.bw, 1.0)
    if r.memory_bw:
        rate = min(rate, r.memory_bw / draw)
    return rate, draw


class RooflineCostModel:
    """Prices ops from the system's topology (each stream's unit and its spec); look-ups are memoised on
    (kind, stream, flops, bytes, payload)."""

    def __init__(self, system: SystemSpec):
        topo = topology_of(system)
        self.topology = topo
        self._rates = {stream: _Rates(unit, topo.host_memory_bytes_per_s) for stream, unit in topo.streams.items()}
        self.cpu_bw = topo.host_memory_bytes_per_s
        self._time: dict[tuple, int] = {}
        self._usage: dict[tuple, tuple[float, float]] = {}
        self.int8_experts = False
        self.fused_experts = False  # routed experts on a GPU pay no kernel call of their own (Plan.expert_kernels)
        self.fused_cpu_experts = False  # routed experts on a CPU pay no dispatch of their own (`fused_cpu`)
        self._kernels, self._many_experts = "per_expert", True
        self._up_params = 0  # MLA's up-projection in each attention op (`sim.cost.work.absorb_flops`)

    def use_model(self, model: ModelSpec) -> None:
        """Price routed experts at the model's expert precision: INT8 experts (W8A8) compute at each unit's INT8
        rate; INT4 experts (weight-only, dequantised to the activations' dtype as they load) at the BF16 rate.
        Their bytes come from the ops (`ModelSpec.expert_bytes`)."""
        int8 = model.expert_precision == "int8"
        if int8 != self.int8_experts:
            self.int8_experts = int8
            self._time.clear()
            self._usage.clear()
        self._many_experts = model.num_experts > 1
        if model.attention_up_params != self._up_params:  # attention ops' GEMM share: priced differently on a CPU
            self._up_params = model.attention_up_params
            self._time.clear()
            self._usage.clear()
        self.use_expert_kernels(self._kernels)

    def use_expert_kernels(self, style: str) -> None:
        """Price the GPU's routed experts as the runtime launches them: `per_expert` (each expert op pays the GPU's
        per-kernel cost, a kernel call per expert) or `fused` (none: one fused MoE call per layer and micro-batch,
        whose few kernels queue back to back behind the router's call, which pays its own); a CPU's routed experts
        pay its per-op dispatch under both, and none under `fused_cpu` (one MoE call per layer, as KTransformers'
        CPU operator runs them; its one dispatch is not charged, as the fused GPU call's is not), where the GPU's pay
        a kernel call each. A dense model's FFN (a one-expert MoE here) is its own kernels whatever the style."""
        if style not in EXPERT_KERNELS:
            raise SimInputError(f"expert_kernels must be one of {', '.join(EXPERT_KERNELS)}, got {style!r}")
        self._kernels = style
        fused = style == "fused" and self._many_experts
        fused_cpu = style == "fused_cpu" and self._many_experts
        if fused != self.fused_experts or fused_cpu != self.fused_cpu_experts:
            self.fused_experts, self.fused_cpu_experts = fused, fused_cpu
            self._time.clear()
            self._usage.clear()

    def prepare(self, plan: Plan) -> None:
        """Called by the engine before it prices `plan`'s ops."""
        self.use_model(plan.model)
        self.use_expert_kernels(plan.expert_kernels)

    # The first GPU's, the CPU's and the first host link's rates, for analytic models of one-GPU machines.
    @property
    def gpu_flops(self) -> float:
        return self._rates["gpu"].flops

    @property
    def gpu_bw(self) -> float:
        return self._rates["gpu"].bw

    @property
    def cpu_vector_flops(self) -> float:
        return self._rates["cpu"].vector_flops

    @property
    def h2d_bw(self) -> float:
        return _link_speed(self._rates["h2d"], False)[0]

    def rates(self, stream: str) -> _Rates:
        r = self._rates.get(stream)
        if r is None:
            self.topology.unit_of(stream)  # raises, naming the system's streams
        return r

    def gemm_flops(self, op: Op) -> int:
        """The GEMM FLOPs inside an attention op of the model last given to `use_model`: MLA's up-projection
        (`sim.cost.work.absorb_flops`, from the op's query tokens in decode and keys read in prefill), never more
        than the op's FLOPs; 0 for every other op and for GQA models."""
        if not self._up_params or op.kind is not OpKind.ATTENTION:
            return 0
        per = op.kv_tokens if op.phase is Phase.PREFILL else op.tokens
        return min(2 * self._up_params * per, op.flops)

    def roofs(self, kind: OpKind, stream: str, flops: int, nbytes: int,
              gemm_flops: int = 0) -> tuple[float, float, float]:
        """(compute seconds, memory-or-link seconds, fixed overhead seconds) of an op running alone; of `flops`,
        `gemm_flops` run at the unit's GEMM rate where the rest runs at a vector rate (MLA's up-projection inside
        CPU attention)."""
        r = self.rates(stream)
        fixed = r.overhead
        if kind is OpKind.EXPERT and (self.fused_experts and r.kind is UnitKind.GPU
                                      or self.fused_cpu_experts and r.kind is UnitKind.CPU):
            fixed = 0.0  # inside the layer's fused MoE call
        if kind is OpKind.EXPERT and self.int8_experts and r.int8_flops:  # a routed expert, INT8 weights
            return flops / r.int8_flops, nbytes / r.bw, fixed
        if r.kind is UnitKind.GPU or r.kind is UnitKind.NDP:
            return flops / r.flops, nbytes / r.bw, fixed
        if r.kind is UnitKind.CPU:
            rate = r.vector_flops if kind in _CPU_VECTOR_KINDS else r.flops
            if kind is OpKind.ATTENTION:
                compute = (flops - gemm_flops) / rate + gemm_flops / r.flops if gemm_flops else flops / rate
                return compute, nbytes / r.attention_bw, r.attention_overhead
            return flops / rate, nbytes / r.bw, fixed
        return nbytes / _link_speed(r, False)[0], 0.0, r.overhead

    def seconds(self, kind: OpKind, stream: str, flops: int, nbytes: int,
                payload: Payload = Payload.NONE, gemm_flops: int = 0) -> float:
        if kind is OpKind.ROUTER and not flops and not nbytes:
            return 0.0  # a dense (one-expert) model's router is a placeholder: no kernel runs, no launch cost
        if payload in PAGEABLE_PAYLOADS and kind is OpKind.COPY:
            r = self.rates(stream)
            if r.pageable_bw:
                return nbytes / _link_speed(r, True)[0] + r.overhead
        if payload is Payload.PAGEABLE_STAGING and kind is OpKind.COPY:
            return self.staging_seconds(nbytes)
        compute, memory, fixed = self.roofs(kind, stream, flops, nbytes, gemm_flops)
        return self.busy(kind, stream, compute, memory) + fixed

    def staging_seconds(self, nbytes: int) -> float:
        """A host-side staging memcpy of `nbytes` (read and write: half of them move) into a fresh pinned buffer:
        what the host link's pageable copy takes beyond its pinned DMA, the two running one after the other in
        `general_copy` (pin, then copy). Without a host link with a pageable rate, a plain memcpy."""
        link = self._staging_link()
        if link is None:
            return nbytes / self.cpu_bw
        moved = nbytes / 2  # each capped at what host DRAM supplies (`_link_speed`), never faster than a memcpy
        return max(moved / _link_speed(link, True)[0] - moved / _link_speed(link, False)[0], nbytes / self.cpu_bw)

    def _staging_link(self) -> _Rates | None:
        h2d = self._rates.get("h2d")
        if h2d is not None and h2d.pageable_bw:
            return h2d
        return next((r for r in self._rates.values() if r.kind is UnitKind.LINK and r.pageable_bw), None)

    def overlap(self, kind: OpKind, stream: str) -> float:
        """The share of the shorter roof that hides under the longer one: the CPU's `gemm_overlap` for a GEMM on a
        CPU (1 for attention, whose rate is a measured kernel's, and on every other unit)."""
        r = self.rates(stream)
        return r.gemm_overlap if r.kind is UnitKind.CPU and kind not in _CPU_VECTOR_KINDS else 1.0

    def busy(self, kind: OpKind, stream: str, compute: float, memory: float) -> float:
        """Seconds of the two roofs together: the longer, plus what the overlap leaves of the shorter."""
        longer, shorter = (compute, memory) if compute >= memory else (memory, compute)
        overlap = self.overlap(kind, stream)
        return longer if overlap >= 1.0 else longer + (1.0 - overlap) * shorter

    def op_time_ns(self, op: Op) -> int:
        if op.members:
            raise grouped_op_error(op)
        key = (op.kind, op.stream, op.flops, op.bytes, op.payload)
        gemm = self.gemm_flops(op) if self._up_params else 0
        if gemm:
            key = (*key, gemm)
        hit = self._time.get(key)
        if hit is None:
            hit = self._time[key] = seconds_to_ns(self.seconds(op.kind, op.stream, op.flops, op.bytes, op.payload,
                                                               gemm))
        return hit

    def usage(self, op: Op) -> tuple[float, float]:
        """Shares of the unit's (own, memory) resources the op keeps busy when it runs alone: the binding roof
        at 1, the other in proportion. The fixed overhead scales with the op's speed."""
        if op.members:  # a group's usage is its members' in turn (`GroupPrices.parts`)
            raise grouped_op_error(op)
        key = (op.kind, op.stream, op.flops, op.bytes, op.payload)
        gemm = self.gemm_flops(op) if self._up_params else 0
        if gemm:
            key = (*key, gemm)
        hit = self._usage.get(key)
        if hit is None:
            r = self.rates(op.stream)
            if r.kind is UnitKind.LINK:  # the link at its rate; a host DMA draws host DRAM at that pace
                speed, draw = _link_speed(r, op.payload in PAGEABLE_PAYLOADS and bool(r.pageable_bw))
                memory = speed * draw / r.memory_bw if r.memory_bw else 0.0
                hit = (speed / r.bw, memory) if op.bytes else (0.0, 0.0)
            elif op.payload is Payload.PAGEABLE_STAGING and op.kind is OpKind.COPY:  # one thread, DRAM at its pace
                seconds = self.staging_seconds(op.bytes)
                hit = (0.0, min(1.0, op.bytes / seconds / r.bw)) if op.bytes and seconds > 0 else (0.0, 0.0)
            else:
                compute, memory, _ = self.roofs(op.kind, op.stream, op.flops, op.bytes, gemm)
                top = self.busy(op.kind, op.stream, compute, memory)
                if r.kind is UnitKind.CPU:  # the share of the DRAM's capacity, whatever rate the kernel reaches
                    memory = op.bytes / r.bw
                hit = (compute / top, memory / top) if top > 0 else (0.0, 0.0)
            self._usage[key] = hit
        return hit

    def bound(self, op: Op) -> str:
        """'compute', 'memory' or 'transfer': which roof sets the op's time."""
        if op.members:
            raise grouped_op_error(op)
        if self.rates(op.stream).kind is UnitKind.LINK:
            return "transfer"
        compute, memory, _ = self.roofs(op.kind, op.stream, op.flops, op.bytes, self.gemm_flops(op))
        return "compute" if compute >= memory else "memory"
