"""The exact schedule of a plan whose ops never slow one another, in one pass over its ops (issue 13).

The SimPy machine (`sim.engine`) slows ops only while the ops running in one resource group need more of a
resource than it has. When that never happens, every op runs at full speed, and the machine's result is the list
schedule: an op starts when its stream's previous op and all its dependencies have ended, and lasts its price.
That takes one Python pass over the ops instead of a few SimPy events and a dozen calls each.

`list_schedule` computes that schedule and then verifies its premise: at every instant a job starts in a shared
group (a group more than one stream of the plan uses), the jobs running then (start <= t < end, one per stream at
most; a grouped op's members each in their own interval) need no resource beyond its capacity, with a margin
that float summation order cannot cross (usages are non-negative; a negative one declines). It also replays the
memory pools as the engine judges them (once per instant, in Python ints). It returns None when the premise fails
anywhere, a pool overflows, underflows or is not the system's, an op's id is not its position or a dependency
does not point backwards, or the schedule reaches 2^53 ns (104 days, past which the engine's float bookkeeping is
no longer exact and near whose end it raises RunTooLong); the caller then runs the SimPy machine, which gives the
result, or the error, that the plan has. When it returns a schedule, that schedule is the SimPy machine's, op for
op, bit for bit (tests/test_uncontended.py, benchmarks/engine_exactness.py).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence

import numpy as np

from sim.plan import Op
from sim.topology import Topology

# The engine slows jobs when a resource's summed usage exceeds 1 + 1e-9 (sim.engine._EPS). The verification
# accepts only sums that stay this far below that line, so a different order of the same float additions cannot
# put the engine on the other side of it.
SATURATION_LIMIT = 1.0 + 1e-9 - 1e-12


class _Forward:
    """Every op's start and end when nothing slows anything, computed chunk by chunk in id order (an op's
    dependencies and stream predecessor come earlier, so a prefix of ops is final once computed)."""

    def __init__(self, ops: Sequence[Op], durations: Sequence[int], stream_index: Sequence[int], streams: int):
        self.ops, self.durations, self.stream_index = ops, durations, stream_index
        self.start = [0] * len(ops)
        self.end = [0] * len(ops)
        self.free_at = [0] * streams
        self.done = 0

    def advance(self, upto: int) -> bool:
        """Schedule ops up to id `upto` (exclusive); False if an op's id is not its position, a dependency does not
        point backwards, or the schedule reaches EXACT_NS (the engine names the first two, and is the reference for
        the third)."""
        ops, durations, stream_index = self.ops, self.durations, self.stream_index
        start, end, free_at = self.start, self.end, self.free_at
        for i in range(self.done, upto):
            s = stream_index[i]
            t = free_at[s]
            op = ops[i]
            if op.id != i:  # not a checked plan: let the engine judge it
                return False
            deps = op.deps
            if deps:
                for d in deps:
                    if d >= i or d < 0:
                        return False
                    e = end[d]
                    if e > t:
                        t = e
            start[i] = t
            free_at[s] = end[i] = t + durations[i]
        self.done = upto
        return max(free_at, default=0) < EXACT_NS


def _group_fits(starts: np.ndarray, ends: np.ndarray, usages: np.ndarray, stream_of_job: np.ndarray,
                streams: int) -> bool:
    """Whether the jobs of one group (intervals [start, end) with usage rows, each on one stream whose jobs do not
    overlap) stay within every resource's capacity at each job's start, where the running set is largest."""
    if starts.size == 0:
        return True
    if usages.min() < 0.0:  # a cost model's usage below zero: the order of additions could matter
        return False
    checks = starts  # every job's start (repeats cost a little, sorting them more)
    total = np.zeros((checks.size, usages.shape[1]))
    for s in range(streams):
        mine = np.flatnonzero(stream_of_job == s)  # in order: a stream's jobs run one after another
        if mine.size == 0:
            continue
        s_starts, s_ends, s_usages = starts[mine], ends[mine], usages[mine]
        k = np.searchsorted(s_starts, checks, side="right") - 1
        running = k >= 0
        k[~running] = 0
        running &= s_ends[k] > checks
        total += s_usages[k] * running[:, None]
    return bool(total.max() <= SATURATION_LIMIT)


def _pools_fit(ops: Sequence[Op], start: list[int], end: list[int], capacity: dict[str, int],
               static: dict[str, int]) -> dict[str, int] | None:
    """Peak bytes per pool as the engine judges them (a pool's level counts after every allocation and free of an
    instant), or None if a pool would exceed its capacity at an instant that allocates, drop below its static
    level at one that frees, or is not the system's (the engine raises; let it name the op). Python ints
    throughout: nothing bounds a plan's allocation sizes."""
    changes: dict[str, list[tuple[int, int, bool]]] = {}
    for i, op in enumerate(ops):
        if op.alloc:
            for pool, nbytes in op.alloc:
                changes.setdefault(pool, []).append((start[i], nbytes, True))
        if op.free:
            for pool, nbytes in op.free:
                changes.setdefault(pool, []).append((end[i], -nbytes, False))
    if any(used > capacity[pool] for pool, used in static.items()) or not changes.keys() <= capacity.keys():
        return None
    peak = dict(static)
    for pool, rows in changes.items():
        rows.sort(key=_instant)
        base, top = static.get(pool, 0), capacity[pool]
        level, high = base, peak.get(pool, 0)
        k, n = 0, len(rows)
        while k < n:  # one instant at a time
            now, allocating, freeing = rows[k][0], False, False
            while k < n and rows[k][0] == now:
                _, delta, is_alloc = rows[k]
                level += delta
                allocating |= is_alloc
                freeing |= not is_alloc
                k += 1
            if (freeing and level < base) or (allocating and level > top):
                return None
            if allocating and level > high:
                high = level
        peak[pool] = high
    return peak


