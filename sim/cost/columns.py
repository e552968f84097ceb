"""Prices of a plan held as columns (`sim.op_table.OpTable`), each distinct op priced once (issue 13).

A cost model prices an op by its kind, stream, phase, micro-batch, scope, payload, tokens, KV entries, FLOPs and
bytes (the `CostModel` protocol), so ops equal in those fields cost the same: here each distinct row of those columns
is priced once, through an `Op` made for it, and a grouped op's members likewise (a member stands for an op with the
group's fields and the member's tokens, FLOPs and bytes, as `sim.cost.GroupPrices` prices it). A CoX-MoE plan of
144k ops has about 1,200 distinct rows. The prices are the per-op path's, integer for integer: the same calls on the
same fields, and a group's time the integer sum of its members'.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from sim.cost.roofline import CostModel
from sim.op_table import KINDS, PAYLOADS, PHASES, OpTable
from sim.plan import Op

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it mixes a column into the hash, wrapping mod 2^64


def distinct_rows(columns: Sequence[np.ndarray] | Sequence[Callable[[], np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each distinct row, each row's index into those) over equal-length integer columns: rows hashed
    to 64 bits, the hash's distinct values taken, and every row compared with its representative, so that a
    collision falls back to an exact (slower) comparison of whole rows. A column may be given as a function that
    makes it: each is then made when read and let go after (twice: hashing, then comparing), so a plan's ten
    gathered columns are never held at once (a Qwen3-30B-A3B B=4096 plan's 776 k ops: 45 MB less at the peak)."""
    def made(col: np.ndarray | Callable[[], np.ndarray]) -> np.ndarray:
        return col() if callable(col) else col

    h: np.ndarray | None = None
    for col in columns:
        values = made(col).astype(np.int64, copy=False).view(np.uint64)
        if h is None:
            h = np.zeros(values.size, np.uint64)
        h *= _MIX
        h += values
        del values
        h ^= h >> np.uint64(29)
    assert h is not None, "distinct_rows needs at least one column"
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    del h
    if all(np.array_equal(c[first][inverse], c) for c in map(made, columns)):
        return first, inverse
    _, first, inverse = np.unique(np.stack([made(c) for c in columns], axis=1), axis=0, return_index=True,
                                  return_inverse=True)
    return first, inverse.reshape(-1)


