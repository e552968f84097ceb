"""Roofline cost model: time = max(FLOPs / achievable peak, bytes / achievable bandwidth) + fixed overhead.

This is the default `CostModel`. A measured profile (issue 4) plugs in through the same `op_time_ns`
signature, falling back to this model outside its grid.
"""

from __future__ import annotations

import math
from typing import Protocol

from sim.plan import Op, OpKind, Stream
from sim.specs import SystemSpec

_CPU_VECTOR_KINDS = frozenset({OpKind.ATTENTION, OpKind.EMBED})


class CostModel(Protocol):
    """Anything that prices an op in integer nanoseconds."""

    def op_time_ns(self, op: Op) -> int: ...


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
        self._cache: dict[tuple, int] = {}

    def seconds(self, kind: OpKind, stream: Stream, flops: int, nbytes: int) -> float:
        if stream is Stream.GPU:
            return max(flops / self.gpu_flops, nbytes / self.gpu_bw) + self.gpu_overhead
        if stream is Stream.CPU:
            rate = self.cpu_vector_flops if kind in _CPU_VECTOR_KINDS else self.cpu_gemm_flops
            return max(flops / rate, nbytes / self.cpu_bw) + self.cpu_overhead
        if stream is Stream.H2D:
            return nbytes / self.h2d_bw + self.link_latency
        return nbytes / self.d2h_bw + self.link_latency

    def op_time_ns(self, op: Op) -> int:
        key = (op.kind, op.stream, op.flops, op.bytes)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = seconds_to_ns(self.seconds(op.kind, op.stream, op.flops, op.bytes))
        return hit

    def bound(self, op: Op) -> str:
        """'compute', 'memory' or 'transfer': which roof sets the op's time."""
        if op.stream in (Stream.H2D, Stream.D2H):
            return "transfer"
        if op.stream is Stream.GPU:
            return "compute" if op.flops / self.gpu_flops >= op.bytes / self.gpu_bw else "memory"
        rate = self.cpu_vector_flops if op.kind in _CPU_VECTOR_KINDS else self.cpu_gemm_flops
        return "compute" if op.flops / rate >= op.bytes / self.cpu_bw else "memory"
