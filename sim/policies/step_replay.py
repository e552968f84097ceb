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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import NamedTuple

import numpy as np

from sim.cost import OpWork
from sim.plan import Op, OpKind, Phase, PlanBuilder
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
    """A decode step's ops as emitted, field by field (what a replay copies), with what a replay recomputes. Made by
    `Recording.template`."""

    columns: list[list]  # per Op field after id, phase and step (`_COPIED`), its values over the step's ops
    deps: list[tuple[int, ...]]  # per op, its dependencies' positions in the step (() where `external_deps` has it)
    first: int  # id of its first op
    externals: tuple[int, int]  # the two earlier layers' last GPU ops its fetches waited for (-1: none)
    external_deps: list[tuple[int, tuple[int, ...]]]  # (position, deps) of ops that name an op before the step
    layer_done: list[int]  # per (step, layer) visit of the step, its last GPU op's position (-1: none)
    attention: list[tuple[int, int]]  # (position, micro-batch) of each attention op
    experts: list[tuple[int, int, int, tuple[int, ...] | None]]  # (position, MoE layer, micro-batch or -1, a
    # grouped op's expert ids) of each expert op
    routed: list[RoutedCopy]
    member_calls: list[int]  # grouped members charged to the builder, call by call, as emission charged them

    @property
    def size(self) -> int:
        return len(self.deps)


# Op's fields in order (a test holds Op to it); a replay gives each op its own id, the step's phase and step, and
# shifted deps, and copies the rest
_FIELDS = ("id", "kind", "stream", "phase", "step", "layer", "micro_batch", "tokens", "flops", "bytes", "deps",
           "expert", "payload", "kv_tokens", "alloc", "free", "scope", "members")
_COPIED = ("kind", "stream", "layer", "micro_batch", "tokens", "flops", "bytes", "expert", "payload", "kv_tokens",
           "alloc", "free", "scope", "members")


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
        known = {d for d in self.externals if d >= 0}
        external_deps, attention, experts = [], [], []
        for k, op in enumerate(step_ops):
            if op.deps and min(op.deps) < first:
                if not all(d >= first or d in known for d in op.deps):
                    return None
                external_deps.append((k, op.deps))
            if op.kind is OpKind.ATTENTION:
                attention.append((k, op.micro_batch))
            elif op.kind is OpKind.EXPERT:
                li = moe_index[op.layer]
                if li < 0 or op.scope != -1:
                    return None
                experts.append((k, li, op.micro_batch, tuple([m[0] for m in op.members]) if op.members else None))
        if any(0 <= last < first for last in self.layer_done):
            return None
        done = [last - first if last >= 0 else -1 for last in self.layer_done]
        routed = [RoutedCopy(c.position - first, c.li, c.mb, c.experts, c.cap) for c in self.routed]
        columns = [list(map(attrgetter(name), step_ops)) for name in _COPIED]
        outside = {k for k, _ in external_deps}
        deps = [() if k in outside else tuple([d - first for d in op.deps]) for k, op in enumerate(step_ops)]
        return StepTemplate(columns, deps, first, self.externals, external_deps, done,
                            attention, experts, routed, self.member_calls)


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
    """Append template `t`'s ops for decode step `step` of `slices` (same shape as the template's step), with ids
    from the builder's next, and record its layers' last GPU ops in `layer_done` from visit `seq` on. False (and
    nothing appended) when the step would cross the builder's op limit: the caller emits it the ordinary way,
    which raises where emission would."""
    ops = builder.ops
    first = len(ops)
    n = t.size
    load = builder.member_load
    for m in t.member_calls:  # charged call by call: the same float sums as emission's
        load += m * MEMBER_OP_SHARE
    if first + n - 1 + load >= builder.max_ops:  # the largest of the guards emission would apply in the step
        return False
    builder.next_id(step)  # the step's guards, as its first op would call them (the load is the same)
    builder.member_load = load
    # deps name the new ops' own id objects (as emission's do): no int object per dependency. C-level passes: the
    # hot loop of a long decode.
    ids = list(range(first, first + n))
    deps = map(tuple, map(map, repeat(ids.__getitem__), t.deps))
    kind, stream, layer, mb, tokens, flops, nbytes, expert, payload, kv, alloc, free, scope, grouped = t.columns
    ops.extend(map(Op, ids, kind, stream, repeat(Phase.DECODE), repeat(step), layer, mb, tokens, flops, nbytes, deps,
                   expert, payload, kv, alloc, free, scope, grouped))
    now = layer_done_pair(layer_done, seq)
    mapping = {old: new for old, new in zip(t.externals, now, strict=True) if old >= 0}
    for k, deps in t.external_deps:
        ops[first + k].deps = tuple([ids[d - t.first] if d >= t.first else mapping[d] for d in deps])
    by_mb = {s.mb: s for s in slices}
    for k, mb in t.attention:
        s, op = by_mb[mb], ops[first + k]
        cost = work.attention(s.tokens, s.kv_attended, s.kv_read, False)
        op.flops, op.bytes = cost[0], cost[1]
        op.kv_tokens = s.kv_read
    loads: dict[tuple[int, int], list[int]] = {}

    def loads_of(li: int, mb: int) -> list[int]:
        got = loads.get((li, mb))
        if got is None:
            counts = by_mb[mb].counts[li] if mb >= 0 else sum(s.counts[li] for s in slices)
            got = loads[(li, mb)] = counts.tolist()
        return got

    expert_work = work.expert
    for k, li, mb, experts in t.experts:
        op, tokens = ops[first + k], loads_of(li, mb)
        if experts is not None:
            ts = list(map(tokens.__getitem__, experts))
            group = op.members = members_of(experts, ts)
            op.tokens, op.flops, op.bytes = sum(ts), sum(map(_FLOPS, group)), sum(map(_BYTES, group))
        else:
            op.tokens = t_ = tokens[op.expert]
            cost = expert_work(t_)
            op.flops, op.bytes = cost[0], cost[1]
    for c in t.routed:
        op, tokens = ops[first + c.position], loads_of(c.li, c.mb)
        routed = min(sum(map(tokens.__getitem__, c.experts)), c.cap)
        op.tokens, op.bytes = routed, copy_traffic(op.stream, work.hidden_bytes(routed))
    for k, done in enumerate(t.layer_done):
        layer_done[seq + k] = ids[done] if done >= 0 else -1
    return True
