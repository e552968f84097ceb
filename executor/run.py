"""Run a plan for real and time every op: one host thread per stream, ops in plan order, deps honoured.

Compute ops run the layer math (`executor.interpret`) on the device their stream names: CPU streams on the
CPU (oneDNN picks AMX for bf16 GEMMs where the CPU has it); GPU-stream ops on CUDA when it is available.
Near-memory (NDP) ops always run emulated on the CPU, and the result says so (`ndp_emulated`).
Without CUDA, GPU-stream ops run on the CPU and the result says so (`gpu_role_on_cpu`): such timings are
never GPU timings. Copies move buffers of the plan's byte counts (pinned host memory to and from the GPU)
on their own CUDA streams; without CUDA they take no time and are recorded as such. A copy on a CPU stream (a
host-side staging copy, as MoE-Lightning pages expert weights into pinned memory) copies its bytes between two
host buffers, on any machine. Times come from
`time.perf_counter_ns` around CPU ops and CUDA events around GPU ops, in the simulator's record schema.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from executor import kernels as K
from executor.cpu_experts import warm_int8_epilogue
from executor.interpret import PlanInterpreter
from executor.reference import Outputs
from executor.weights import ModelWeights
from sim.engine import EngineRecord, busy_by_stream, ops_by_stream
from sim.errors import SimInputError
from sim.plan import Op, OpKind, Payload, Plan, member_ops
from sim.topology import Topology, UnitKind, topology_of
from traces import RoutingTrace


@dataclass
class ExecutionResult:
    """Measured per-op times in the simulator's schema, plus how the plan was mapped onto this machine."""

    record: EngineRecord
    devices: dict[str, str]
    gpu_role_on_cpu: bool
    wall_s: float
    outputs: Outputs
    ndp_emulated: bool = False  # near-memory DIMM ops ran on the CPU: not NDP timings
    # more modelled GPUs than real ones: some share a device, and copies between them ran within it (at its
    # memory bandwidth), not over a GPU-to-GPU link
    gpus_shared: bool = False
    cuda: bool = False  # GPU streams ran on CUDA and link copies moved their bytes (without it they take no time)

    def to_dict(self) -> dict[str, Any]:
        return {"devices": self.devices, "gpu_role_on_cpu": self.gpu_role_on_cpu, "ndp_emulated": self.ndp_emulated,
                "gpus_shared": self.gpus_shared, "wall_s": self.wall_s}


class _CudaTimer:
    """CUDA events around GPU work, resolved to host nanoseconds after a final synchronize. Events can only be
    compared on one device, so each device in use gets its own base event and host time."""

    def __init__(self, devices: list[str]) -> None:
        self.base: dict[str, tuple[torch.cuda.Event, int]] = {}
        for dev in devices:
            with torch.cuda.device(dev):
                torch.cuda.synchronize()
                event = torch.cuda.Event(enable_timing=True)
                # the host time just before the record: GPU times then read at most a launch early, never later
                # than they were (a CPU op that waited for a GPU op must not appear to start before it ended)
                host_ns = time.perf_counter_ns()
                event.record()
                torch.cuda.synchronize()
                self.base[dev] = (event, host_ns)
        self.pairs: dict[int, tuple[str, torch.cuda.Event, torch.cuda.Event]] = {}

    def resolve(self, start: np.ndarray, end: np.ndarray, t0: int) -> None:
        for dev in self.base:
            torch.cuda.synchronize(dev)
        for i, (dev, a, b) in self.pairs.items():
            base_event, base_ns = self.base[dev]
            # cudaEventElapsedTime is single-precision milliseconds: from the run's base it steps 4 us at 60 s and
            # 31 us at 10 min, coarser than a decode op; so the op's own duration is read from its two events
            start[i] = int(base_event.elapsed_time(a) * 1e6) + base_ns - t0
            end[i] = start[i] + max(0, round(a.elapsed_time(b) * 1e6))


def prepack_cpu_experts(plan: Plan, weights: ModelWeights, device_of: dict[str, str]) -> None:
    """Pack every expert a CPU stream will run before the clock starts: a serving system loads its weights in
    the kernel's layout once, so the first call of an expert must not pay for the reorder."""
    int8 = False
    for op in plan.ops:
        if op.kind is OpKind.EXPERT and device_of.get(op.stream) == "cpu":
            lw = weights.layers[op.layer]
            if lw.w1 is not None:
                experts = K.cpu_experts(lw)
                for member in member_ops(op):
                    experts.pack(member.expert)
                int8 |= experts.precision == "int8"
    if int8:  # torch.compile builds INT8's quantisation step on its first call: not inside the timed run
        warm_int8_epilogue()


