"""The SimPy machine: each stream runs its ops in plan order, driven by SimPy events. A stream is a small state
machine whose continuation is an event callback (an op's timeout, a dependency's end, a start or a re-timing
wake-up), not a generator process: the events one process per stream would schedule, without resuming a
generator for each.

Contention: ops that draw on a common resource share it. The GPU's resources are its SMs and HBM; the host's are
the CPU cores, host DRAM bandwidth and the two PCIe directions, and host DRAM is one resource that CPU ops and
the DMA of both PCIe directions all draw from (a copy reads or writes host memory at its link rate). Each
running op uses some share of its resources when alone, as the cost model reports; while several ops run in one
group (GPU, or host) they progress at rates that share the resources fairly (dominant resource fairness), so
two ops that both need a whole resource each take longer, and no resource ever does more work than its
capacity. A rate change re-times the affected ops: one that now ends earlier than it would wake sleeps anew, on a
timeout made when the change is settled (one per op, however often the change re-timed it); one that ends later
wakes when it would have ended and sleeps again. An op in a
group that only one stream uses takes the fast path: one timeout, no bookkeeping; and consecutive such ops whose
ends in between nobody observes (no op of another stream depends on them, none frees memory, none after the
first allocates, each one's dependencies have ended when the run starts) share one timeout: every op starts
and ends when it would with one timeout each (`run_plan(chain=False)` is the reference), in far fewer events
(MoE-Lightning's per-expert GPU ops; an O-projection and the router after it). The run's timeout is scheduled
earlier than its last op's would be, so events at one nanosecond may fire in another order; nothing observable
depends on that order: a memory pool is judged once per instant, after all of its allocations and frees (so
an op that frees and one that allocates at the same time never count as holding both), and a group's fair rates
are computed over its running ops in op order.

A grouped expert op (members run in turn, each at its own fair rate) that enters its resource group alone runs
all its members under one timeout, each at full speed as it would while nothing else arrives; a job that arrives
meanwhile first splits it into the member running at that instant, with the work that member has left, so every
member's rate and end are what one job per member would give (`chain=False` runs one job per member).

A stream that waits for another stream's op resumes inside that op's end, without an event of its own (it
starts at that instant either way; the order of one instant's starts is unobservable, as above). Memory pools
are counters, judged against their capacity at the end of every instant that allocated. The clock is integer
nanoseconds; nothing is random.

A plan in which no op ever slows another does not need any of this: `run_plan` list-schedules it in one pass
(`sim.uncontended`), which gives the same record, and runs SimPy only where that premise fails (`fast=False`:
always).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import simpy
from simpy.core import EmptySchedule
from simpy.events import NORMAL, URGENT

from sim.cost import CostModel, GroupPrices
from sim.cost.columns import ColumnPrices, price_table
from sim.errors import CapacityError, RunTooLong, SimInputError
from sim.op_table import KINDS, OpTable, unrepresentable
from sim.plan import Op, Plan
from sim.table_check import deps_point_back
from sim.topology import Topology, topology_of
from sim.uncontended import list_schedule
from traces.format import count_dtype

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
    events: int  # SimPy events processed (0 when the plan was list-scheduled: see sim.uncontended)
    engine: str = "simpy"  # "simpy", or "list" where no op slowed another and one pass gave the same schedule

    @property
    def makespan_ns(self) -> int:
        return int(self.end_ns.max()) if self.end_ns.size else 0


def ops_by_stream(ops: list[Op], topo: Topology) -> dict[str, list[int]]:
    """Op ids per stream in plan order, every stream of the machine listed in its order: how both engines walk
    a plan (one SimPy process, or one host thread, per stream with ops). A stream the system lacks is named."""
    by_stream: dict[str, list[int]] = {s: [] for s in topo.streams}
    for op in ops:
        ids = by_stream.get(op.stream)
        if ids is None:
            topo.unit_of(op.stream)  # raises, naming the system's streams
        ids.append(op.id)
    return by_stream


def busy_by_stream(ops: list[Op], start_ns: np.ndarray, end_ns: np.ndarray, streams: tuple[str, ...]) -> dict[str, int]:
    """Busy nanoseconds per stream (every stream of the machine listed, idle ones at 0), in `streams` order."""
    index = {s: k for k, s in enumerate(streams)}
    if not ops:
        return {s: 0 for s in streams}
    # stream indices in the narrowest type that holds them: a byte an op, not eight
    which = np.fromiter((index[op.stream] for op in ops), dtype=count_dtype(len(streams)), count=len(ops))
    busy = np.bincount(which, weights=end_ns - start_ns, minlength=len(streams))
    return {s: int(busy[k]) for k, s in enumerate(streams)}


class _Abort(Exception):
    """Stops the simulation from inside a SimPy process; the real error waits in `_Pools.error`."""


class _Pools:
    """Byte counters per memory pool with capacity checks and peak tracking.

    A pool's level is judged once per instant, after every allocation and free of that nanosecond: an op that
    frees memory and one that allocates at the same time do not count as holding both, whatever order their
    events fire in (SimPy orders equal-time events by when they were scheduled, an artefact of the engine). So
    peaks and capacity errors do not depend on how events at one instant are ordered."""

    def __init__(self, capacity: dict[str, int], static: dict[str, int]):
        self.capacity = capacity
        self.error: SimInputError | None = None
        self.static = static
        self.used = dict(static)
        self.peak = dict(static)
        self.now = -1  # the instant whose allocations are not yet judged
        self.allocated: dict[str, tuple[int, str]] = {}  # pool -> (lowest op id, its name) allocating at `now`
        self.freed: dict[str, int] = {}  # pool -> the lowest op id freeing it at `now`
        for pool, used in static.items():
            if used > capacity[pool]:
                raise CapacityError(pool.upper(), used, capacity[pool], "static allocations")

    def settle(self) -> None:
        """Judge the pools allocated or freed at the last instant: fail if over capacity or below the static
        level (a free that ran before its allocation: plan order balances, time order does not), else raise the
        peaks."""
        if self.freed:
            for pool, op in self.freed.items():
                if self.used[pool] < self.static[pool]:
                    self.error = SimInputError(
                        f"plan op {op}: frees {pool!r} memory before it is allocated (at {self.now} ns the pool "
                        f"holds {self.static[pool] - self.used[pool]} bytes less than its static allocations)")
                    raise _Abort(str(self.error))
            self.freed.clear()
        for pool, (_, what) in self.allocated.items():
            used = self.used[pool]
            if used > self.capacity[pool]:
                self.error = CapacityError(pool.upper(), used, self.capacity[pool], what)
                raise _Abort(str(self.error))
            if used > self.peak[pool]:
                self.peak[pool] = used
        self.allocated.clear()

    def alloc(self, pool: str, nbytes: int, now: int, op: int, what: str) -> None:
        if now != self.now:
            self.settle()
            self.now = now
        self.used[pool] += nbytes
        first = self.allocated.get(pool)
        if first is None or op < first[0]:
            self.allocated[pool] = (op, what)

    def free(self, pool: str, nbytes: int, now: int, op: int) -> None:
        if now != self.now:
            self.settle()
            self.now = now
        self.used[pool] -= nbytes
        first = self.freed.get(pool)
        if first is None or op < first:
            self.freed[pool] = op



def _unsaturated(usages: list[tuple[float, ...]]) -> bool:
    """True when the jobs together need no resource beyond its capacity."""
    return all(sum(column) <= 1.0 + _EPS for column in zip(*usages, strict=True))


def max_min_rates(usages: list[tuple[float, ...]]) -> list[float]:
    """Fair speeds (1 = as fast as alone) of jobs sharing resources of capacity 1 (dominant resource
    fairness, by progressive filling).

    `usages[i]` is job i's use of each resource when it runs alone. Every unfrozen job's dominant share
    (speed x its larger usage) rises at the same pace until a resource saturates or a job reaches full speed;
    those jobs freeze and the rest go on. A job that uses nothing runs at full speed. (Plain loops: this runs at
    every start and end of an op while a resource is oversubscribed.)
    """
    n = len(usages)
    if n == 0 or _unsaturated(usages):  # nothing to share: every job runs as fast as alone
        return [1.0] * n
    resources = range(len(usages[0]))
    rates = [0.0] * n
    dominant = [max(u) for u in usages]
    per_share: list[list[float]] = []  # usage per unit of dominant share
    active = []
    for i in range(n):
        d = dominant[i]
        if d <= _EPS:
            rates[i] = 1.0
            per_share.append([])
        else:
            per_share.append([x / d for x in usages[i]])
            active.append(i)
    cap = [1.0 for _ in resources]
    while active:
        grow = [0.0 for _ in resources]
        for i in active:
            v = per_share[i]
            for r in resources:
                grow[r] += v[r]
        delta = min((1.0 - rates[i]) * dominant[i] for i in active)
        for r in resources:
            if grow[r] > _EPS:
                delta = min(delta, cap[r] / grow[r])
        for i in active:
            rates[i] += delta / dominant[i]
        full = []
        for r in resources:
            cap[r] -= delta * grow[r]
            if cap[r] <= _EPS:
                full.append(r)
        # A job that uses a saturated resource at all stops there (however little it uses: a job left growing on
        # it would hold the next step at zero forever), so every step freezes at least one job.
        active = [i for i in active if rates[i] < 1.0 - _EPS and not any(usages[i][r] > 0.0 for r in full)]
    return rates


MAX_RUN_NS = 2**62  # a run's records are int64 nanoseconds; a longer run is a near-zero rate, not a result


class _Job:
    """A running op in a shared group: its usage, work left (ns at full speed), speed, and finish time. `wake` is
    when its process next wakes: a finish that moves later needs no interrupt (the process sleeps again). `op`
    orders a group's jobs, so their fair rates are computed in one order whatever order they arrived in.

    A grouped op's job is its current member; `tail` holds the members still to run, last first, each (ns,
    usage vector). A job that entered its group alone may be `lumped`: its finish is then the end of its last
    member, every member running in turn at full speed, as they would while nothing else arrives; an arrival
    unlumps it at once (see `_GroupShare.admit`)."""

    __slots__ = ("interrupt", "usage", "remaining", "rate", "t_last", "finish", "wake", "op", "left", "tail",
                 "lumped")

    def __init__(self, interrupt: Callable[[], None], usage: tuple[float, ...], duration: int, now: int, op: int,
                 tail: list[tuple[int, tuple[float, ...]]] | None = None):
        self.interrupt, self.usage, self.op = interrupt, usage, op
        self.remaining, self.rate, self.t_last, self.finish = float(duration), 1.0, now, now + duration
        self.wake = self.finish
        self.left = False  # released early: it ended at the instant another job arrived (see _GroupShare.admit)
        self.tail = tail
        self.lumped = False

    def lump(self) -> None:
        """Alone in its group at its start: finish when its last member would, none of them observed."""
        self.lumped = True
        self.finish += sum([d for d, _ in self.tail])

    def unlump(self, now: int) -> None:
        """Another job arrives at `now`: become the member running then (one that ends at `now` hands over to
        the next, which starts at `now`), with the work it has left, as if each member had been its own job."""
        self.lumped = False
        tail = self.tail
        end = self.t_last + int(self.remaining)  # the first member's end: it started at t_last at full speed
        while tail and end <= now:
            d, self.usage = tail.pop()
            end += d
        self.remaining, self.t_last = float(end - now), now
        self.finish = end  # its process sleeps until the lumped finish: re-timed where that is later (`admit`)


def _job_op(job: _Job) -> int:
    return job.op


class _GroupShare:
    """The ops running in one resource group; re-times them whenever one starts or ends while others run.

    While no resource is oversubscribed every job runs at full speed, so an arrival that keeps it that way, and
    any departure, changes nothing: those skip the bookkeeping (a job at full speed needs no progress update)."""

    __slots__ = ("jobs", "saturated", "demand", "_rates", "lump", "moved")

    def __init__(self, lump: bool = True) -> None:
        self.lump = lump  # a grouped op entering alone runs its members under one timeout (False: the reference)
        self.jobs: list[_Job] = []
        # jobs whose finish moved earlier than their wake-up during this admit or release: re-timed at its end,
        # once each, at their final finish (no event of their own, as an interrupt's would be)
        self.moved: list[_Job] = []
        self.saturated = False  # some running job is slowed down
        self.demand: list[float] = []  # per resource, the running jobs' usages summed (reset when idle)
        # fair rates per mix of usages, and whether any is slowed: plans repeat their mixes
        self._rates: dict[tuple, tuple[list[float], bool]] = {}

    def _retime(self, now: int, skip: _Job | None) -> None:
        key = tuple([j.usage for j in self.jobs])
        hit = self._rates.get(key)
        if hit is None:
            rates = max_min_rates(list(key))
            hit = self._rates[key] = rates, any(rate < 1.0 - _EPS for rate in rates)
        rates, self.saturated = hit
        ceil = math.ceil
        for job, rate in zip(self.jobs, rates, strict=True):
            job.rate = rate
            finish = now + max(0, ceil(job.remaining / rate - _EPS))
            if finish != job.finish:
                job.finish = finish
                if finish < job.wake and job is not skip:  # earlier than its process wakes: re-timed at the end
                    self.moved.append(job)

    def _advance(self, now: int) -> None:
        for job in self.jobs:
            job.remaining = max(0.0, job.remaining - job.rate * (now - job.t_last))
            job.t_last = now

    def admit(self, job: _Job, now: int) -> None:
        """`job` starts at `now`; the jobs it slows or speeds up are re-timed."""
        self._admit(job, now)
        if self.moved:
            self._wake_moved()

    def release(self, job: _Job, now: int) -> None:
        """`job` ends at `now`; the jobs that speed up are re-timed."""
        self._release(job, now)
        if self.moved:
            self._wake_moved()

    def _wake_moved(self) -> None:
        """Each job whose finish ended up earlier than its process's wake-up sleeps until that finish instead."""
        for job in self.moved:
            if job.finish < job.wake:
                job.interrupt()
        self.moved.clear()

    def _admit(self, job: _Job, now: int) -> None:
        jobs = self.jobs
        if jobs and jobs[0].lumped:  # a lumped job is alone: it becomes the member running now
            first = jobs[0]
            first.unlump(now)
            if first.finish < first.wake:
                self.moved.append(first)
            self.demand = list(first.usage)
        jobs.append(job)
        if len(jobs) > 1 and jobs[-2].op > job.op:  # in op order (a few jobs at most)
            jobs.sort(key=_job_op)
        if len(jobs) == 1:
            self.demand = list(job.usage)
            if job.tail and self.lump:
                job.lump()
            return
        demand = self.demand
        for r, u in enumerate(job.usage):
            demand[r] += u
        if not self.saturated and max(demand) <= 1.0 + _EPS:
            return
        # Jobs that end at this very instant (their wake-up is due now, maybe after this arrival's) leave first:
        # they have no work left, so counting them would slow the arrival for no time and re-time it when they
        # leave a moment later, the same instant (same starts and ends either way, two events fewer).
        for old in [j for j in jobs if j.finish <= now and j is not job]:
            self._release(old, now)
            old.left = True
        if len(jobs) == 1:
            return
        self._advance(now)
        self._retime(now, skip=job)

    def _release(self, job: _Job, now: int) -> None:
        if job.left:  # already released when it ended, at the instant another job arrived
            return
        jobs = self.jobs
        jobs.remove(job)
        if not jobs:
            self.saturated = False
            return
        demand = self.demand
        for r, u in enumerate(job.usage):
            demand[r] -= u
        if self.saturated:
            self._advance(now)
            self._retime(now, skip=None)


