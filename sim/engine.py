"""The SimPy machine: one long-lived process per stream runs that stream's ops in plan order.

A stream is one contended unit (GPU compute, CPU cores, PCIe H2D, PCIe D2H), so its serial queue *is* its
contention model and needs no simpy.Resource. Cross-stream dependencies wait on an event that is created only
when an op has to wait. Memory pools are counters checked at every allocation. The clock is integer ns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy
from simpy.core import EmptySchedule

from sim.cost import CostModel
from sim.errors import CapacityError
from sim.plan import STREAMS, Plan, Stream


class PlanDeadlock(RuntimeError):
    """Some ops never ran: the plan's dependencies and stream order contradict each other."""


@dataclass
class EngineRecord:
    """What happened: per-op start/end (ns), per-stream busy time, peak memory per pool, and event count."""

    start_ns: np.ndarray
    end_ns: np.ndarray
    busy_ns: dict[str, int]
    peak_bytes: dict[str, int]
    events: int

    @property
    def makespan_ns(self) -> int:
        return int(self.end_ns.max()) if self.end_ns.size else 0


class _Abort(Exception):
    """Stops the simulation from inside a SimPy process; the real error waits in `_Pools.error`."""


class _Pools:
    """Byte counters per memory pool with capacity checks and peak tracking."""

    def __init__(self, capacity: dict[str, int], static: dict[str, int]):
        self.capacity = capacity
        self.error: CapacityError | None = None
        self.used = dict(static)
        self.peak = dict(static)
        for pool, used in static.items():
            if used > capacity[pool]:
                raise CapacityError(pool.upper(), used, capacity[pool], "static allocations")

    def alloc(self, pool: str, nbytes: int, what: str) -> None:
        used = self.used[pool] + nbytes
        if used > self.capacity[pool]:
            self.error = CapacityError(pool.upper(), used, self.capacity[pool], what)
            raise _Abort(str(self.error))
        self.used[pool] = used
        if used > self.peak[pool]:
            self.peak[pool] = used

    def free(self, pool: str, nbytes: int) -> None:
        self.used[pool] -= nbytes


def run_plan(plan: Plan, cost: CostModel) -> EngineRecord:
    """Simulate `plan` under `cost`; raise CapacityError if memory runs out, PlanDeadlock if ops starve."""
    ops = plan.ops
    n = len(ops)
    durations = [cost.op_time_ns(op) for op in ops]
    start = [-1] * n
    end = [-1] * n
    waiters: dict[int, simpy.Event] = {}
    pools = _Pools(
        {"gpu": plan.system.gpu_usable_bytes, "cpu": plan.system.dram_usable_bytes},
        {"gpu": plan.static_bytes("gpu"), "cpu": plan.static_bytes("cpu")},
    )
    env = simpy.Environment()
    by_stream: dict[Stream, list[int]] = {s: [] for s in STREAMS}
    for op in ops:
        by_stream[op.stream].append(op.id)

    timeout, new_event = env.timeout, env.event

    def stream_process(ids: list[int]):
        for i in ids:
            op = ops[i]
            for d in op.deps:
                if end[d] < 0:
                    ev = waiters.get(d)
                    if ev is None:
                        ev = waiters[d] = new_event()
                    yield ev
            now = start[i] = env.now
            if op.alloc:
                for pool, nbytes in op.alloc:
                    pools.alloc(pool, nbytes, f"op {i} {op.kind} layer {op.layer}")
            d = durations[i]
            if d:
                yield timeout(d)
            end[i] = now + d
            if op.free:
                for pool, nbytes in op.free:
                    pools.free(pool, nbytes)
            if waiters:
                ev = waiters.pop(i, None)
                if ev is not None:
                    ev.succeed()

    for ids in by_stream.values():
        if ids:
            env.process(stream_process(ids))
    events = 0
    step = env.step
    try:
        while True:
            step()
            events += 1
    except EmptySchedule:
        pass
    except _Abort:
        assert pools.error is not None
        raise pools.error from None
    end_arr = np.asarray(end, dtype=np.int64)
    if n and (end_arr < 0).any():
        first = int(np.flatnonzero(end_arr < 0)[0])
        raise PlanDeadlock(f"plan deadlocked: op {first} ({ops[first].kind} on {ops[first].stream}) never ran")
    dur = np.asarray(durations, dtype=np.int64)
    streams = np.asarray([STREAMS.index(op.stream) for op in ops], dtype=np.int64)
    busy = np.bincount(streams, weights=dur, minlength=len(STREAMS)) if n else np.zeros(len(STREAMS))
    return EngineRecord(
        start_ns=np.asarray(start, dtype=np.int64), end_ns=end_arr,
        busy_ns={str(s): int(busy[k]) for k, s in enumerate(STREAMS)},
        peak_bytes=dict(pools.peak), events=events,
    )