def _at_plan_precision(plan: Plan, weights: ModelWeights) -> ModelWeights:
    """The weights as the plan's experts run them: INT8 (oneDNN) or INT4 (dequantised per group) CPU experts
    (`executor.cpu_experts`); quantised experts on a GPU stream have no kernels here and are refused before
    anything runs."""
    precision = plan.model.expert_precision
    if plan.model.stored_at_bits:
        raise SimInputError("the executor has no kernels for weights stored at weight_bits_per_param / "
                            "expert_bits_per_param (a quantization_config or a model file's stored size); simulate "
                            "the plan, or execute the model without them (a config.json without quantization_config, "
                            "or a model file with both at 0 and, if wanted, expert_precision int8 or int4)")
    if precision == "native":
        return weights
    topo = topology_of(plan.system)  # a GPU stream's experts run the plain kernels, on whatever device: refuse
    if any(op.kind is OpKind.EXPERT and topo.streams[op.stream].kind is not UnitKind.CPU for op in plan.ops):
        raise SimInputError(f"the executor runs {precision} experts on the CPU only; this plan runs experts on a GPU "
                            "(simulate it, or pick a plan whose experts run on the CPU)")
    current = [lw.cpu_experts for lw in weights.layers if lw.cpu_experts is not None]
    if current and all(e.precision == precision for e in current):
        return weights  # already at the plan's precision (packed experts kept across runs)
    # A copy of the layer records (tensors shared) with their own runners: the caller's weights keep theirs.
    copy = dataclasses.replace(weights, layers=[dataclasses.replace(lw, cpu_experts=None) for lw in weights.layers])
    return K.use_cpu_experts(copy, precision)


def _disk_link(topo: Topology, stream: str) -> bool:
    """Whether `stream` moves bytes to or from the system's disk (the executor has no disk tier)."""
    unit = topo.streams.get(stream)
    return unit is not None and unit.kind is UnitKind.LINK and "disk" in (unit.spec.src, unit.spec.dst)


def _refuse_disk_ops(plan: Plan, topo: Topology) -> None:
    """The executor has no disk tier and no 4-bit group-wise (de)compression (plans using them are simulated
    only): one line naming the first such op. Other plans on a system with a disk run as on one without."""
    for op in plan.ops:
        if op.payload is Payload.DECOMPRESS:
            raise SimInputError(f"the executor does not run FlexGen's 4-bit compression: plan op {op.id} "
                                "(de)compresses a tensor (simulate this plan, or turn compress_weight and "
                                "compress_cache off)")
        if _disk_link(topo, op.stream):
            raise SimInputError(f"the executor does not run a disk tier: plan op {op.id} moves {op.bytes} bytes on "
                                f"stream {op.stream} (simulate this plan, or place nothing on disk)")