def _chainable(t: OpTable) -> bytearray:
    """Per op: whether its end is unobservable, so that the op after it on an uncontended stream may start
    without an event of its own: it frees no memory and no op of another stream depends on it (a later op of its
    own stream that names it waits for it anyway, by stream order: the O-projection before its router)."""
    ok = np.ones(len(t), dtype=np.uint8)  # a byte an op
    if t.free:
        ok[np.fromiter(t.free, np.int64, len(t.free))] = 0
    ok[t.dep_ids[t.stream[t.dep_ids] != t.stream[t.dep_owner()]]] = 0
    return bytearray(ok.tobytes())


def _ids_by_stream(t: OpTable, topo: Topology) -> dict[str, Sequence[int]]:
    """`ops_by_stream` over columns: op ids per stream in plan order, every stream of the machine listed (int64
    arrays: 8 bytes an op, where a list of int objects takes 36)."""
    by_stream: dict[str, Sequence[int]] = {s: array("q") for s in topo.streams}
    order = np.argsort(t.stream, kind="stable")
    bounds = np.searchsorted(t.stream[order], np.arange(len(t.streams) + 1))
    for code, name in enumerate(t.streams):
        by_stream[name] = array("q", order[bounds[code]:bounds[code + 1]].astype(np.int64).tobytes())
    return by_stream


