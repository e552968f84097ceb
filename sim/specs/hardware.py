"""Hardware specifications: a GPU, a CPU socket, a host link, an NDP DIMM tier, and the system that composes them.

Every rate and size carries its unit in its name. Peak (datasheet) rates and achievable efficiencies are
separate fields, so a what-if on the peak never silently changes the measured efficiency. `sources` maps a
field name to where its number comes from.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from sim.errors import SimInputError
from sim.specs.config import SPEC_CONFIG

# What physics (and int64 nanosecond clocks) allow, by unit: a number outside is a typo, not a machine.
RANGES = {"flops_per_s": (1e6, 1e18), "bytes_per_s": (1e3, 1e16), "bytes": (1, 2**60), "cores": (1, 65536),
          "_s": (0.0, 1.0)}


def _range_of(name: str) -> tuple[float, float]:
    for suffix, bounds in RANGES.items():
        if name.endswith(suffix):
            return bounds
    raise KeyError(name)


def _check_positive(owner: str, obj: object, names: list[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise SimInputError(f"{owner}: {name} must be positive, got {value}")
        low, high = _range_of(name)
        if not low <= value <= high:
            raise SimInputError(f"{owner}: {name} must be in [{low:g}, {high:g}], got {_shown(value)}")


def _shown(value: float) -> str:
    """A number for a message: %g, or how long an integer too large for a float is."""
    try:
        return f"{value:g}"
    except OverflowError:
        return f"an integer of {len(str(value))} digits"


def _check_fraction(owner: str, obj: object, names: list[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0 < value <= 1:
            raise SimInputError(f"{owner}: {name} must be in (0, 1], got {value}")


@dataclass(frozen=True)
class GPUSpec:
    """One GPU: dense BF16 tensor-core peak, HBM capacity and bandwidth, and achievable fractions."""

    __pydantic_config__ = SPEC_CONFIG  # checked by sim.specs.schema at the boundary

    name: str
    bf16_flops_per_s: float
    hbm_bytes: int
    hbm_bytes_per_s: float
    gemm_efficiency: float
    hbm_efficiency: float
    kernel_launch_s: float
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    # Dense INT8 tensor-core peak (0: no INT8 path; INT8 experts then run at the BF16 rate).
    int8_ops_per_s: float = 0.0

    @property
    def int8_gemm_ops_per_s(self) -> float:
        """Achievable INT8 GEMM rate: the INT8 peak at the BF16 GEMM's measured fraction ([assumed]: no INT8
        GEMM measurement per part), or the BF16 rate where the part has no INT8 path."""
        return (self.int8_ops_per_s or self.bf16_flops_per_s) * self.gemm_efficiency

    def __post_init__(self) -> None:
        _check_positive(f"gpu {self.name}", self, ["bf16_flops_per_s", "hbm_bytes", "hbm_bytes_per_s"])
        if self.int8_ops_per_s < 0:
            raise SimInputError(f"gpu {self.name}: int8_ops_per_s must be >= 0")
        low, high = RANGES["flops_per_s"]
        if self.int8_ops_per_s and not low <= self.int8_ops_per_s <= high:  # 0: no INT8 path
            raise SimInputError(f"gpu {self.name}: int8_ops_per_s must be 0 or in [{low:g}, {high:g}], got "
                                f"{_shown(self.int8_ops_per_s)}")
        _check_fraction(f"gpu {self.name}", self, ["gemm_efficiency", "hbm_efficiency"])
        if not 0 <= self.kernel_launch_s <= 1:
            raise SimInputError(f"gpu {self.name}: kernel_launch_s must be in [0, 1] s")


# Intel's ISA: AMX's TDPBUSD does 1024 INT8 multiply-adds per cycle per core against TDPBF16PS's 512: INT8 GEMMs run
# at twice the BF16 rate (at the BF16 path's measured efficiency, [assumed]). Without AMX an INT8 GEMM keeps the
# preset's GEMM rate: AVX-512 VNNI would double native AVX512-BF16, but the non-AMX presets (Haswell, Cascade Lake)
# have no native BF16 to double, and no INT8 measurement of them was found.
CPU_INT8_OVER_BF16 = 2.0


@dataclass(frozen=True)
class CPUSpec:
    """One CPU socket: cores, AMX and AVX-512 BF16 peaks, DRAM bandwidth, achievable fractions. `cores` describes
    the part; no cost reads it (the peaks already count the cores), so `--set cpu.cores` is refused."""

    __pydantic_config__ = SPEC_CONFIG  # checked by sim.specs.schema at the boundary

    name: str
    cores: int
    has_amx: bool
    amx_bf16_flops_per_s: float
    avx512_bf16_flops_per_s: float
    dram_bytes_per_s: float
    amx_efficiency: float
    avx512_efficiency: float
    dram_efficiency: float
    op_overhead_s: float
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    # Decode attention's KV streaming rate as a fraction of the DRAM peak, where a measured kernel reaches less
    # than the DRAM itself can deliver (0: dram_efficiency). The DRAM's capacity stays dram_efficiency.
    attention_stream_efficiency: float = 0.0
    # How much of a CPU GEMM's shorter roof (weight streaming or compute) hides under the longer one: 1 is the
    # roofline's max() (full overlap, the default), 0 their sum (the kernel streams, then computes). Published and
    # measured CPU expert kernels sit between (docs/cost-model.md, "CPU expert kernels by shape").
    gemm_overlap: float = 1.0
    # A CPU attention call's fixed cost where a measured kernel has its own (MoE-Lightning's thread-pool dispatch:
    # 364 us); None: op_overhead_s, as every other CPU op.
    attention_overhead_s: float | None = None

    def __post_init__(self) -> None:
        _check_positive(f"cpu {self.name}", self, ["cores", "avx512_bf16_flops_per_s", "dram_bytes_per_s"])
        _check_fraction(f"cpu {self.name}", self, ["avx512_efficiency", "dram_efficiency"])
        if not 0 <= self.gemm_overlap <= 1:
            raise SimInputError(f"cpu {self.name}: gemm_overlap must be in [0, 1], got {self.gemm_overlap}")
        if self.attention_stream_efficiency:
            _check_fraction(f"cpu {self.name}", self, ["attention_stream_efficiency"])
            if self.attention_stream_efficiency > self.dram_efficiency:
                raise SimInputError(f"cpu {self.name}: attention_stream_efficiency cannot exceed dram_efficiency")
        if self.has_amx:
            _check_positive(f"cpu {self.name}", self, ["amx_bf16_flops_per_s"])
            _check_fraction(f"cpu {self.name}", self, ["amx_efficiency"])
        if not 0 <= self.op_overhead_s <= 1:
            raise SimInputError(f"cpu {self.name}: op_overhead_s must be in [0, 1] s")
        if self.attention_overhead_s is not None and not 0 <= self.attention_overhead_s <= 1:
            raise SimInputError(f"cpu {self.name}: attention_overhead_s must be in [0, 1] s")

    @property
    def attention_call_s(self) -> float:
        """The fixed cost of one CPU attention call."""
        return self.op_overhead_s if self.attention_overhead_s is None else self.attention_overhead_s

    @property
    def gemm_flops_per_s(self) -> float:
        """Achievable BF16 GEMM rate: AMX where present, else AVX-512."""
        if self.has_amx:
            return self.amx_bf16_flops_per_s * self.amx_efficiency
        return self.avx512_bf16_flops_per_s * self.avx512_efficiency

    @property
    def int8_gemm_ops_per_s(self) -> float:
        """Achievable INT8 GEMM rate: CPU_INT8_OVER_BF16 times the BF16 GEMM rate with AMX, else the GEMM rate."""
        return (CPU_INT8_OVER_BF16 if self.has_amx else 1.0) * self.gemm_flops_per_s

    @property
    def attention_bytes_per_s(self) -> float:
        """Achievable KV streaming rate of CPU attention."""
        return self.dram_bytes_per_s * (self.attention_stream_efficiency or self.dram_efficiency)

    @property
    def vector_flops_per_s(self) -> float:
        """Achievable AVX-512 BF16 rate (attention's softmax and GEMV-shaped work)."""
        return self.avx512_bf16_flops_per_s * self.avx512_efficiency


@dataclass(frozen=True)
class LinkSpec:
    """Host-device link, per direction (PCIe is full duplex)."""

    __pydantic_config__ = SPEC_CONFIG  # checked by sim.specs.schema at the boundary

    name: str
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    h2d_efficiency: float
    d2h_efficiency: float
    latency_s: float
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    # Host-to-device rate from pageable memory as a fraction of the pinned rate (1: no penalty).
    pageable_ratio: float = 1.0

    def __post_init__(self) -> None:
        _check_positive(f"link {self.name}", self, ["h2d_bytes_per_s", "d2h_bytes_per_s"])
        _check_fraction(f"link {self.name}", self, ["h2d_efficiency", "d2h_efficiency", "pageable_ratio"])
        if not 0 <= self.latency_s <= 1:
            raise SimInputError(f"link {self.name}: latency_s must be in [0, 1] s")


@dataclass(frozen=True)
class NDPSpec:
    """A near-memory-processing DIMM tier: `dimms` modules in host DIMM slots (their memory is part of host DRAM),
    each with a compute core that reads its own ranks at `dimm_internal_bytes_per_s`, faster together than
    the host's channels. An op on the tier uses every DIMM (weights interleaved across them)."""

    __pydantic_config__ = SPEC_CONFIG  # checked by sim.specs.schema at the boundary

    name: str
    dimms: int
    dimm_bytes: int
    dimm_flops_per_s: float
    dimm_internal_bytes_per_s: float
    compute_efficiency: float
    internal_efficiency: float
    launch_s: float
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check_positive(f"ndp {self.name}", self, ["dimm_bytes", "dimm_flops_per_s",
                                                   "dimm_internal_bytes_per_s"])
        if not 1 <= self.dimms <= 64:
            raise SimInputError(f"ndp {self.name}: dimms must be in [1, 64], got {self.dimms}")
        _check_fraction(f"ndp {self.name}", self, ["compute_efficiency", "internal_efficiency"])
        if not 0 <= self.launch_s <= 1:
            raise SimInputError(f"ndp {self.name}: launch_s must be in [0, 1] s")

    @property
    def flops_per_s(self) -> float:
        """Achievable compute of the whole tier."""
        return self.dimms * self.dimm_flops_per_s * self.compute_efficiency

    @property
    def internal_bytes_per_s(self) -> float:
        """Achievable near-memory bandwidth of the whole tier."""
        return self.dimms * self.dimm_internal_bytes_per_s * self.internal_efficiency

    @property
    def capacity_bytes(self) -> int:
        return self.dimms * self.dimm_bytes


@dataclass(frozen=True)
class DiskSpec:
    """A storage tier behind the host (an NVMe SSD): its capacity and its sequential read and write rates as an
    offloading runtime reaches them through host memory (the bytes land in or leave host DRAM, which the
    transfers draw from)."""

    __pydantic_config__ = SPEC_CONFIG  # checked by sim.specs.schema at the boundary

    name: str
    capacity_bytes: int
    read_bytes_per_s: float
    write_bytes_per_s: float
    read_efficiency: float
    write_efficiency: float
    latency_s: float
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check_positive(f"disk {self.name}", self, ["capacity_bytes", "read_bytes_per_s", "write_bytes_per_s"])
        _check_fraction(f"disk {self.name}", self, ["read_efficiency", "write_efficiency"])
        if not 0 <= self.latency_s <= 1:
            raise SimInputError(f"disk {self.name}: latency_s must be in [0, 1] s")


@dataclass(frozen=True)
class ExtraGPUSpec:
    """A GPU beyond the first: its name (its stream and memory pool), its spec, its own host link (each GPU of
    a multi-GPU server has its own x16 slot) and the memory its runtime reserves."""

    __pydantic_config__ = SPEC_CONFIG  # checked by sim.specs.schema at the boundary

    name: str
    gpu: GPUSpec
    link: LinkSpec
    reserved_bytes: int

    def __post_init__(self) -> None:
        if not 0 <= self.reserved_bytes < self.gpu.hbm_bytes:
            raise SimInputError(f"extra gpu {self.name}: reserved_bytes must be in [0, hbm_bytes)")


@dataclass(frozen=True)
class PeerLinkSpec:
    """A GPU-to-GPU link with bandwidth of its own (NVLink, NVSwitch): `link.h2d_*` is the src -> dst direction
    and `link.d2h_*` the dst -> src one. Its copies contend with nothing but each other; PCIe peer-to-peer through
    a switch, which shares the GPUs' own x16 links with their host copies, is not modelled by it."""

    __pydantic_config__ = SPEC_CONFIG  # checked by sim.specs.schema at the boundary

    src: str
    dst: str
    link: LinkSpec


GPU_NAME = r"gpu[1-9][0-9]?"  # the first GPU is "gpu"; more are gpu1, gpu2, ...


@dataclass(frozen=True)
class SystemSpec:
    """A machine: one GPU and one CPU socket joined by a host link, plus DRAM capacity and reservations;
    optionally more GPUs (each with its own host link), peer links between GPUs, a near-memory DIMM tier and a
    disk (`sim/topology.py`)."""

    __pydantic_config__ = SPEC_CONFIG  # checked by sim.specs.schema at the boundary

    name: str
    gpu: GPUSpec
    cpu: CPUSpec
    link: LinkSpec
    dram_bytes: int
    gpu_reserved_bytes: int
    dram_reserved_bytes: int
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    extra_gpus: tuple[ExtraGPUSpec, ...] = ()
    peer_links: tuple[PeerLinkSpec, ...] = ()
    ndp: NDPSpec | None = None  # a near-memory DIMM tier in the host's slots
    disk: DiskSpec | None = None  # a storage tier behind the host (weights or KV cache offloaded past DRAM)

    def __post_init__(self) -> None:
        _check_positive(f"system {self.name}", self, ["dram_bytes"])
        gpus = ["gpu"]
        for extra in self.extra_gpus:
            if not re.fullmatch(GPU_NAME, extra.name) or extra.name in gpus:
                raise SimInputError(f"system {self.name}: extra GPU name {extra.name!r} must be gpu1, gpu2, ... "
                                    "and unique")
            gpus.append(extra.name)
        pairs = set()
        for peer in self.peer_links:
            if peer.src not in gpus or peer.dst not in gpus or peer.src == peer.dst:
                raise SimInputError(f"system {self.name}: peer link {peer.src!r} -> {peer.dst!r} must join two of "
                                    f"its GPUs ({', '.join(gpus)})")
            pair = frozenset((peer.src, peer.dst))
            if pair in pairs:
                raise SimInputError(f"system {self.name}: two peer links join {peer.src} and {peer.dst}")
            pairs.add(pair)
        if self.ndp is not None and self.ndp.capacity_bytes > self.dram_bytes:
            raise SimInputError(f"system {self.name}: its NDP DIMMs hold {self.ndp.capacity_bytes / 2**30:.0f} GiB, "
                                f"more than its {self.dram_bytes / 2**30:.0f} GiB of DRAM (they are part of it)")
        if not 0 <= self.gpu_reserved_bytes < self.gpu.hbm_bytes:
            raise SimInputError(f"system {self.name}: gpu_reserved_bytes must be in [0, hbm_bytes)")
        if not 0 <= self.dram_reserved_bytes < self.dram_bytes:
            raise SimInputError(f"system {self.name}: dram_reserved_bytes must be in [0, dram_bytes)")

    @property
    def gpu_usable_bytes(self) -> int:
        return self.gpu.hbm_bytes - self.gpu_reserved_bytes

    @property
    def gpu_names(self) -> tuple[str, ...]:
        return ("gpu", *(extra.name for extra in self.extra_gpus))

    @property
    def dram_usable_bytes(self) -> int:
        return self.dram_bytes - self.dram_reserved_bytes


def to_dict(spec: object) -> dict:
    """A spec as plain, YAML-ready data (nested specs inline)."""
    return dataclasses.asdict(spec)