def execute_plan(plan: Plan, weights: ModelWeights, trace: RoutingTrace, use_cuda: bool | None = None,
                 timeout_s: float = 3600.0) -> ExecutionResult:
    """Execute `plan` with real tensors; returns measured start/end per op and the final hidden states."""
    cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if cuda and "kv_stream_buffers" in plan.static_memory.get("gpu", {}):
        raise SimInputError("the executor keeps the KV cache where attention runs: a plan that streams it from host "
                            "memory to GPU attention (kv_cache=cpu) runs on the CPU only (use_cuda=False), or is "
                            "simulated")
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("CUDA was asked for but torch sees no CUDA device")
    topo = topology_of(plan.system)
    _refuse_disk_ops(plan, topo)
    streams = topo.stream_order()
    device_of = {s: _torch_device(topo, s, cuda) for s in streams}
    used = sorted({d for d in device_of.values() if d != "cpu"})
    weights = _at_plan_precision(plan, weights)
    interp = PlanInterpreter(plan, weights, trace, weights_on={d: weights.to(d) for d in used}, device_of=device_of)
    ops = plan.ops
    n = len(ops)
    done = [threading.Event() for _ in range(n)]
    start = np.zeros(n, dtype=np.int64)
    end = np.zeros(n, dtype=np.int64)
    errors: list[BaseException] = []
    stream_device = {s: _link_device(topo, s, device_of) for s in streams
                     if (device_of[s] != "cpu" or topo.streams[s].kind is UnitKind.LINK) and not _disk_link(topo, s)
                     } if cuda else {}
    cuda_streams = {s: _cuda_stream(s, d) for s, d in stream_device.items()}
    gpu_done_event: dict[int, Any] = {}
    prepack_cpu_experts(plan, weights, device_of)
    # Staging buffers before the clock starts: pinning host memory locks every page, and a device buffer allocated
    # inside a copy would be a cudaMalloc in the timed op. Their bytes do not matter: every copy reuses them.
    pinned = _pinned_staging(ops, topo, cuda)
    on_device = {d: torch.empty(pinned.numel(), dtype=torch.uint8, device=d)
                 for d in sorted(set(stream_device.values()))} if pinned.numel() else {}
    host_src, host_dst = _host_staging(ops, topo, pinned)
    timer = _CudaTimer(sorted(set(stream_device.values()))) if cuda else None
    t0 = time.perf_counter_ns()

    def run_stream(stream: str, ids: list[int]) -> None:
        try:
            for i in ids:
                op = ops[i]
                for d in op.deps:
                    if not done[d].wait(timeout_s):
                        raise TimeoutError(f"op {i} waited more than {timeout_s} s for op {d}")
                    if errors:  # another stream failed (its failure woke every waiter): run nothing more
                        return
                    if d in gpu_done_event and stream not in cuda_streams:
                        gpu_done_event[d].synchronize()  # a CPU op needs the GPU result itself
                if errors:
                    return
                if stream in cuda_streams:
                    _run_cuda_op(op, i, stream)
                else:
                    start[i] = time.perf_counter_ns() - t0
                    if op.kind is OpKind.COPY and topo.streams[op.stream].kind is UnitKind.CPU:
                        moved = op.bytes // 2  # a host copy's bytes count its read and its write
                        host_dst[:moved].copy_(host_src[:moved])
                    else:
                        interp.step(op)
                    end[i] = time.perf_counter_ns() - t0
                done[i].set()
        except BaseException as exc:  # surface the first failure to the caller, unblock everyone
            errors.append(exc)
            for ev in done:
                ev.set()

    def _run_cuda_op(op: Op, i: int, stream: str) -> None:
        cs = cuda_streams[stream]
        after_host_op = False
        for d in op.deps:
            if d in gpu_done_event:
                cs.wait_event(gpu_done_event[d])
            else:
                after_host_op = True
        if after_host_op:  # a host thread's op may have queued GPU work (on the default stream) this op reads
            cs.wait_stream(torch.cuda.default_stream(cs.device))
        # `b` blocks: a CPU thread waiting for it sleeps rather than spinning on a core its CPU ops need
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True, blocking=True)
        with torch.cuda.stream(cs):
            a.record(cs)
            if op.kind is OpKind.COPY:
                _copy(op)
            else:
                interp.step(op)
            b.record(cs)
        timer.pairs[i] = (stream_device[stream], a, b)
        gpu_done_event[i] = b

    def _copy(op: Op) -> None:
        """Move op.bytes in the op's direction: between pinned host memory and a GPU, or GPU to GPU."""
        nbytes = max(op.bytes, 1)
        unit = topo.streams[op.stream]
        if unit.kind is not UnitKind.LINK:  # a copy within one GPU (a staging buffer)
            dev = _pool_device(topo, unit.pool, cuda)
            torch.empty(nbytes, dtype=torch.uint8, device=dev).copy_(torch.empty(nbytes, dtype=torch.uint8,
                                                                                 device=dev))
            return
        direction = unit.spec
        src, dst = (_pool_device(topo, p, cuda) for p in (direction.src, direction.dst))
        if src == "cpu" or dst == "cpu":
            host = pinned[:nbytes]
            dev = on_device[dst if src == "cpu" else src][:nbytes]
            if src == "cpu":
                dev.copy_(host, non_blocking=True)
            else:
                host.copy_(dev, non_blocking=True)
            return
        a = torch.empty(nbytes, dtype=torch.uint8, device=src)
        torch.empty(nbytes, dtype=torch.uint8, device=dst).copy_(a, non_blocking=True)

    by_stream = ops_by_stream(ops, topo)
    threads = [threading.Thread(target=run_stream, args=(s, ids), name=f"stream-{s}", daemon=True)
               for s, ids in by_stream.items() if ids]
    wall0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if timer is not None:
        timer.resolve(start, end, t0)
    wall = time.perf_counter() - wall0
    record = EngineRecord(start_ns=start, end_ns=end, busy_ns=busy_by_stream(ops, start, end, streams),
                          peak_bytes={p: plan.static_bytes(p) for p in topo.pools}, events=0)
    devices = {str(s): device_of[s] for s, ids in by_stream.items() if ids}
    gpu_role_on_cpu = not cuda and any(topo.streams[s].kind is UnitKind.GPU for s, ids in by_stream.items() if ids)
    ndp = any(topo.streams[s].kind is UnitKind.NDP for s, ids in by_stream.items() if ids)
    return ExecutionResult(record, devices, gpu_role_on_cpu, wall, interp.outputs, ndp_emulated=ndp,
                           gpus_shared=cuda and gpus_modelled(topo, by_stream) > torch.cuda.device_count(), cuda=cuda)