def _gathered(column: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return column[rows]


def _dense_codes(code: np.ndarray, space: int) -> tuple[np.ndarray, int]:
    """(each entry's index among the distinct values of `code`, in increasing order of value; how many there are),
    for non-negative codes below `space`: by a presence table where that is small, else by sorting."""
    if space <= 1 << 24:
        present = np.zeros(space, dtype=bool)
        present[code] = True
        index = np.cumsum(present, dtype=np.int64) - 1
        return index[code], int(index[-1] + 1) if space else 0
    values, inverse = np.unique(code, return_inverse=True)
    return inverse.reshape(-1), values.size


@dataclass
class ColumnPrices:
    """Every op's time (`durations`, int64 ns), and what the list schedule needs to ask for usages: each plain op's
    distinct row (`plain_key`, -1 for grouped ops), each member's time and distinct row."""

    durations: np.ndarray
    plain_key: np.ndarray
    plain_ops: list[Op]  # an op standing for each distinct plain row
    member_times: np.ndarray
    member_key: np.ndarray
    member_ops: list[Op]  # an op standing for each distinct member row


def _row_ops(t: OpTable, rows: np.ndarray, tokens: np.ndarray, flops: np.ndarray, nbytes: np.ndarray,
             experts: np.ndarray) -> list[Op]:
    """Ops with the priced fields of `rows` and the given work, one per row (no dependencies or memory: prices do
    not read them), gathered column by column."""
    def of(column: np.ndarray) -> list:
        return column[rows].tolist()

    return list(map(Op, rows.tolist(), map(KINDS.__getitem__, of(t.kind)), map(t.streams.__getitem__, of(t.stream)),
                    map(PHASES.__getitem__, of(t.phase)), of(t.step), of(t.layer), of(t.micro_batch), tokens.tolist(),
                    flops.tolist(), nbytes.tolist(), repeat(()), experts.tolist(),
                    map(PAYLOADS.__getitem__, of(t.payload)), of(t.kv_tokens), repeat(()), repeat(()), of(t.scope)))


_SHAPE = ("kind", "stream", "phase", "micro_batch", "scope", "payload", "kv_tokens")


def _priced(cost: CostModel, ops: list[Op]) -> np.ndarray | None:
    """`cost.op_time_ns` of each op as int64, or None when one passes int64 nanoseconds."""
    times = list(map(cost.op_time_ns, ops))
    return None if max(times) >= 1 << 63 else np.array(times, np.int64)


def price_table(cost: CostModel, t: OpTable) -> ColumnPrices | None:
    """Each op's time under `cost`, or None when an op's time (a grouped op's: its members' sum) passes int64
    nanoseconds (a run longer than the engine's clock holds)."""
    n = len(t)
    grouped = np.zeros(n, dtype=bool)
    grouped[t.member_rows] = True
    plain = np.flatnonzero(~grouped)
    durations = np.zeros(n, np.int64)
    plain_key = np.full(n, -1, np.int32)  # distinct rows number fewer than ops (int32: 4 bytes an op)
    plain_ops: list[Op] = []
    if plain.size:
        first, inverse = distinct_rows([functools.partial(_gathered, getattr(t, name), plain)
                                        for name in (*_SHAPE, "tokens", "flops", "bytes")])
        rows = plain[first]
        plain_ops = _row_ops(t, rows, t.tokens[rows], t.flops[rows], t.bytes[rows], t.expert[rows])
        times = _priced(cost, plain_ops)
        if times is None:
            return None
        durations[plain] = times[inverse]
        plain_key[plain] = inverse
    member_times, member_key, member_ops = np.zeros(0, np.int64), np.zeros(0, np.int64), []
    if t.member_ids.size:
        counts = np.diff(t.member_start)
        rows, table, ids = t.member_rows, t.member_table, t.member_ids
        _, shape_of_group = distinct_rows([getattr(t, name)[rows] for name in _SHAPE])  # per grouped op
        work_first, work_of_member = distinct_rows([table[:, 1], table[:, 2], table[:, 3]])  # per distinct member
        works = work_first.size
        code = np.repeat(shape_of_group.astype(np.int64) * works, counts)  # (group shape, member work) as one int
        code += work_of_member[ids]
        member_key, keys = _dense_codes(code, int(shape_of_group.max(initial=0) + 1) * works)
        member_key = member_key.astype(np.int32)  # 4 bytes a member: Qwen3-30B-A3B at B=4096 holds 1.58 M
        any_member = np.empty(keys, np.int64)
        any_member[member_key] = np.arange(member_key.size)  # a member of each key (any one: they price alike)
        group_of = np.searchsorted(t.member_start, any_member, side="right") - 1
        chosen = table[ids[any_member]]
        member_ops = _row_ops(t, rows[group_of], chosen[:, 1], chosen[:, 2], chosen[:, 3], chosen[:, 0])
        distinct_times = _priced(cost, member_ops)
        if distinct_times is None:
            return None
        member_times = distinct_times[member_key]
        if int(distinct_times.max()) * int(counts.max()) < 1 << 63:
            durations[rows] = np.add.reduceat(member_times, t.member_start[:-1])
        else:  # sums that could pass int64: in Python ints
            sums = np.add.reduceat(member_times.astype(object), t.member_start[:-1])
            if max(sums) >= 1 << 63:
                return None
            durations[rows] = np.array(sums.tolist(), np.int64)
    return ColumnPrices(durations, plain_key, plain_ops, member_times, member_key, member_ops)
