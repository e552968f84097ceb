"""Roofline cost model: time = max(FLOPs / achievable peak, bytes / achievable bandwidth) + fixed overhead.

This is the default `CostModel`. Besides an op's standalone time it reports how much of its device's two
shared resources the op uses while running alone: (compute, memory) for the GPU (SMs, HBM) and the CPU (cores,
DRAM), (link, 0) for a PCIe direction. The engine uses these usages to share a device fairly between
concurrent streams. A measured profile (issue 4) plugs in through the same two methods.
"""

from __future__ import annotations

import math
from typing import Protocol

from sim.plan import DEVICE_OF, Device, Op, OpKind, Stream
from sim.specs import SystemSpec

_CPU_VECTOR_KINDS = frozenset({OpKind.ATTENTION, OpKind.EMBED})


class CostModel(Protocol):
    """Anything that prices an op in integer nanoseconds and says what it uses of its device."""

    def op_time_ns(self, op: Op) -> int: ...

    def usage(self, op: Op) -> tuple[float, float]: ...


def seconds_to_ns(seconds: float) -> int:
    return int(math.ceil(seconds * 1e9))


class RooflineCostModel:
    """Prices ops from the system spec; look-ups are memoised on (kind, stream, flops, bytes)."""

    def __init__(self, system: SystemSpec):
        gpu, cpu, link = system.gpu, system.cpu, system.link
        self.gpu_flops = gpu.bf16_flops_per_s * gpu.gemm_efficiency
        self.gpu_bw = gpu.hbm_bytes_per_s * gpu.hbm_efficiency
        self.gpu_overhead = gpu.kernel_launch_s
        self.cpu_gemm_flops = cpu.gemm_flops_per_s
        self.cpu_vector_flops = cpu.vector_flops_per_s
        self.cpu_bw = cpu.dram_bytes_per_s * cpu.dram_efficiency
        self.cpu_overhead = cpu.op_overhead_s
        self.h2d_bw = link.h2d_bytes_per_s * link.h2d_efficiency
        self.d2h_bw = link.d2h_bytes_per_s * link.d2h_efficiency
        self.link_latency = link.latency_s
        self._time: dict[tuple, int] = {}
        self._usage: dict[tuple, tuple[float, float]] = {}

    def roofs(self, kind: OpKind, stream: Stream, flops: int, nbytes: int) -> tuple[float, float, float]:
        """(compute seconds, memory-or-link seconds, fixed overhead seconds) of an op running alone."""
        device = DEVICE_OF[stream]
        if device is Device.GPU:
            return flops / self.gpu_flops, nbytes / self.gpu_bw, self.gpu_overhead
        if device is Device.CPU:
            rate = self.cpu_vector_flops if kind in _CPU_VECTOR_KINDS else self.cpu_gemm_flops
            return flops / rate, nbytes / self.cpu_bw, self.cpu_overhead
        bw = self.h2d_bw if device is Device.H2D else self.d2h_bw
        return nbytes / bw, 0.0, self.link_latency

    def seconds(self, kind: OpKind, stream: Stream, flops: int, nbytes: int) -> float:
        compute, memory, fixed = self.roofs(kind, stream, flops, nbytes)
        return max(compute, memory) + fixed

    def op_time_ns(self, op: Op) -> int:
        key = (op.kind, op.stream, op.flops, op.bytes)
        hit = self._time.get(key)
        if hit is None:
            hit = self._time[key] = seconds_to_ns(self.seconds(op.kind, op.stream, op.flops, op.bytes))
        return hit

    def usage(self, op: Op) -> tuple[float, float]:
        """Shares of the device's (compute, memory) resources the op keeps busy when it runs alone: the
        binding roof at 1, the other in proportion. The fixed overhead scales with the op's speed."""
        key = (op.kind, op.stream, op.flops, op.bytes)
        hit = self._usage.get(key)
        if hit is None:
            compute, memory, _ = self.roofs(op.kind, op.stream, op.flops, op.bytes)
            top = max(compute, memory)
            hit = (compute / top, memory / top) if top > 0 else (0.0, 0.0)
            self._usage[key] = hit
        return hit

    def bound(self, op: Op) -> str:
        """'compute', 'memory' or 'transfer': which roof sets the op's time."""
        if DEVICE_OF[op.stream] in (Device.H2D, Device.D2H):
            return "transfer"
        compute, memory, _ = self.roofs(op.kind, op.stream, op.flops, op.bytes)
        return "compute" if compute >= memory else "memory"