def _prices(table: OpTable, cost: CostModel) -> ColumnPrices | None:
    """Every op's price (`sim.cost.columns`); where pricing fails, the op the per-op pricing fails on names the
    problem (the same error, raised by the same op as before columns)."""
    try:
        return price_table(cost, table)
    except (SimInputError, ValueError, ArithmeticError, LookupError, TypeError):
        price, group_price = cost.op_time_ns, GroupPrices(cost)
        for op in table.to_ops():
            group_price(op) if op.members else price(op)
        raise


class _UsageOf:
    """What the SimPy machine asks of a job's resources: a plain op's (own, memory) usage, or a grouped op's
    (time, usage) per member; each distinct op asked of the cost model once."""

    def __init__(self, t: OpTable, prices: ColumnPrices, cost: CostModel):
        self.usage, self.prices = cost.usage, prices
        self.plain_key = prices.plain_key
        self.plain_memo: dict[int, tuple[float, float]] = {}
        self.member_memo: dict[int, tuple[float, float]] = {}
        self.member_at = dict(zip(t.member_rows.tolist(), range(t.member_rows.size), strict=True))
        self.member_start = t.member_start

    def plain(self, i: int) -> tuple[float, float]:
        key = int(self.plain_key[i])
        hit = self.plain_memo.get(key)
        if hit is None:
            hit = self.plain_memo[key] = self.usage(self.prices.plain_ops[key])
        return hit

    def parts(self, i: int) -> list[tuple[int, tuple[float, float]]] | None:
        """(time, usage) of each member of op i in order, or None when op i is not grouped."""
        k = self.member_at.get(i)
        if k is None:
            return None
        out = []
        times, keys, memo = self.prices.member_times, self.prices.member_key, self.member_memo
        for j in range(int(self.member_start[k]), int(self.member_start[k + 1])):
            key = int(keys[j])
            hit = memo.get(key)
            if hit is None:
                hit = memo[key] = self.usage(self.prices.member_ops[key])
            out.append((int(times[j]), hit))
        return out


