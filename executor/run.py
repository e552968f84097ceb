"""Run a plan for real and time every op: one host thread per stream, ops in plan order, deps honoured.

Compute ops run the layer math (`executor.interpret`) on the device their stream names: CPU streams on the
CPU (oneDNN picks AMX for bf16 GEMMs where the CPU has it); GPU-stream ops on CUDA when it is available.
Without CUDA, GPU-stream ops run on the CPU and the result says so (`gpu_role_on_cpu`): such timings are
never GPU timings. Copies move buffers of the plan's byte counts (pinned host memory to and from the GPU)
on their own CUDA streams; without CUDA they take no time and are recorded as such. Times come from
`time.perf_counter_ns` around CPU ops and CUDA events around GPU ops, in the simulator's record schema.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from executor.interpret import PlanInterpreter
from executor.reference import Outputs
from executor.weights import ModelWeights
from sim.engine import EngineRecord
from sim.plan import DEVICE_OF, STREAMS, Device, Op, OpKind, Plan, Stream
from traces import RoutingTrace


@dataclass
class ExecutionResult:
    """Measured per-op times in the simulator's schema, plus how the plan was mapped onto this machine."""

    record: EngineRecord
    devices: dict[str, str]
    gpu_role_on_cpu: bool
    wall_s: float
    outputs: Outputs

    def to_dict(self) -> dict[str, Any]:
        return {"devices": self.devices, "gpu_role_on_cpu": self.gpu_role_on_cpu, "wall_s": self.wall_s}


class _CudaTimer:
    """CUDA events around GPU work, resolved to host nanoseconds after a final synchronize."""

    def __init__(self) -> None:
        torch.cuda.synchronize()
        self.base_event = torch.cuda.Event(enable_timing=True)
        self.base_event.record()
        torch.cuda.synchronize()
        self.base_ns = time.perf_counter_ns()
        self.pairs: dict[int, tuple[torch.cuda.Event, torch.cuda.Event]] = {}

    def resolve(self, start: np.ndarray, end: np.ndarray, t0: int) -> None:
        torch.cuda.synchronize()
        for i, (a, b) in self.pairs.items():
            start[i] = int(self.base_event.elapsed_time(a) * 1e6) + self.base_ns - t0
            end[i] = int(self.base_event.elapsed_time(b) * 1e6) + self.base_ns - t0


def execute_plan(plan: Plan, weights: ModelWeights, trace: RoutingTrace, use_cuda: bool | None = None,
                 timeout_s: float = 3600.0) -> ExecutionResult:
    """Execute `plan` with real tensors; returns measured start/end per op and the final hidden states."""
    cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("CUDA was asked for but torch sees no CUDA device")
    device_of = {s: ("cuda" if cuda and DEVICE_OF[s] is Device.GPU else "cpu") for s in STREAMS}
    interp = PlanInterpreter(plan, weights, trace,
                             weights_on={"cuda": weights.to("cuda")} if cuda else {}, device_of=device_of)
    ops = plan.ops
    n = len(ops)
    done = [threading.Event() for _ in range(n)]
    start = np.zeros(n, dtype=np.int64)
    end = np.zeros(n, dtype=np.int64)
    errors: list[BaseException] = []
    timer = _CudaTimer() if cuda else None
    cuda_streams = {s: torch.cuda.Stream() for s in STREAMS if device_of[s] == "cuda" or (
        cuda and DEVICE_OF[s] in (Device.H2D, Device.D2H))} if cuda else {}
    gpu_done_event: dict[int, Any] = {}
    t0 = time.perf_counter_ns()

    def run_stream(stream: Stream, ids: list[int]) -> None:
        try:
            for i in ids:
                op = ops[i]
                for d in op.deps:
                    if not done[d].wait(timeout_s):
                        raise TimeoutError(f"op {i} waited more than {timeout_s} s for op {d}")
                    if d in gpu_done_event and stream not in cuda_streams:
                        gpu_done_event[d].synchronize()  # a CPU op needs the GPU result itself
                if stream in cuda_streams:
                    _run_cuda_op(op, i, stream)
                else:
                    start[i] = time.perf_counter_ns() - t0
                    interp.step(op)
                    end[i] = time.perf_counter_ns() - t0
                done[i].set()
        except BaseException as exc:  # surface the first failure to the caller, unblock everyone
            errors.append(exc)
            for ev in done:
                ev.set()

    def _run_cuda_op(op: Op, i: int, stream: Stream) -> None:
        cs = cuda_streams[stream]
        for d in op.deps:
            if d in gpu_done_event:
                cs.wait_event(gpu_done_event[d])
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(cs):
            a.record(cs)
            if op.kind is OpKind.COPY:
                _copy(op)
            else:
                interp.step(op)
            b.record(cs)
        timer.pairs[i] = (a, b)
        gpu_done_event[i] = b

    pinned: dict[int, torch.Tensor] = {}

    def _copy(op: Op) -> None:
        """Move op.bytes between pinned host memory and the GPU, in the op's direction."""
        nbytes = max(op.bytes, 1)
        host = pinned.get(nbytes)
        if host is None:
            host = pinned[nbytes] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        if DEVICE_OF[op.stream] is Device.H2D:
            dev.copy_(host, non_blocking=True)
        else:
            host.copy_(dev, non_blocking=True)

    by_stream: dict[Stream, list[int]] = {s: [] for s in STREAMS}
    for op in ops:
        by_stream[op.stream].append(op.id)
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
    streams = np.asarray([STREAMS.index(op.stream) for op in ops], dtype=np.int64)
    busy = np.bincount(streams, weights=end - start, minlength=len(STREAMS)) if n else np.zeros(len(STREAMS))
    record = EngineRecord(start_ns=start, end_ns=end, busy_ns={str(s): int(busy[k]) for k, s in enumerate(STREAMS)},
                          peak_bytes={"gpu": plan.static_bytes("gpu"), "cpu": plan.static_bytes("cpu")}, events=0)
    devices = {str(s): device_of[s] for s, ids in by_stream.items() if ids}
    gpu_role_on_cpu = not cuda and any(DEVICE_OF[s] is Device.GPU for s, ids in by_stream.items() if ids)
    return ExecutionResult(record, devices, gpu_role_on_cpu, wall, interp.outputs)
