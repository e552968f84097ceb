"""The machine as the engines see it: units that work contends for, the streams (in-order queues) on each, the
resource groups whose ops share rates, and the memory pools.

A `SystemSpec` (one GPU, one CPU socket, one host link; optionally more GPUs with their own host links and peer
links between GPUs) becomes a `Topology`:

- a *unit* is one physical thing ops run on: a GPU's SMs, a CPU socket's cores, one direction of a link;
- a *stream* runs on one unit (`gpu`, `cpu` and `cpu_experts` on the cores, `h2d` and `h2d_act` on the host
  link's host-to-device direction, ...), one op at a time in plan order;
- a *group* is the set of resources its units' ops share at fair rates: each GPU with its HBM; the host, whose
  DRAM the CPU cores and every host-link DMA draw from; each peer link; a near-memory DIMM tier (`ndp`), whose
  cores read their own ranks (the traffic on the host's memory channels is not charged to it);
- a *pool* is a memory capacity ops allocate from (`gpu`, `gpu1`, ..., `cpu`, and `disk` where the system has
  one: its `disk_read` and `disk_write` streams move bytes between it and host DRAM, in the host group).

The one-GPU machine has the streams, units and groups the plan format always had, in the same order, so plans
and results are unchanged. Unit kinds (`gpu`, `cpu`, `link`) pick the cost model's formula; the unit's own spec
gives the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

from sim.errors import SimInputError
from sim.specs import GPUSpec, LinkSpec, SystemSpec


class UnitKind(StrEnum):
    GPU = "gpu"
    CPU = "cpu"
    LINK = "link"
    NDP = "ndp"  # near-memory compute on DIMMs: its own cores and rank bandwidth; its memory is host DRAM


@dataclass(frozen=True)
class LinkDirection:
    """One direction of a link: its rate, efficiency, per-transfer latency and pageable-memory ratio. `src` and
    `dst` name the pools the bytes leave and enter."""

    name: str
    src: str
    dst: str
    bytes_per_s: float
    efficiency: float
    latency_s: float
    pageable_ratio: float = 1.0
    memory_cap_bytes_per_s: float = math.inf  # a peer link: what the slower end's memory can read or write

    @property
    def achievable_bytes_per_s(self) -> float:
        return min(self.bytes_per_s * self.efficiency, self.memory_cap_bytes_per_s)


@dataclass(frozen=True)
class Unit:
    """A unit ops run on. `first` is the index of its own resource (SMs, cores, link direction) in its group's
    resource vector and `memory` that of the memory it draws (HBM, host DRAM; -1: none)."""

    name: str
    kind: UnitKind
    group: str
    first: int
    memory: int
    pool: str
    spec: Any = field(compare=False)

    def usage_vector(self, usage: tuple[float, float], size: int) -> tuple[float, ...]:
        """An op's (own resource, memory) shares placed in its group's resource vector of `size` entries."""
        if size == 2 and self.first == 0 and self.memory == 1:
            return usage
        vec = [0.0] * size
        vec[self.first] = usage[0]
        if self.memory >= 0:
            vec[self.memory] = usage[1]
        return tuple(vec)


@dataclass(frozen=True)
class Topology:
    """Units, streams (name -> unit, in a fixed order), group sizes and usable pool bytes of one system."""

    system_name: str
    units: dict[str, Unit]
    streams: dict[str, Unit]
    group_sizes: dict[str, int]
    pools: dict[str, int]
    host_memory_bytes_per_s: float  # the host DRAM all host-group units draw from (achievable)

    def unit_of(self, stream: str) -> Unit:
        try:
            return self.streams[stream]
        except KeyError:
            raise SimInputError(f"stream {stream!r} does not exist on system {self.system_name} (streams: "
                                f"{', '.join(self.streams)})") from None

    def stream_order(self) -> tuple[str, ...]:
        return tuple(self.streams)




def _host_link(gpu_pool: str, suffix: str, link: LinkSpec) -> tuple[LinkDirection, LinkDirection]:
    h2d = LinkDirection(f"{link.name}_h2d{suffix}", "cpu", gpu_pool, link.h2d_bytes_per_s, link.h2d_efficiency,
                        link.latency_s, link.pageable_ratio)
    d2h = LinkDirection(f"{link.name}_d2h{suffix}", gpu_pool, "cpu", link.d2h_bytes_per_s, link.d2h_efficiency,
                        link.latency_s, link.pageable_ratio)
    return h2d, d2h


@lru_cache(maxsize=64)
def topology_of(system: SystemSpec) -> Topology:
    """The topology of a system (cached: specs are frozen; a sweep over many systems keeps the last 64)."""
    units: dict[str, Unit] = {}
    streams: dict[str, Unit] = {}
    groups: dict[str, int] = {"gpu": 2, "host": 2}  # (SMs, HBM); (cores, DRAM) + one entry per link direction
    pools = {"gpu": system.gpu_usable_bytes, "cpu": system.dram_usable_bytes}

    def add_gpu(name: str, spec: GPUSpec) -> Unit:
        groups.setdefault(name, 2)
        return Unit(name, UnitKind.GPU, name, 0, 1, name, spec)

    def add_host_direction(direction: LinkDirection, unit_name: str) -> Unit:
        index = groups["host"]
        groups["host"] += 1
        return Unit(unit_name, UnitKind.LINK, "host", index, 1, direction.dst, direction)

    gpu = units["gpu"] = add_gpu("gpu", system.gpu)
    cpu = units["cpu"] = Unit("cpu", UnitKind.CPU, "host", 0, 1, "cpu", system.cpu)
    h2d, d2h = _host_link("gpu", "", system.link)
    units["pcie_h2d"] = add_host_direction(h2d, "pcie_h2d")
    units["pcie_d2h"] = add_host_direction(d2h, "pcie_d2h")
    streams.update(gpu=gpu, cpu=cpu, cpu_experts=cpu, h2d=units["pcie_h2d"], h2d_act=units["pcie_h2d"],
                   d2h=units["pcie_d2h"])
    for extra in system.extra_gpus:
        name = extra.name
        pools[name] = extra.gpu.hbm_bytes - extra.reserved_bytes
        units[name] = add_gpu(name, extra.gpu)
        e_h2d, e_d2h = _host_link(name, name, extra.link)
        units[f"pcie_h2d_{name}"] = add_host_direction(e_h2d, f"pcie_h2d_{name}")
        units[f"pcie_d2h_{name}"] = add_host_direction(e_d2h, f"pcie_d2h_{name}")
        streams[name] = units[name]
        streams[f"h2d_{name}"] = units[f"pcie_h2d_{name}"]
        streams[f"d2h_{name}"] = units[f"pcie_d2h_{name}"]
    gpu_specs = {"gpu": system.gpu, **{extra.name: extra.gpu for extra in system.extra_gpus}}
    for peer in system.peer_links:
        group = f"peer_{peer.src}_{peer.dst}"
        # one resource per direction; the HBM either end reads or writes is not shared with the GPUs' own ops, but
        # no copy moves faster than the slower end's memory (a link spec faster than HBM is capped, not trusted)
        groups[group] = 2
        cap = min(gpu_specs[g].hbm_bytes_per_s * gpu_specs[g].hbm_efficiency for g in (peer.src, peer.dst))
        link = peer.link
        fwd = LinkDirection(f"{link.name}_{peer.src}_{peer.dst}", peer.src, peer.dst, link.h2d_bytes_per_s,
                            link.h2d_efficiency, link.latency_s, memory_cap_bytes_per_s=cap)
        bwd = LinkDirection(f"{link.name}_{peer.dst}_{peer.src}", peer.dst, peer.src, link.d2h_bytes_per_s,
                            link.d2h_efficiency, link.latency_s, memory_cap_bytes_per_s=cap)
        for index, direction in enumerate((fwd, bwd)):
            stream = f"p2p_{direction.src}_{direction.dst}"
            units[stream] = Unit(stream, UnitKind.LINK, group, index, -1, direction.dst, direction)
            streams[stream] = units[stream]
    if system.disk is not None:  # a storage tier: reads land in host DRAM, writes leave it (both draw on it)
        disk = system.disk
        pools["disk"] = disk.capacity_bytes
        read = LinkDirection(f"{disk.name}_read", "disk", "cpu", disk.read_bytes_per_s, disk.read_efficiency,
                             disk.latency_s)
        write = LinkDirection(f"{disk.name}_write", "cpu", "disk", disk.write_bytes_per_s, disk.write_efficiency,
                              disk.latency_s)
        units["disk_read"] = streams["disk_read"] = add_host_direction(read, "disk_read")
        units["disk_write"] = streams["disk_write"] = add_host_direction(write, "disk_write")
    if system.ndp is not None:  # weights it computes on live in host DRAM (the `cpu` pool)
        groups["ndp"] = 2  # (cores, rank bandwidth): inside the DIMMs, apart from the host's channels
        units["ndp"] = streams["ndp"] = Unit("ndp", UnitKind.NDP, "ndp", 0, 1, "cpu", system.ndp)
    host_bw = system.cpu.dram_bytes_per_s * system.cpu.dram_efficiency
    return Topology(system.name, units, streams, groups, pools, host_bw)
