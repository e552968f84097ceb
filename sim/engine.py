"""The SimPy machine: one long-lived process per stream runs that stream's ops in plan order.

Contention: streams on one device (two CPU workers, two host-to-device copy queues) share it. Each running op
uses some share of its device's two resources when alone (compute and memory, or the link), as the cost model
reports; while several ops run on one device they progress at rates that share the device fairly (dominant
resource fairness), so two ops that both need the whole device each take longer, and the device never does
more work than its capacity. A rate change re-times the affected ops (their processes are interrupted and
wait anew). An op on a device that only one stream uses takes the fast path: one timeout, no bookkeeping.

Cross-stream dependencies wait on an event created only when an op has to wait. Memory pools are counters
checked at every allocation. The clock is integer nanoseconds; nothing is random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import simpy
from simpy.core import EmptySchedule

from sim.cost import CostModel
from sim.errors import CapacityError
from sim.plan import DEVICE_OF, STREAMS, Device, Plan, Stream

_EPS = 1e-9


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


def max_min_rates(usages: list[tuple[float, float]]) -> list[float]:
    """Fair speeds (1 = as fast as alone) of jobs sharing two resources of capacity 1 (dominant resource
    fairness, by progressive filling).

    `usages[i]` is job i's use of each resource when it runs alone. Every unfrozen job's dominant share
    (speed x its larger usage) rises at the same pace until a resource saturates or a job reaches full speed;
    those jobs freeze and the rest go on. A job that uses nothing runs at full speed.
    """
    n = len(usages)
    rates = [0.0] * n
    dominant = [max(u) for u in usages]
    cap = [1.0, 1.0]
    active = []
    for i in range(n):
        if dominant[i] <= _EPS:
            rates[i] = 1.0
        else:
            active.append(i)
    while active:
        grow = [sum(usages[i][r] / dominant[i] for i in active) for r in (0, 1)]
        delta = min((1.0 - rates[i]) * dominant[i] for i in active)
        for r in (0, 1):
            if grow[r] > _EPS:
                delta = min(delta, cap[r] / grow[r])
        for i in active:
            rates[i] += delta / dominant[i]
        for r in (0, 1):
            cap[r] -= delta * grow[r]
        full = [cap[r] <= _EPS for r in (0, 1)]
        active = [i for i in active if rates[i] < 1.0 - _EPS
                  and not any(full[r] and usages[i][r] > _EPS for r in (0, 1))]
    return rates


class _Job:
    __slots__ = ("proc", "usage", "remaining", "rate", "t_last", "finish")

    def __init__(self, proc: simpy.Process, usage: tuple[float, float], duration: int, now: int):
        self.proc, self.usage = proc, usage
        self.remaining, self.rate, self.t_last, self.finish = float(duration), 1.0, now, now + duration


class _DeviceShare:
    """The ops running on one device; re-times them whenever one starts or ends while others run."""

    __slots__ = ("jobs",)

    def __init__(self) -> None:
        self.jobs: list[_Job] = []

    def _retime(self, now: int, skip: _Job | None) -> None:
        rates = max_min_rates([j.usage for j in self.jobs])
        for job, rate in zip(self.jobs, rates, strict=True):
            job.rate = rate
            finish = now + max(0, math.ceil(job.remaining / rate - _EPS))
            if finish != job.finish:
                job.finish = finish
                if job is not skip:
                    job.proc.interrupt()

    def _advance(self, now: int) -> None:
        for job in self.jobs:
            job.remaining = max(0.0, job.remaining - job.rate * (now - job.t_last))
            job.t_last = now

    def admit(self, job: _Job, now: int) -> None:
        if not self.jobs:
            self.jobs.append(job)
            return
        self._advance(now)
        self.jobs.append(job)
        self._retime(now, skip=job)

    def release(self, job: _Job, now: int) -> None:
        self.jobs.remove(job)
        if self.jobs:
            self._advance(now)
            self._retime(now, skip=None)


def run_plan(plan: Plan, cost: CostModel) -> EngineRecord:
    """Simulate `plan` under `cost`; raise CapacityError if memory runs out, PlanDeadlock if ops starve."""
    ops = plan.ops
    n = len(ops)
    durations = [cost.op_time_ns(op) for op in ops]
    usage_of = cost.usage
    start = [-1] * n
    end = [-1] * n
    waiters: dict[int, simpy.Event] = {}
    pools = _Pools(
        {"gpu": plan.system.gpu_usable_bytes, "cpu": plan.system.dram_usable_bytes},
        {"gpu": plan.static_bytes("gpu"), "cpu": plan.static_bytes("cpu")},
    )
    env = simpy.Environment()
    shares = {device: _DeviceShare() for device in Device}
    by_stream: dict[Stream, list[int]] = {s: [] for s in STREAMS}
    for op in ops:
        by_stream[op.stream].append(op.id)
    timeout, new_event, Interrupt = env.timeout, env.event, simpy.Interrupt

    streams_on = {device: sum(1 for s, ids in by_stream.items() if ids and DEVICE_OF[s] is device) for device in Device}

    def stream_process(stream: Stream, ids: list[int]):
        share = shares[DEVICE_OF[stream]]
        shared = streams_on[DEVICE_OF[stream]] > 1  # a device used by one stream only never contends
        proc = env.active_process
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
            if d and not shared:
                yield timeout(d)
            elif d:
                job = _Job(proc, usage_of(op), d, now)
                share.admit(job, now)
                while True:
                    try:
                        yield timeout(job.finish - env.now)
                        break
                    except Interrupt:
                        continue
                share.release(job, env.now)
            end[i] = env.now
            if op.free:
                for pool, nbytes in op.free:
                    pools.free(pool, nbytes)
            if waiters:
                ev = waiters.pop(i, None)
                if ev is not None:
                    ev.succeed()

    for stream, ids in by_stream.items():
        if ids:
            env.process(stream_process(stream, ids))
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
    start_arr = np.asarray(start, dtype=np.int64)
    streams = np.asarray([STREAMS.index(op.stream) for op in ops], dtype=np.int64)
    busy = np.bincount(streams, weights=end_arr - start_arr, minlength=len(STREAMS)) if n else np.zeros(len(STREAMS))
    return EngineRecord(
        start_ns=start_arr, end_ns=end_arr,
        busy_ns={str(s): int(busy[k]) for k, s in enumerate(STREAMS)},
        peak_bytes=dict(pools.peak), events=events,
    )
