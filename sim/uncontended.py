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
anywhere, a pool overflows, underflows or is not the system's, or the schedule reaches 2^53 ns (104 days, past
which the engine's float bookkeeping is no longer exact and near whose end it raises RunTooLong); the caller then
runs the SimPy machine, which gives the result, or the error, that the plan has (the engine hands over only a plan
whose dependencies all point back: a table's ids are its rows). It reads the plan as columns (`sim.op_table`) with
each op's price (`sim.cost.columns`). When it returns a schedule, that schedule is the SimPy machine's, op for op,
bit for bit (tests/test_uncontended.py, benchmarks/engine_exactness.py).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import repeat

import numpy as np

from sim.cost.columns import ColumnPrices
from sim.op_table import OpTable
from sim.plan import Op
from sim.topology import Topology

# The engine slows jobs when a resource's summed usage exceeds 1 + 1e-9 (sim.engine._EPS). The verification
# accepts only sums that stay this far below that line, so a different order of the same float additions cannot
# put the engine on the other side of it.
SATURATION_LIMIT = 1.0 + 1e-9 - 1e-12


class _Forward:
    """Every op's start and end when nothing slows anything, computed chunk by chunk in id order (an op's
    dependencies and stream predecessor come earlier, so a prefix of ops is final once computed), from the plan's
    columns (dependencies in CSR form, stream codes, durations), each chunk's read into Python lists as it is
    scheduled: a contended plan, refused after a few chunks, never holds its whole plan as lists."""

    def __init__(self, table: OpTable, durations: np.ndarray):
        self.table, self.durations = table, durations
        self.start: list[int] = []
        self.end: list[int] = []
        self.free_at = [0] * max(len(table.streams), 1)
        self.done = 0

    def advance(self, upto: int) -> bool:
        """Schedule ops up to id `upto` (exclusive); False if the schedule reaches EXACT_NS (the engine is the
        reference there)."""
        lo, t = self.done, self.table
        durations, stream = self.durations[lo:upto].tolist(), t.stream[lo:upto].tolist()
        bounds = t.dep_start[lo:upto + 1]
        first = int(bounds[0])
        dep_start, dep_ids = (bounds - first).tolist(), t.dep_ids[first:int(bounds[-1])].tolist()
        start, end, free_at = self.start, self.end, self.free_at
        start += repeat(0, upto - lo)
        end += repeat(0, upto - lo)
        a = 0
        for j in range(upto - lo):
            s = stream[j]
            now = free_at[s]
            b = dep_start[j + 1]
            if b - a == 1:
                e = end[dep_ids[a]]
                if e > now:
                    now = e
            elif b > a:
                for d in dep_ids[a:b]:
                    e = end[d]
                    if e > now:
                        now = e
            a = b
            i = lo + j
            start[i] = now
            free_at[s] = end[i] = now + durations[j]
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


def _pools_fit(table: OpTable, start: list[int], end: list[int], capacity: dict[str, int],
               static: dict[str, int]) -> dict[str, int] | None:
    """Peak bytes per pool as the engine judges them (a pool's level counts after every allocation and free of an
    instant), or None if a pool would exceed its capacity at an instant that allocates, drop below its static
    level at one that frees, or is not the system's (the engine raises; let it name the op). Python ints
    throughout: nothing bounds a plan's allocation sizes."""
    changes: dict[str, list[tuple[int, int, bool]]] = {}
    alloc, free = table.alloc, table.free
    for i in sorted(alloc.keys() | free.keys()):
        for pool, nbytes in alloc.get(i, ()):
            changes.setdefault(pool, []).append((start[i], nbytes, True))
        for pool, nbytes in free.get(i, ()):
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


def list_schedule(table: OpTable, prices: ColumnPrices, topo: Topology, shared_groups: set[str],
                  usage: Callable[[Op], tuple[float, float]], pool_capacity: dict[str, int], static: dict[str, int]
                  ) -> tuple[list[int], list[int], dict[str, int]] | None:
    """(start ns, end ns, peak bytes) of every op when no op ever slows another, or None when some op would (or a
    pool overflows): see the module docstring. `prices` are the ops' times (`sim.cost.columns`); `usage(op)` an op's
    (own resource, memory) shares, asked once per distinct op at each check (a few checks a plan).

    Ops are scheduled and checked in growing chunks of ids: the jobs of a prefix of ops are a subset of those
    running at any instant, so a resource they already oversubscribe is oversubscribed, and a contended plan
    is handed to the engine after a few thousand ops rather than after all of them."""
    forward = _Forward(table, prices.durations)
    code = {name: k for k, name in enumerate(table.streams)}
    groups = [_GroupJobs(group, table, prices, topo, code, usage) for group in sorted(shared_groups)]
    n = len(table)
    upto = min(n, FIRST_CHUNK)
    while True:
        if not forward.advance(upto):
            return None
        if groups:
            start = np.array(forward.start, np.int64)
            for jobs in groups:
                if not jobs.fit(start, upto):
                    return None
        if upto == n:
            break
        upto = min(n, upto * (CHUNK_GROWTH + 1))
    peak = _pools_fit(table, forward.start, forward.end, pool_capacity, static)
    if peak is None:
        return None
    return forward.start, forward.end, peak


def _usage_vectors(ops: list[Op], keys: np.ndarray, t: OpTable, units: list, usage: Callable[[Op], tuple[float, float]],
                   size: int) -> np.ndarray:
    """Per distinct op (row k of the result for `ops[k]`), its usage placed in its group's resource vector; asked of
    the cost model only for the keys jobs name."""
    vectors = np.zeros((len(ops), size))
    for k in np.unique(keys).tolist():
        op = ops[k]
        vectors[k] = units[t.stream[op.id]].usage_vector(usage(op), size)
    return vectors


class _GroupJobs:
    """The jobs of one shared group (its ops with time; a grouped op's members each) as arrays: each job's stream (its
    position among the group's streams with ops, in the machine's order), time, usage vector and, for a member, its
    offset from its op's start. Made for the ops checked so far only (each check remakes them for its longer
    prefix): a contended plan, refused after its first chunks, never holds them for all its ops (a Qwen3-30B-A3B
    B=4096 plan's 776 k ops and 1.6 M members: 64 MB)."""

    def __init__(self, group: str, t: OpTable, prices: ColumnPrices, topo: Topology, code: dict[str, int],
                 usage: Callable[[Op], tuple[float, float]]):
        self.t, self.prices, self.usage = t, prices, usage
        self.size = topo.group_sizes[group]
        used = set(t.stream.tolist()) if len(t) else set()
        names = [name for name, unit in topo.streams.items() if unit.group == group and code.get(name) in used]
        self.streams = len(names)
        self.position = np.full(max(len(t.streams), 1), -1, np.int64)  # stream code -> position in the group, or -1
        for k, name in enumerate(names):
            self.position[code[name]] = k
        self.units = [topo.streams[name] for name in t.streams]

    def _jobs(self, upto: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(op of each job, offset from its op's start, time, stream, usage vector) of the ops below `upto`: plain
        ops first, then members."""
        t, prices, position = self.t, self.prices, self.position
        durations = prices.durations[:upto]
        in_group = position[t.stream[:upto]] >= 0
        # plain ops with time
        rows = np.flatnonzero(in_group & (prices.plain_key[:upto] >= 0) & (durations > 0))
        keys = prices.plain_key[rows]
        vectors = _usage_vectors(prices.plain_ops, keys, t, self.units, self.usage, self.size)
        # grouped ops' members with time, each offset from its op's start by the members before it
        groups = int(np.searchsorted(t.member_rows, upto))
        member_start = t.member_start[:groups + 1]
        counts = np.diff(member_start)
        owner = np.repeat(t.member_rows[:groups], counts)
        times = prices.member_times[:int(member_start[-1])]
        before = np.cumsum(times) - times
        if times.size:
            before -= np.repeat(before[member_start[:-1]], counts)
        take = np.flatnonzero(in_group[owner] & (times > 0)) if times.size else np.zeros(0, np.int64)
        mkeys = prices.member_key[take]
        mvectors = _usage_vectors(prices.member_ops, mkeys, t, self.units, self.usage, self.size)
        members = owner[take]
        return (np.concatenate([rows, members]), np.concatenate([np.zeros(rows.size, np.int64), before[take]]),
                np.concatenate([durations[rows], times[take]]),
                np.concatenate([position[t.stream[rows]], position[t.stream[members]]]),
                np.concatenate([vectors[keys], mvectors[mkeys]]))

    def fit(self, start: np.ndarray, upto: int) -> bool:
        """Whether the jobs of ops below `upto` (starting at `start`, the schedule so far) leave every resource within
        its capacity."""
        ops, offset, ns, stream, usages = self._jobs(upto)
        if not ops.size:
            return True
        starts = start[ops] + offset
        ends = starts + ns
        order = np.lexsort((starts, stream))
        return _group_fits(starts[order], ends[order], usages[order], stream[order], self.streams)
