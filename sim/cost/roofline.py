"""Roofline cost model: time = max(FLOPs / achievable peak, bytes / achievable bandwidth) + fixed overhead.

This is the default `CostModel`. Besides an op's standalone time it reports how much of two shared resources the
op uses while running alone: (compute, memory) for the GPU (SMs, HBM) and the CPU (cores, host DRAM), (link,
host DRAM) for a PCIe direction, whose DMA reads or writes host memory at the link's rate. The engine uses these
usages to share resources fairly between concurrent streams (host DRAM is one resource for the CPU and both
PCIe directions). A measured profile (issue 4) plugs in through the same two methods.
"""

from __future__ import annotations

import math
from typing import Protocol

from sim.plan import DEVICE_OF, PAGEABLE_PAYLOADS, Device, Op, OpKind, Payload, Stream
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
        self.cpu_attention_bw = cpu.attention_bytes_per_s
        self.cpu_overhead = cpu.op_overhead_s
        self.h2d_bw = link.h2d_bytes_per_s * link.h2d_efficiency
        self.d2h_bw = link.d2h_bytes_per_s * link.d2h_efficiency
        self.pageable_h2d_bw = self.h2d_bw * link.pageable_ratio
        self.pageable_d2h_bw = self.d2h_bw * link.pageable_ratio
        self._pageable = {Device.H2D: self.pageable_h2d_bw, Device.D2H: self.pageable_d2h_bw}
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
            bw = self.cpu_attention_bw if kind is OpKind.ATTENTION else self.cpu_bw
            return flops / rate, nbytes / bw, self.cpu_overhead
        bw = self.h2d_bw if device is Device.H2D else self.d2h_bw
        return nbytes / bw, 0.0, self.link_latency

    def seconds(self, kind: OpKind, stream: Stream, flops: int, nbytes: int,
                payload: Payload = Payload.NONE) -> float:
        if kind is OpKind.ROUTER and not flops and not nbytes:
            return 0.0  # a dense (one-expert) model's router is a placeholder: no kernel runs, no launch cost
        if payload in PAGEABLE_PAYLOADS and kind is OpKind.COPY:
            bw = self._pageable_bw(DEVICE_OF[stream])
            if bw:
                return nbytes / bw + self.link_latency
        compute, memory, fixed = self.roofs(kind, stream, flops, nbytes)
        return max(compute, memory) + fixed

    def _pageable_bw(self, device: Device) -> float:
        """A copy's rate when host memory is pageable (0 for devices that are not a PCIe direction)."""
        return self._pageable.get(device, 0.0)

    def op_time_ns(self, op: Op) -> int:
        key = (op.kind, op.stream, op.flops, op.bytes, op.payload)
        hit = self._time.get(key)
        if hit is None:
            hit = self._time[key] = seconds_to_ns(self.seconds(op.kind, op.stream, op.flops, op.bytes, op.payload))
        return hit

    def usage(self, op: Op) -> tuple[float, float]:
        """Shares of the device's (compute, memory) resources the op keeps busy when it runs alone: the
        binding roof at 1, the other in proportion. The fixed overhead scales with the op's speed."""
        key = (op.kind, op.stream, op.flops, op.bytes, op.payload)
        hit = self._usage.get(key)
        if hit is None:
            device = DEVICE_OF[op.stream]
            if device in (Device.H2D, Device.D2H):  # the link at full rate; DMA draws that rate from host DRAM
                full_bw = self.h2d_bw if device is Device.H2D else self.d2h_bw
                link_bw = dram_bytes_per_s = full_bw
                if op.payload in PAGEABLE_PAYLOADS:  # bounce buffer: 3 passes over DRAM (memcpy read + write, DMA)
                    link_bw = self._pageable_bw(device)
                    dram_bytes_per_s = 3 * link_bw
                hit = (link_bw / full_bw, min(1.0, dram_bytes_per_s / self.cpu_bw)) if op.bytes else (0.0, 0.0)
            else:
                compute, memory, _ = self.roofs(op.kind, op.stream, op.flops, op.bytes)
                top = max(compute, memory)
                if device is Device.CPU:  # the share of the DRAM's capacity, whatever rate the kernel reaches
                    memory = op.bytes / self.cpu_bw
                hit = (compute / top, memory / top) if top > 0 else (0.0, 0.0)
            self._usage[key] = hit
        return hit

    def bound(self, op: Op) -> str:
        """'compute', 'memory' or 'transfer': which roof sets the op's time."""
        if DEVICE_OF[op.stream] in (Device.H2D, Device.D2H):
            return "transfer"
        compute, memory, _ = self.roofs(op.kind, op.stream, op.flops, op.bytes)
        return "compute" if compute >= memory else "memory"