def _instant(row: tuple[int, int, bool]) -> int:
    return row[0]


# Above this many nanoseconds (104 days) the engine's float bookkeeping of work left is no longer exact, and runs
# near int64's range end in RunTooLong: a schedule reaching it is left to the engine.
EXACT_NS = 1 << 53

FIRST_CHUNK = 4096  # ops scheduled and checked before the first look for an oversubscribed resource
CHUNK_GROWTH = 8  # each later chunk this many times the ops checked so far: a contended plan fails early, an
                  # uncontended one is checked at most 9/8 times over


def list_schedule(ops: Sequence[Op], durations: Sequence[int], topo: Topology, by_stream: dict[str, list[int]],
                  shared_groups: set[str], usage: Callable[[Op], tuple[float, float]],
                  member_parts: Callable[[Op], list[tuple[int, tuple[float, float]]]],
                  pool_capacity: dict[str, int], static: dict[str, int]
                  ) -> tuple[list[int], list[int], dict[str, int]] | None:
    """(start ns, end ns, peak bytes) of every op when no op ever slows another, or None when some op would (or a
    pool overflows): see the module docstring. `by_stream` lists each stream's op ids in order; `usage(op)` is an
    op's (own resource, memory) shares, `member_parts(op)` a grouped op's (ns, usage) per member, in order.

    Ops are scheduled and checked in growing chunks of ids: the jobs of a prefix of ops are a subset of those
    running at any instant, so a resource they already oversubscribe is oversubscribed, and a contended plan
    is handed to the engine after a few thousand ops rather than after all of them."""
    names = list(topo.streams)
    stream_index = [0] * len(ops)
    for k, name in enumerate(names):
        for i in by_stream[name]:
            stream_index[i] = k
    forward = _Forward(ops, durations, stream_index, len(names))
    groups = [_GroupJobs(group, ops, durations, topo, by_stream, forward, usage, member_parts)
              for group in sorted(shared_groups)]
    n = len(ops)
    upto = min(n, FIRST_CHUNK)
    while True:
        if not forward.advance(upto):
            return None
        for jobs in groups:
            jobs.collect(upto)
            if not jobs.fit():
                return None
        if upto == n:
            break
        upto = min(n, upto * (CHUNK_GROWTH + 1))
    peak = _pools_fit(ops, forward.start, forward.end, pool_capacity, static)
    if peak is None:
        return None
    return forward.start, forward.end, peak


class _GroupJobs:
    """The jobs of one shared group (its ops with time; a grouped op's members each), collected op by op in id
    order from the list schedule, as rows of (start, end, usage row, stream)."""

    def __init__(self, group: str, ops: Sequence[Op], durations: Sequence[int], topo: Topology,
                 by_stream: dict[str, list[int]], forward: _Forward, usage: Callable[[Op], tuple[float, float]],
                 member_parts: Callable[[Op], list[tuple[int, tuple[float, float]]]]):
        self.size = topo.group_sizes[group]
        self.ops, self.durations, self.forward = ops, durations, forward
        self.usage, self.member_parts = usage, member_parts
        self.streams = [(name, topo.streams[name], by_stream[name]) for name, unit in topo.streams.items()
                        if unit.group == group and by_stream[name]]
        self.taken = [0] * len(self.streams)  # per stream: how many of its ops are collected
        self.rows: dict[tuple[str, tuple[float, float]], int] = {}  # (stream, usage) -> row of `vectors`
        self.vectors: list[tuple[float, ...]] = []
        self.start: list[int] = []
        self.end: list[int] = []
        self.row: list[int] = []
        self.stream: list[int] = []
        self.consistent = True

    def collect(self, upto: int) -> None:
        """Add the jobs of ops with ids below `upto`."""
        ops, durations, usage = self.ops, self.durations, self.usage
        start, end = self.forward.start, self.forward.end
        rows, vectors, size = self.rows, self.vectors, self.size
        j_start, j_end, j_row, j_stream = self.start, self.end, self.row, self.stream
        for k, (name, unit, ids) in enumerate(self.streams):
            stop = bisect_left(ids, upto, lo=self.taken[k])
            for i in ids[self.taken[k]:stop]:
                ns = durations[i]
                if not ns:
                    continue
                op = ops[i]
                t = start[i]
                if not op.members:  # the common case, inline
                    key = (name, usage(op))
                    row = rows.get(key)
                    if row is None:
                        row = rows[key] = len(vectors)
                        vectors.append(unit.usage_vector(key[1], size))
                    j_start.append(t)
                    j_end.append(t + ns)
                    j_row.append(row)
                    j_stream.append(k)
                    continue
                for ns, u in self.member_parts(op):
                    if not ns:
                        continue
                    key = (name, u)
                    row = rows.get(key)
                    if row is None:
                        row = rows[key] = len(vectors)
                        vectors.append(unit.usage_vector(u, size))
                    j_start.append(t)
                    t += ns
                    j_end.append(t)
                    j_row.append(row)
                    j_stream.append(k)
                if t != end[i]:  # members' times sum to the op's (GroupPrices); if not, leave it to the engine
                    self.consistent = False
            self.taken[k] = stop

    def fit(self) -> bool:
        """Whether the jobs collected so far leave every resource within its capacity."""
        if not self.consistent:
            return False
        if not self.start:
            return True
        table = np.asarray(self.vectors, dtype=np.float64).reshape(len(self.vectors), self.size)
        return _group_fits(np.asarray(self.start, dtype=np.int64), np.asarray(self.end, dtype=np.int64),
                           table[np.asarray(self.row, dtype=np.int64)], np.asarray(self.stream, dtype=np.int64),
                           len(self.streams))
