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
from sim.op_table import OpTable
from sim.plan import Op, OpKind, PlanBuilder
from sim.policies.layers import _BYTES, _FLOPS, BatchSlice, copy_traffic
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
           layer_done: dict[int, int], seq: int,
           members_of: Callable[[Sequence[int], list[int]], tuple[Member, ...]]) -> bool:
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
        chunk = _recomputed(t, slices, work, members_of, builder)
    except OverflowError:
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


def _recomputed(t: StepTemplate, slices: list[BatchSlice], work: OpWork,
                members_of: Callable[[Sequence[int], list[int]], tuple[Member, ...]], builder: PlanBuilder) -> OpTable:
    """The template's columns with the numbers of `slices` (attention's work and KV entries, expert ops' tokens,
    work and members (ids in the builder's store, whose table `PlanBuilder.result` gives the columns), routed
    copies' tokens and bytes); the columns no replay changes are shared with the template. OverflowError when a
    number does not fit int64."""
    tab = t.table
    by_mb = {s.mb: s for s in slices}
    pos: list[int] = []  # ops whose tokens, FLOPs and bytes change, with them
    tok: list[int] = []
    fl: list[int] = []
    by: list[int] = []
    kv: list[int] = []
    for _, mb in t.attention:
        s = by_mb[mb]
        cost = work.attention(s.tokens, s.kv_attended, s.kv_read, False)
        fl.append(cost[0])
        by.append(cost[1])
        kv.append(s.kv_read)
    kv_pos = [k for k, _ in t.attention]
    flops_col, bytes_col, kv_col = tab.flops.copy(), tab.bytes.copy(), tab.kv_tokens
    if kv_pos:
        at = np.array(kv_pos, np.int64)
        flops_col[at] = np.array(fl, np.int64)
        bytes_col[at] = np.array(by, np.int64)
        kv_col = kv_col.copy()
        kv_col[at] = np.array(kv, np.int64)
        fl, by = [], []
    loads: dict[tuple[int, int], list[int]] = {}

    def loads_of(li: int, mb: int) -> list[int]:
        got = loads.get((li, mb))
        if got is None:
            counts = by_mb[mb].counts[li] if mb >= 0 else sum(s.counts[li] for s in slices)
            got = loads[(li, mb)] = counts.tolist()
        return got

    expert_work = work.expert
    members: list[Member] = []
    for k, li, mb, experts, expert in t.experts:
        tokens = loads_of(li, mb)
        pos.append(k)
        if experts is not None:
            ts = list(map(tokens.__getitem__, experts))
            group = members_of(experts, ts)
            members.extend(group)
            tok.append(sum(ts))
            fl.append(sum(map(_FLOPS, group)))
            by.append(sum(map(_BYTES, group)))
        else:
            t_ = tokens[expert]
            tok.append(t_)
            cost = expert_work(t_)
            fl.append(cost[0])
            by.append(cost[1])
    tokens_col = tab.tokens.copy()
    if pos:
        at = np.array(pos, np.int64)
        tokens_col[at] = np.array(tok, np.int64)
        flops_col[at] = np.array(fl, np.int64)
        bytes_col[at] = np.array(by, np.int64)
    for c, stream in zip(t.routed, t.routed_streams, strict=True):
        tokens = loads_of(c.li, c.mb)
        routed = min(sum(map(tokens.__getitem__, c.experts)), c.cap)
        tokens_col[c.position] = routed
        bytes_col[c.position] = copy_traffic(stream, work.hidden_bytes(routed))
    if members:
        np.array(members, np.int64)  # OverflowError past int64, as a column would raise
    return dataclasses.replace(tab, tokens=tokens_col, flops=flops_col, bytes=bytes_col, kv_tokens=kv_col,
                               member_ids=builder.member_ids(members), member_table=None)