def run_plan(plan: Plan, cost: CostModel, check: bool = True, chain: bool = True, fast: bool = True) -> EngineRecord:
    """Simulate `plan` under `cost`; raise CapacityError if memory runs out, PlanDeadlock if ops starve,
    SimInputError if memory is freed before it is allocated or the run outlasts int64 nanoseconds.
    `check=False` skips `Plan.check()` for a plan built moments ago in this process (a search's candidates;
    the plan finally chosen is checked when it runs). `chain=False` gives every op on an uncontended stream its
    own timeout (the reference the chained run must equal: same start and end of every op, same peaks).
    `fast=True` first list-schedules the plan in one pass (`sim.uncontended`) and keeps that schedule when no op
    would slow another and the pools fit (it is then the SimPy run's, op for op); `fast=False` always runs SimPy.
    Both read the plan's ops as columns (`sim.op_table`): a plan whose ops no columns can hold (a float where an
    integer belongs, a string where an enum member does) is refused by name (SimInputError)."""
    table = plan.table()  # the ops as columns, what both schedules read
    if check:
        plan.check(table)  # without columns, the per-op check names a plan's first problem, as before columns
    if table is None:
        raise SimInputError(unrepresentable(plan.ops))
    prepare = getattr(cost, "prepare", None)  # a cost model that reads scopes from the plan (profiles)
    if prepare is not None:
        prepare(plan)
    topo = topology_of(plan.system)
    prices = _prices(table, cost)  # priced before memory is judged, as op-by-op pricing was
    if prices is None:  # an op, or a grouped op's members, past int64 nanoseconds
        raise _too_long(f"over {2**63 / 1e9:.3g}")
    if not set(table.streams) <= topo.streams.keys():
        topo.unit_of(next(s for s in table.streams if s not in topo.streams))  # raises, naming the system's streams
    pools = _Pools(dict(topo.pools), {pool: plan.static_bytes(pool) for pool in topo.pools})
    if fast:
        listed = _list_scheduled(table, prices, cost, topo, pools)
        if listed is not None:
            return listed
    n = len(table)
    # the per-op tables whose making needs temporaries first, while the run holds the least (a peak 20 MB lower for a
    # 776 k-op plan)
    chainable = _chainable(table) if chain else bytearray(n)
    by_stream = _ids_by_stream(table, topo)
    durations = array("q", prices.durations.tobytes())
    dep_start, dep_ids = array("q", table.dep_start.tobytes()), array("q", table.dep_ids.tobytes())
    allocs, frees = table.alloc, table.free
    usages = _UsageOf(table, prices, cost)
    parts, usage_of = usages.parts, usages.plain
    streams_in = {group: sum(1 for s, ids in by_stream.items() if ids and topo.streams[s].group == group)
                  for group in topo.group_sizes}
    # the SimPy machine; start and end as int64 arrays, not lists of int objects (a 776k-op plan: 12 MB, not 62)
    start = array("q", [-1]) * n
    end = array("q", [-1]) * n
    waiters: dict[int, list[Callable[[], None]]] = {}  # op id -> the continuations of streams waiting for it
    env = simpy.Environment()
    shares = {group: _GroupShare(lump=chain) for group in topo.group_sizes}
    schedule, Event, Timeout = env.schedule, simpy.Event, simpy.Timeout

    def fired(callback: Callable[[simpy.Event], None] | None, priority: int = NORMAL) -> None:
        """Schedule an event that calls `callback` now: a stream's start or its end."""
        ev = Event(env)
        ev._ok, ev._value = True, None
        if callback is not None:
            ev.callbacks.append(callback)
        schedule(ev, priority)

    def launch(stream: str, ids: Sequence[int]) -> None:
        """Start one stream: a state machine driven by event callbacks (op k waits for its dependencies, runs,
        ends, and the next starts), so no generator is resumed per event."""
        unit = topo.streams[stream]
        share = shares[unit.group]
        size = topo.group_sizes[unit.group]
        shared = streams_in[unit.group] > 1  # a group used by one stream only never contends
        count = len(ids)
        k = 0  # position in `ids` of the op waiting or running
        job: _Job | None = None
        target: simpy.Event | None = None  # the event whose callbacks hold this stream's continuation

        def proceed(_event: simpy.Event | None = None) -> None:
            """From op k on: wait for a dependency (resumed when it ends), or start the op; an op of zero
            duration ends at once and the next follows."""
            nonlocal k, job, target, ids, share
            while k < count:
                i = ids[k]
                for d in dep_ids[dep_start[i]:dep_start[i + 1]]:
                    if end[d] < 0:
                        woken = waiters.get(d)
                        if woken is None:
                            woken = waiters[d] = []
                        woken.append(proceed)
                        target = None
                        return
                now = start[i] = env.now
                if allocs and i in allocs:
                    for pool, nbytes in allocs[i]:
                        pools.alloc(pool, nbytes, now, i, f"op {i} {KINDS[table.kind[i]]} layer {table.layer[i]}")
                d = durations[i]
                if d and not shared:
                    # Alone on its device, op i ends at now + d; so do the ops after it, one after another,
                    # while each could start the moment its predecessor ends without anyone observing that
                    # predecessor's end (see `chainable`): one timeout covers them all.
                    t = now + d
                    while chainable[i] and k + 1 < count:
                        nxt = ids[k + 1]
                        if allocs and nxt in allocs:
                            break
                        for x in dep_ids[dep_start[nxt]:dep_start[nxt + 1]]:
                            if end[x] < 0 and x != i:  # op i, ending as op nxt starts, is the one not yet marked
                                break
                        else:
                            end[i] = start[nxt] = t
                            t += durations[nxt]
                            k += 1
                            i = nxt
                            continue
                        break
                    target = Timeout(env, t - now)
                    target.callbacks.append(finished)
                    return
                if d:
                    grouped = parts(i)
                    if grouped is not None:  # a group on a shared stream: its members run in turn, each at its own
                        vector = unit.usage_vector  # rate; a member of no time ends at once; the rest, last first
                        tail = [(t, vector(u, size)) for t, u in reversed(grouped) if t]
                        d, vec = tail.pop()
                        job = _Job(interrupt, vec, d, now, i, tail)
                    else:
                        job = _Job(interrupt, unit.usage_vector(usage_of(i), size), d, now, i)
                    share.admit(job, now)
                    sleep()
                    return
                complete(i, now)
                k += 1
            ids, share = (), None  # unread from now on: gone now, not with the closures' cycle (see run_plan)
            fired(None)  # the stream's end, one event as a SimPy process's end is

        def sleep(_event: simpy.Event | None = None) -> None:
            """Wait until the shared job's finish, which may move while it runs (later: it wakes and sleeps
            again; earlier: `interrupt`)."""
            nonlocal target, job
            now = env.now
            if now < job.finish:
                job.wake = job.finish
                target = Timeout(env, job.finish - now)
                target.callbacks.append(sleep)
                return
            tail = job.tail
            if job.lumped:  # every member ran, alone
                tail = None
            share.release(job, now)
            if tail:  # the next member of a grouped op starts as its own op would: at once, with its own usage
                d, vec = tail.pop()
                job = _Job(interrupt, vec, d, now, job.op, tail)
                share.admit(job, now)
                sleep()
                return
            finished()

        def interrupt() -> None:
            """The job's finish moved earlier than its wake-up (`_GroupShare._wake_moved`): it sleeps until the new
            finish instead (the timeout it slept on fires with no one to wake), without an event to wake it as a
            SimPy interrupt would (one at this instant's end is a timeout of no delay)."""
            nonlocal target
            callbacks = None if target is None else target.callbacks
            if callbacks is None or sleep not in callbacks:  # not sleeping on this job: it reads its finish anyway
                return
            callbacks.remove(sleep)
            job.wake = job.finish
            target = Timeout(env, max(0, job.finish - env.now))
            target.callbacks.append(sleep)

        def finished(_event: simpy.Event | None = None) -> None:
            nonlocal k
            complete(ids[k], env.now)
            k += 1
            proceed()

        fired(proceed, URGENT)  # started by an urgent event, as a SimPy process is

    def complete(i: int, now: int) -> None:
        """Op i ends: its memory is freed and the streams waiting for it resume at once, in the order they began
        to wait (no event: they start at this instant either way, and nothing observable depends on the order of
        one instant's starts; see the module docstring)."""
        end[i] = now
        if frees and i in frees:
            for pool, nbytes in frees[i]:
                pools.free(pool, nbytes, now, i)
        if waiters:
            woken = waiters.pop(i, None)
            if woken is not None:
                for resume in woken:
                    resume()

    for stream, ids in by_stream.items():
        if ids:
            launch(stream, ids)
    events = 0
    step = env.step
    try:
        try:
            while True:
                step()
                events += 1
        except EmptySchedule:
            pools.settle()  # the last instant's allocations
    except _Abort:
        assert pools.error is not None
        raise pools.error from None
    except OverflowError:  # a start or end past int64 (the arrays refuse it): past MAX_RUN_NS too
        raise _too_long(f"over {2**63 / 1e9:.3g}") from None
    finally:
        # The stream closures refer to each other (a reference cycle the collector frees later, and not at all
        # while a search pauses it): unhook the plan's ops and the run's per-op tables and price memos from them,
        # so they die with the run instead of waiting for a collection (0.2-0.3 s of objects after a full-decode
        # point; a Qwen3-30B-A3B B=4096 search's five probe runs held ~15 MB until its final run ended).
        run_table, run_start, run_end = table, start, end
        durations = dep_start = dep_ids = chainable = parts = usage_of = shares = waiters = env = by_stream = None
        table = allocs = frees = prices = usages = start = end = None
    return _record(run_table, topo, run_start, run_end, pools.peak, events=events, engine="simpy")