_STREAMS: dict[tuple[str, str], Any] = {}


def _cuda_stream(name: str, device: str) -> Any:
    """The CUDA stream of a plan stream on a device, the same one in every run of the process: the caching
    allocator reuses a freed block only on the stream that allocated it, so fresh streams per run would send
    every timed run's allocations back to cudaMalloc, warm-up or not."""
    key = (name, device)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device=device)
    return _STREAMS[key]


def _host_staging(ops: list[Op], topo: Topology, pinned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination of the plan's copies on CPU streams (host-side staging), as large as the largest:
    a written pageable source, and the pinned staging buffer as destination where it is large enough (the copy
    fills what the link then moves), else a pageable one. Empty without such copies."""
    sizes = [op.bytes // 2 for op in ops if op.kind is OpKind.COPY and topo.streams[op.stream].kind is UnitKind.CPU]
    if not sizes:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)
    largest = max(max(sizes), 1)
    # written before the clock starts, like the source: a fresh buffer's first timed copy paid its page faults
    # (6x the later ones for 128 MiB)
    dst = pinned if pinned.numel() >= largest else torch.zeros(largest, dtype=torch.uint8)
    return torch.ones(largest, dtype=torch.uint8), dst


def _pinned_staging(ops: list[Op], topo: Topology, cuda: bool) -> torch.Tensor:
    """One pinned host buffer as large as the largest host-device copy of the plan (empty without CUDA or such
    copies): every copy reads or writes a prefix of it, so no timed copy pays for pinning memory."""
    host_copies = [op.bytes for op in ops if op.kind is OpKind.COPY and topo.streams[op.stream].kind is UnitKind.LINK
                   and "cpu" in (topo.streams[op.stream].spec.src, topo.streams[op.stream].spec.dst)]
    if not cuda or not host_copies:
        return torch.empty(0, dtype=torch.uint8)
    return torch.empty(max(max(host_copies), 1), dtype=torch.uint8, pin_memory=True)


def gpus_modelled(topo: Topology, by_stream: dict[str, list[int]]) -> int:
    """GPU memory pools the plan's streams with ops run on or copy to and from: the GPUs it needs."""
    pools: set[str] = set()
    for stream, ids in by_stream.items():
        unit = topo.streams[stream]
        if not ids:
            continue
        if unit.kind is UnitKind.GPU:
            pools.add(unit.pool)
        elif unit.kind is UnitKind.LINK:
            pools.update(p for p in (unit.spec.src, unit.spec.dst) if p.startswith("gpu"))
    return len(pools)


def _pool_device(topo: Topology, pool: str, cuda: bool) -> str:
    """The torch device of a memory pool: host memory on the CPU; GPU `gpu` on cuda:0 and `gpuN` on cuda:N when
    torch sees that many devices, else on the last one it sees (several modelled GPUs then share one real GPU)."""
    if pool == "cpu" or not cuda:
        return "cpu"
    index = int(pool.removeprefix("gpu") or 0)
    return f"cuda:{min(index, torch.cuda.device_count() - 1)}"


def _torch_device(topo: Topology, stream: str, cuda: bool) -> str:
    """Where a stream's compute ops run: a GPU stream on its GPU's torch device (the CPU without CUDA, labelled
    `gpu_role_on_cpu`); CPU streams, NDP streams (emulated, `ndp_emulated`) and copy queues on the CPU (copies
    move bytes on their own CUDA stream)."""
    unit = topo.streams[stream]
    return _pool_device(topo, unit.pool, cuda) if unit.kind is UnitKind.GPU else "cpu"


def _link_device(topo: Topology, stream: str, device_of: dict[str, str]) -> str:
    """The CUDA device that owns a stream's queue: its GPU, or for a copy the GPU end of the link."""
    unit = topo.streams[stream]
    if unit.kind is not UnitKind.LINK:
        return device_of[stream]
    end = unit.spec.dst if unit.spec.dst != "cpu" else unit.spec.src
    return _pool_device(topo, end, True)
