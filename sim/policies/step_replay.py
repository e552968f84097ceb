"""Decode-step replay: a decode step whose op graph repeats an earlier step's is copied from it, not re-emitted.

Two decode steps of one layout have the same ops in the same order, with the same streams, dependencies (shifted
by the ids between them), copies and memory, when their micro-batches hold the same requests and the same experts
receive tokens (issue 13). What differs between them is numbers: the step, the KV entries each attention reads,
each expert op's tokens (and a grouped op's members), and the copies that carry the routed experts' outputs. The
first step of a shape is emitted the ordinary way while a `Recording` notes what a replay needs; when a later step
has its shape, the recording becomes a `StepTemplate`, and `replay` copies its ops and recomputes just those
numbers from the later step's slices, with the formulas the emitter uses. `LayoutEmitter._replay_key` says which
steps may be replayed; a plan built with replay is the plan built without it, op for op (tests/test_step_replay.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import NamedTuple

import numpy as np

from sim.cost import OpWork
from sim.op_table import MEMBER_ID, OpTable
from sim.plan import Op, OpKind, PlanBuilder
from sim.policies.layers import BatchSlice, copy_traffic
from traces.limits import MEMBER_OP_SHARE

# step shapes an emitter keeps the first step of (routing that leaves experts idle at some steps makes several)
SHAPES_KEPT = 16


@dataclass(frozen=True, slots=True)
class RoutedCopy:
    """A copy of the outputs of `experts` (summed over the counts of micro-batch `mb` at MoE layer `li`; -1: all
    of the step's) that carries min(their tokens, `cap`) tokens: how `LayoutEmitter._experts` sizes it."""

    position: int  # in the step
    li: int
    mb: int
    experts: tuple[int, ...]
    cap: int


@dataclass
class StepTemplate:
    """A decode step's ops as emitted, as columns (what a replay copies), with what a replay recomputes. Made by
    `Recording.template`."""

    table: OpTable  # the step's ops; dependencies as positions in the step, or -1 - k for `externals[k]`
    first: int  # id of its first op
    externals: tuple[int, int]  # the two earlier layers' last GPU ops its fetches waited for (-1: none)
    external: bool  # whether any op depends on one of them
    layer_done: list[int]  # per (step, layer) visit of the step, its last GPU op's position (-1: none)
    attention: list[tuple[int, int]]  # (position, micro-batch) of each attention op
    experts: list[tuple[int, int, int, tuple[int, ...] | None, int]]  # (position, MoE layer, micro-batch or -1, a
    # grouped op's expert ids, the expert of an op that is not grouped) of each expert op, in order
    routed: list[RoutedCopy]
    routed_streams: list[str]  # the stream of each routed copy
    member_calls: list[int]  # grouped members charged to the builder, call by call, as emission charged them
    vectors: _Vectors | None = None  # its index arrays, made on its first replay (`_recomputed`)

    @property
    def size(self) -> int:
        return len(self.table)


class StepShape(NamedTuple):
    """What decides a decode step's ops besides its numbers (`LayoutEmitter._replay_key`): steps of one shape
    differ only in what a replay recomputes."""

    layout: int  # id of the layout (the emitter holds the layout, so the id stays its)
    slices: tuple[tuple[int, int, int], ...]  # per micro-batch: index, tokens, requests
    waits: tuple[bool, bool]  # whether the last GPU ops of the two visits before the step exist
    busy: bytes  # which experts of which layer receive tokens in each expert run (`pattern_of`)


@dataclass
class Recording:
    """What a step emitted the ordinary way leaves for its template beyond its ops: filled while it is emitted
    (`routed`, `member_calls`), closed when it ends (`close`). The template itself is made only when a later step
    has the same shape (`template`): a shape seen once costs no copy of its ops."""

    ops: list[Op]  # the builder's ops: the step's stay at [first, end), never changed once appended
    first: int
    seq: int
    externals: tuple[int, int]
    scopes: int
    kv_state: tuple[int, int]
    routed: list[RoutedCopy] = field(default_factory=list)
    member_calls: list[int] = field(default_factory=list)
    end: int = -1
    layer_done: list[int] = field(default_factory=list)
    replayable: bool = False
    _template: StepTemplate | None = None

    def close(self, layer_done: dict[int, int], seq_end: int, scopes: int, kv_state: tuple[int, int]) -> None:
        """The step has been emitted: note its end and its layers' last GPU ops, and whether it made state a replay
        would not (a scope of its own, a streamed KV cache's buffers)."""
        self.end = len(self.ops)
        self.layer_done = [layer_done.get(seq, -1) for seq in range(self.seq, seq_end)]
        self.replayable = scopes == self.scopes and kv_state == self.kv_state and not (
            self.externals[0] >= 0 and self.externals[0] == self.externals[1])

    def template(self, moe_index: list[int]) -> StepTemplate | None:
        """The step's template (made once), or None when it holds what a replay could not reproduce: state of its
        own (`close`), a dependency on an earlier op other than the fetches' double-buffer waits, or a layer whose
        last GPU op is an earlier step's."""
        if self._template is None and self.replayable:
            self._template = self._make(moe_index)
            self.replayable = self._template is not None
        return self._template

    def _make(self, moe_index: list[int]) -> StepTemplate | None:
        first = self.first
        step_ops = self.ops[first:self.end]
        table = OpTable.from_ops(step_ops, first=first)
        if table is None:
            return None
        dep = table.dep_ids
        outside = dep < first
        external = bool(outside.any())
        if external:  # only the fetches' double-buffer waits may name an op before the step
            slot = np.full(dep.shape, -3, np.int64)
            for k, old in enumerate(self.externals):
                if old >= 0:
                    slot[dep == old] = -1 - k
            if (slot[outside] == -3).any():
                return None
            table.dep_ids = np.where(outside, slot, dep - first)
        else:
            table.dep_ids = dep - first
        attention, experts = [], []
        for k, op in enumerate(step_ops):
            if op.kind is OpKind.ATTENTION:
                attention.append((k, op.micro_batch))
            elif op.kind is OpKind.EXPERT:
                li = moe_index[op.layer]
                if li < 0 or op.scope != -1:
                    return None
                experts.append((k, li, op.micro_batch, tuple([m[0] for m in op.members]) if op.members else None,
                                op.expert))
        if any(0 <= last < first for last in self.layer_done):
            return None
        done = [last - first if last >= 0 else -1 for last in self.layer_done]
        routed = [RoutedCopy(c.position - first, c.li, c.mb, c.experts, c.cap) for c in self.routed]
        return StepTemplate(table, first, self.externals, external, done, attention, experts, routed,
                            [step_ops[c.position].stream for c in routed], self.member_calls)


def layer_done_pair(layer_done: dict[int, int], seq: int) -> tuple[int, int]:
    """The last GPU ops of the two visits before `seq`: the only earlier ops a step's fetches wait for."""
    return layer_done.get(seq - 2, -1), layer_done.get(seq - 1, -1)


def pattern_of(slices: list[BatchSlice], groups: list[list[int]]) -> bytes:
    """Which experts of which layer receive tokens in each expert run (`groups` of micro-batches, as
    `LayoutEmitter` gathers them): what decides which expert ops exist."""
    if len(groups) == 1 and len(slices) > 1:  # coalesced: one run over the step's tokens
        busy = np.logical_or.reduce([s.counts > 0 for s in slices])
    else:
        busy = np.stack([np.logical_or.reduce([slices[i].counts > 0 for i in group]) for group in groups])
    return np.packbits(busy).tobytes()


Member = tuple[int, int, int, int]  # a grouped op's member: (expert, tokens, flops, bytes)


def replay(t: StepTemplate, slices: list[BatchSlice], step: int, builder: PlanBuilder, work: OpWork,
           layer_done: dict[int, int], seq: int, members: MemberIndex) -> bool:
    """Append template `t`'s ops for decode step `step` of `slices` (same shape as the template's step), as columns
    with ids from the builder's next, and record its layers' last GPU ops in `layer_done` from visit `seq` on.
    False (and nothing appended) when the step would cross the builder's op limit, or a recomputed number would not
    fit int64: the caller emits it the ordinary way, which raises where emission would (or `Plan.check` does)."""
    first = len(builder.ops)
    n = t.size
    load = builder.member_load
    for m in t.member_calls:  # charged call by call: the same float sums as emission's
        load += m * MEMBER_OP_SHARE
    if first + n - 1 + load >= builder.max_ops:  # the largest of the guards emission would apply in the step
        return False
    try:
        chunk = _recomputed(t, slices, work, members)
    except OverflowError:
        return False
    if chunk is None:
        return False
    builder.next_id(step)  # the step's guards, as its first op would call them (the load is the same)
    builder.member_load = load
    rel = t.table.dep_ids
    if t.external:
        now = np.array(layer_done_pair(layer_done, seq), np.int64)
        chunk.dep_ids = np.where(rel >= 0, rel + first, now[np.clip(-1 - rel, 0, 1)])
    else:
        chunk.dep_ids = rel + first
    chunk.step = np.full(n, step, np.int64)
    builder.ops.extend(repeat(None, n))
    builder.chunks.append((first, chunk))
    for k, done in enumerate(t.layer_done):
        layer_done[seq + k] = first + done if done >= 0 else -1
    return True


class MemberIndex:
    """An emitter's grouped-op members by (expert, tokens) as ids in its builder's member store, and an expert op's
    work by tokens, as arrays a replay gathers from (`_recomputed`): a step's hundreds of members looked up in a few
    numpy calls where a dict lookup each cost more than the rest of the replay. A member is made by the emitter
    (`members_of`: its one stored tuple) the first time any step meets it, and stored in the order replays meet
    them, as looking each up in turn stored them."""

    MAX_ENTRIES = 1 << 24  # (expert, tokens) ids held (64 MB), and at most this many tokens over the experts in the
    # work tables: a step with an expert's tokens past MAX_ENTRIES // experts is emitted, not replayed

    def __init__(self, expert_work: Callable[[int], Sequence[int]],
                 members_of: Callable[[Sequence[int], list[int]], tuple[Member, ...]], builder: PlanBuilder,
                 num_experts: int) -> None:
        self.expert_work, self.members_of, self.builder = expert_work, members_of, builder
        self.flops = np.zeros(0, np.int64)  # by tokens: an expert op's FLOPs and bytes (`OpWork.expert`)
        self.bytes = np.zeros(0, np.int64)
        self.known = np.zeros(0, bool)
        self.ids = np.full((max(num_experts, 1), 0), -1, np.int32)  # (expert, tokens) -> member id, -1: none yet
        self.max_tokens = self.MAX_ENTRIES // max(num_experts, 1)  # the tables' bound, in tokens

    def _grown(self, top: int, size: int) -> int:
        """The size a table indexed by tokens grows to, to hold index `top - 1`: doubled, within the bound (0: the
        bound refuses it)."""
        if top > self.max_tokens:
            return 0
        return min(max(top, 2 * size), self.max_tokens)

    def work(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """FLOPs and bytes of an expert op of each of `tokens` (OverflowError when one does not fit int64); None
        past the tables' bound."""
        top = int(tokens.max(initial=-1)) + 1
        if top > self.known.size:
            size = self._grown(top, self.known.size)
            if not size:
                return None
            self.flops, self.bytes, self.known = (np.concatenate([a, np.zeros(size - a.size, a.dtype)])
                                                  for a in (self.flops, self.bytes, self.known))
        missing = tokens[~self.known[tokens]]
        for t in np.unique(missing).tolist():
            flops, nbytes = self.expert_work(t)[:2]
            self.flops[t], self.bytes[t] = flops, nbytes  # OverflowError past int64, as a column would raise
            self.known[t] = True
        return self.flops[tokens], self.bytes[tokens]

    def member_ids(self, experts: np.ndarray, tokens: np.ndarray) -> np.ndarray | None:
        """Member ids of (experts[i], tokens[i]), new members stored in the order they first appear; None when the
        table would pass MAX_ENTRIES."""
        top = int(tokens.max(initial=-1)) + 1
        if top > self.ids.shape[1]:
            size = self._grown(top, self.ids.shape[1])
            if not size:
                return None
            grown = np.full((self.ids.shape[0], size), -1, np.int32)
            grown[:, :self.ids.shape[1]] = self.ids
            self.ids = grown
        ids = self.ids[experts, tokens]
        new = np.flatnonzero(ids < 0)
        if new.size:
            key = experts[new].astype(np.int64) * self.ids.shape[1] + tokens[new]
            _, first = np.unique(key, return_index=True)
            store = self.builder.members.add
            for i in np.sort(new[first]).tolist():
                e, t = int(experts[i]), int(tokens[i])
                self.ids[e, t] = store(self.members_of((e,), [t])[0])
            ids = self.ids[experts, tokens]
        return ids


def _segment_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of `values` over the segments [starts[i], starts[i + 1]) (the last to the end); an empty one sums to 0."""
    out = np.add.reduceat(np.append(values, values.dtype.type(0)), starts)
    out[np.append(starts[1:], values.size) == starts] = 0
    return out


@dataclass
class _Vectors:
    """A template's attention ops, expert ops and routed copies as index arrays into a step's loads ([slices + 1,
    MoE layers, experts]: each slice's counts, then their sum), made on its first replay for the micro-batches `mbs`
    of its slices, in order."""

    mbs: tuple[int, ...]
    att_pos: np.ndarray  # attention ops' positions, and each one's micro-batch as a row of the step's slices
    att_row: np.ndarray
    exp_pos: np.ndarray  # expert ops' positions, each one's first entry; entries: (row, MoE layer, expert)
    exp_start: np.ndarray
    widest: int  # entries of the largest expert op (bounds its sums: `_fits`)
    ent: tuple[np.ndarray, np.ndarray, np.ndarray]
    grouped: np.ndarray  # the entries that are grouped ops' members
    routed_pos: np.ndarray  # routed copies' positions, caps, first entries and entries
    routed_cap: np.ndarray
    routed_start: np.ndarray
    routed_ent: tuple[np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def of(cls, t: StepTemplate, mbs: tuple[int, ...]) -> _Vectors:
        row = {mb: i for i, mb in enumerate(mbs)}
        row[-1] = len(mbs)  # the step's loads summed over its micro-batches
        starts, rows, lis, es, grouped = [], [], [], [], []
        for _, li, mb, experts, expert in t.experts:
            starts.append(len(es))
            group = experts if experts is not None else (expert,)
            rows.extend([row[mb]] * len(group))
            lis.extend([li] * len(group))
            es.extend(group)
            grouped.extend([experts is not None] * len(group))
        r_starts, r_rows, r_lis, r_es = [], [], [], []
        for c in t.routed:
            r_starts.append(len(r_es))
            r_rows.extend([row[c.mb]] * len(c.experts))
            r_lis.extend([c.li] * len(c.experts))
            r_es.extend(c.experts)

        def ints(values: list[int]) -> np.ndarray:
            return np.array(values, np.int64)

        sizes = np.diff(starts + [len(es)])
        return cls(mbs, ints([k for k, _ in t.attention]), ints([row[mb] for _, mb in t.attention]),
                   ints([e[0] for e in t.experts]), ints(starts), int(sizes.max(initial=0)),
                   (ints(rows), ints(lis), ints(es)), np.array(grouped, bool), ints([c.position for c in t.routed]),
                   ints([c.cap for c in t.routed]), ints(r_starts), (ints(r_rows), ints(r_lis), ints(r_es)))


def _fits(values: np.ndarray, widest: int) -> None:
    """OverflowError when a sum of up to `widest` of `values` could pass int64 (a column would not hold it): a bound,
    so a step whose sums would all fit may decline too; emission then makes the same ops."""
    if values.size and int(values.max()) * max(widest, 1) >= 1 << 63:
        raise OverflowError("a replayed op's work does not fit int64")


def _recomputed(t: StepTemplate, slices: list[BatchSlice], work: OpWork, index: MemberIndex) -> OpTable | None:
    """The template's columns with the numbers of `slices` (attention's work and KV entries, expert ops' tokens,
    work and members (ids in the builder's store, whose table `PlanBuilder.result` gives the columns), routed
    copies' tokens and bytes), gathered from the step's loads with the template's index arrays (`_Vectors`); the
    columns no replay changes are shared with the template. OverflowError when a number does not fit int64; None
    when a member table would grow past its bound (the step is then emitted)."""
    tab = t.table
    mbs = tuple([s.mb for s in slices])
    vec = t.vectors
    if vec is None or vec.mbs != mbs:
        vec = t.vectors = _Vectors.of(t, mbs)
    flops_col, bytes_col, kv_col = tab.flops.copy(), tab.bytes.copy(), tab.kv_tokens
    if vec.att_pos.size:  # one cost per micro-batch: its attention ops differ only in their layer
        costs = [work.attention(s.tokens, s.kv_attended, s.kv_read, False) for s in slices]
        per_mb = np.array([[c[0], c[1], s.kv_read] for c, s in zip(costs, slices, strict=True)], np.int64)
        got = per_mb[vec.att_row]
        flops_col[vec.att_pos] = got[:, 0]
        bytes_col[vec.att_pos] = got[:, 1]
        kv_col = kv_col.copy()
        kv_col[vec.att_pos] = got[:, 2]
    counts = [s.counts for s in slices]
    loads = np.empty((len(slices) + 1, *counts[0].shape), np.int64)
    loads[:-1] = counts
    loads[-1] = loads[:-1].sum(axis=0)
    tokens_col = tab.tokens.copy()
    member_ids = np.zeros(0, np.int64)
    if vec.exp_pos.size:
        tokens = loads[vec.ent]
        work_of = index.work(tokens)
        if work_of is None:
            return None
        flops, nbytes = work_of
        _fits(flops, vec.widest)
        _fits(nbytes, vec.widest)
        tokens_col[vec.exp_pos] = _segment_sums(tokens, vec.exp_start)
        flops_col[vec.exp_pos] = _segment_sums(flops, vec.exp_start)
        bytes_col[vec.exp_pos] = _segment_sums(nbytes, vec.exp_start)
        grouped = vec.grouped
        found = index.member_ids(vec.ent[2][grouped], tokens[grouped])
        if found is None:
            return None
        member_ids = found
    if vec.routed_pos.size:
        routed = np.minimum(_segment_sums(loads[vec.routed_ent], vec.routed_start), vec.routed_cap)
        tokens_col[vec.routed_pos] = routed
        bytes_col[vec.routed_pos] = [copy_traffic(stream, work.hidden_bytes(n))
                                     for stream, n in zip(t.routed_streams, routed.tolist(), strict=True)]
    return dataclasses.replace(tab, tokens=tokens_col, flops=flops_col, bytes=bytes_col, kv_tokens=kv_col,
                               member_ids=member_ids.astype(MEMBER_ID), member_table=None)