def _too_long(seconds: str) -> RunTooLong:
    return RunTooLong(f"the run would last {seconds} s (over {MAX_RUN_NS / 1e9:.3g} s): a rate or efficiency in the "
                      "system spec or profile is near zero")


def _list_scheduled(table: OpTable, prices: ColumnPrices, cost: CostModel, topo: Topology,
                    pools: _Pools) -> EngineRecord | None:
    """The run as a list schedule (`sim.uncontended`) over the plan's columns, or None when the SimPy machine must
    run it: an op would slow another, a pool would not fit, or a dependency does not point back in an unchecked
    plan (the machine names it)."""
    if not deps_point_back(table):
        return None
    in_group: dict[str, int] = {}
    for code in np.unique(table.stream).tolist():
        group = topo.streams[table.streams[code]].group
        in_group[group] = in_group.get(group, 0) + 1
    shared = {group for group, count in in_group.items() if count > 1}
    listed = list_schedule(table, prices, topo, shared, cost.usage, pools.capacity, pools.static)
    if listed is None:
        return None
    start, end, peak = listed
    return _record(table, topo, start, end, peak, events=0, engine="list")


def _record(table: OpTable, topo: Topology, start: Sequence[int], end: Sequence[int], peak: dict[str, int],
            events: int, engine: str) -> EngineRecord:
    """The engine record of a finished run, after the checks both schedules need: the run fits int64
    nanoseconds, and every op ran."""
    last = max(end, default=0)
    if last > MAX_RUN_NS:  # each op stays under the per-op bound, but their sum would not fit int64 nanoseconds
        raise _too_long(f"{last / 1e9:.3g}")
    end_arr = np.asarray(end, dtype=np.int64).view(np.int64)  # an array('q') is viewed as numpy's longlong
    if len(table) and (end_arr < 0).any():
        first = int(np.flatnonzero(end_arr < 0)[0])
        raise PlanDeadlock(f"plan deadlocked: op {first} ({KINDS[table.kind[first]]} on "
                           f"{table.streams[table.stream[first]]}) never ran")
    start_arr = np.asarray(start, dtype=np.int64).view(np.int64)
    order = topo.stream_order()
    busy = np.bincount(table.stream_positions(order), weights=end_arr - start_arr, minlength=len(order))
    return EngineRecord(start_ns=start_arr, end_ns=end_arr, busy_ns={s: int(busy[k]) for k, s in enumerate(order)},
                        peak_bytes=dict(peak), events=events, engine=engine)


