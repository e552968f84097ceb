"""`Plan.check`'s per-op conditions as column-wide tests over an `OpTable` (issue 13): which ops could fail them.

The check names the first op (in id order) that breaks a rule, with a message made by its per-op code. Here every
condition that code tests on an op that needs no closer look (no memory of its own, no explicit scope; a grouped
op's members bounded, distinct and summing to the op) is tested for all ops at once; the ops that fail any (the
"suspects") then go through the per-op code in id order, which raises where it raised before, or passes them. An
op that is not a suspect passes the per-op code: the two tests are the same conditions.
"""

from __future__ import annotations

import numpy as np

from sim.op_table import INT64_MAX, KINDS, OpTable
from sim.plan import MAX_OP_WORK, OpKind

_EXPERT = KINDS.index(OpKind.EXPERT)
# A grouped op with more members than this could sum past int64 (each member's work is at most MAX_OP_WORK = 2^50):
# the per-op code (Python ints) judges it.
MAX_SUMMED_MEMBERS = 1 << 12


def _cap(value: int) -> int:
    return min(value, INT64_MAX)


def deps_point_back(table: OpTable) -> bool:
    """Whether every dependency names an earlier op (ids are positions in a table by construction)."""
    if table.dep_ids.size == 0:
        return True
    return bool(((table.dep_ids >= 0) & (table.dep_ids < table.dep_owner())).all())


def suspect_rows(table: OpTable, *, max_step: int, layers: int, experts: int, tokens: tuple[int, int],
                 kv: tuple[int, int], groups: tuple[int, int], streams: set[str] | dict) -> np.ndarray:
    """Rows (ascending) that could fail `Plan.check`'s per-op code; bounds indexed by `phase is decode` as
    `sim.plan._ScopeBounds` gives them."""
    t = table
    n = len(t)
    if n == 0:
        return np.zeros(0, np.int64)
    d = t.decode()
    known = np.array([name in streams for name in t.streams], dtype=bool)
    step, tok, kvt, mb = t.step, t.tokens, t.kv_tokens, t.micro_batch
    ok = (tok >= 0) & (tok <= np.where(d, _cap(tokens[1]), _cap(tokens[0])))
    ok &= (kvt >= 0) & (kvt <= np.where(d, _cap(kv[1]), _cap(kv[0])))
    ok &= np.where(d, (step >= 1) & (step <= max_step), step == 0)
    ok &= (t.layer >= -1) & (t.layer <= layers) & (t.expert >= -1) & (t.expert < experts)
    ok &= (mb >= -1) & (mb < np.where(d, _cap(groups[1]), _cap(groups[0])))
    ok &= known[t.stream] & (t.scope == -1)
    for rows in (t.alloc, t.free):
        if rows:
            ok[np.fromiter(rows, np.int64, len(rows))] = False
    plain = np.ones(n, dtype=bool)
    plain[t.member_rows] = False
    ok &= ~plain | ((t.flops >= 0) & (t.flops <= MAX_OP_WORK) & (t.bytes >= 0) & (t.bytes <= MAX_OP_WORK))
    if t.member_rows.size:
        ok[t.member_rows] &= _members_ok(t, experts)
    return np.flatnonzero(~ok)


def _members_ok(t: OpTable, experts: int) -> np.ndarray:
    """Per grouped op: kind expert with expert -1, two or more members each of an expert in range, tokens in
    [1, 2^50] and work in [0, 2^50], no expert twice, summing to the op's tokens, FLOPs and bytes (what
    `sim.plan._check_members` requires; tokens bounded here only so that the sums stay exact)."""
    rows, starts, ids, table = t.member_rows, t.member_start, t.member_ids, t.member_table
    counts = np.diff(starts)
    first = starts[:-1]
    e, tok, fl, by = table[:, 0], table[:, 1], table[:, 2], table[:, 3]
    each = (e >= 0) & (e < experts) & (tok >= 1) & (tok <= MAX_OP_WORK) & (fl >= 0) & (fl <= MAX_OP_WORK)
    each &= (by >= 0) & (by <= MAX_OP_WORK)  # per distinct member, then per member through its id
    ok = np.logical_and.reduceat(each[ids], first) & (counts >= 2) & (counts <= MAX_SUMMED_MEMBERS)
    ok &= (t.kind[rows] == _EXPERT) & (t.expert[rows] == -1)
    for column, total in ((tok, t.tokens), (fl, t.flops), (by, t.bytes)):  # a member-long column at a time
        ok &= np.add.reduceat(column[ids], first) == total[rows]
    ok &= _distinct(e[ids], owner_first=first, counts=counts, experts=experts)
    return ok


def _distinct(e: np.ndarray, owner_first: np.ndarray, counts: np.ndarray, experts: int) -> np.ndarray:
    """Per group of member expert ids (`counts` ids from each of `owner_first`): whether no id appears twice. Ids
    outside 0..experts-1 may answer anything (the caller fails their groups): each group's ids as bits of
    64-bit words, OR-ed together, must set as many bits as the group has ids; past 64 words, a sort."""
    words = (experts + 63) // 64
    if words > 64:
        owner = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
        key = np.sort(owner * experts + np.clip(e, 0, experts - 1))
        twice = np.zeros(counts.size, dtype=bool)
        twice[(key[1:][key[1:] == key[:-1]]) // experts] = True
        return ~twice
    set_bits = np.zeros(counts.size, np.int64)
    low = (e & 63).astype(np.uint64)
    for w in range(words):
        bits = np.where((e >> 6) == w, np.left_shift(np.uint64(1), low), np.uint64(0))
        set_bits += np.bitwise_count(np.bitwise_or.reduceat(bits, owner_first))
    return set_bits == counts
