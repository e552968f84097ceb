"""A plan's ops as typed columns, one row per op (the row is the op's id): what the check and the list schedule read
column-wide instead of one `Op` object at a time (docs/columnar-plan.md, issue 13).

`OpTable.from_ops` reads a list of ops into columns when every field holds what the plan format says (exact integers
within int64, the enums' own members, ids equal to positions) and answers None otherwise, so that a hand-built or
forged plan goes through the per-op code that names its problem. `to_ops` gives the ops back, field for field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, compress, count, repeat
from operator import attrgetter, is_

import numpy as np

from sim.plan import Op, OpKind, Payload, Phase
from traces.format import count_dtype

KINDS: tuple[OpKind, ...] = tuple(OpKind)
PHASES: tuple[Phase, ...] = tuple(Phase)
PAYLOADS: tuple[Payload, ...] = tuple(Payload)
INT_FIELDS = ("step", "layer", "micro_batch", "tokens", "flops", "bytes", "expert", "kv_tokens", "scope")
# the enums' members by identity: a plain string equal to a member's value is not the member (the engines compare
# with `is`), so it sends the plan down the per-op path
_KIND_CODE = {id(m): k for k, m in enumerate(KINDS)}
_PHASE_CODE = {id(m): k for k, m in enumerate(PHASES)}
_PAYLOAD_CODE = {id(m): k for k, m in enumerate(PAYLOADS)}
_DECODE = PHASES.index(Phase.DECODE)
MEMBER_ID = np.int32  # ids of distinct members (a plan holds far fewer than 2^31)


@dataclass(eq=False)
class OpTable:
    """Columns of equal length n: `kind`, `phase`, `payload` (uint8 codes into KINDS, PHASES, PAYLOADS), `stream`
    (codes into `streams`, the names in order of first use), the INT_FIELDS as int64; dependencies in CSR form
    (op i's are `dep_ids[dep_start[i]:dep_start[i + 1]]`); memory per op as sparse maps (row -> the op's `alloc`
    or `free`: few ops have any, and sizes are unbounded Python ints); the members (expert, tokens, FLOPs, bytes) of
    grouped op `member_rows[k]` as rows `member_table[member_ids[member_start[k]:member_start[k + 1]]]`: a plan
    repeats few distinct members (Qwen3-30B-A3B at B=4096: 1.58 M members, 20 k distinct), so each is stored once
    and named by a 4-byte id."""

    streams: tuple[str, ...]
    kind: np.ndarray
    stream: np.ndarray
    phase: np.ndarray
    payload: np.ndarray
    step: np.ndarray
    layer: np.ndarray
    micro_batch: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    bytes: np.ndarray
    expert: np.ndarray
    kv_tokens: np.ndarray
    scope: np.ndarray
    dep_start: np.ndarray
    dep_ids: np.ndarray
    alloc: dict[int, tuple[tuple[str, int], ...]]
    free: dict[int, tuple[tuple[str, int], ...]]
    member_rows: np.ndarray
    member_start: np.ndarray
    member_ids: np.ndarray
    member_table: np.ndarray

    @property
    def members(self) -> np.ndarray:
        """Every member as a row (expert, tokens, FLOPs, bytes), [M, 4] (a copy: 32 bytes a member)."""
        return self.member_table[self.member_ids]

    def __len__(self) -> int:
        return int(self.kind.size)

    @classmethod
    def from_ops(cls, ops: Sequence[Op], first: int = 0, store: MemberStore | None = None) -> OpTable | None:
        """The columns of `ops`, or None when a field is not what a plan holds (an integer beyond int64 or not an
        integer, a kind, phase or payload that is not its enum's member, an op whose id is not its position plus
        `first`, a grouped op's member that is not four integers). Dependencies stay ids. With `store` (a plan
        builder's, where emitters store each member as they make it), members are named by their ids there in one
        pass and `member_table` is left None for the builder to set (`PlanBuilder.result`)."""
        n = len(ops)
        try:
            ids = _ints(list(map(attrgetter("id"), ops)), n)
            if ids is None or not np.array_equal(ids, np.arange(first, first + n)):
                return None
            ints = {}
            for name in INT_FIELDS:
                ints[name] = col = _ints(list(map(attrgetter(name), ops)), n)
                if col is None:
                    return None
            kind = np.fromiter(map(_KIND_CODE.__getitem__, map(id, map(attrgetter("kind"), ops))), np.uint8, n)
            phase = np.fromiter(map(_PHASE_CODE.__getitem__, map(id, map(attrgetter("phase"), ops))), np.uint8, n)
            payload = np.fromiter(map(_PAYLOAD_CODE.__getitem__, map(id, map(attrgetter("payload"), ops))), np.uint8,
                                  n)
        except KeyError:
            return None
        names = list(map(attrgetter("stream"), ops))
        try:
            code = {s: k for k, s in enumerate(dict.fromkeys(names))}
        except TypeError:  # an unhashable stream
            return None
        if not all(isinstance(s, str) for s in code):
            return None
        stream = np.fromiter(map(code.__getitem__, names), count_dtype(len(code)), n)
        deps = list(map(attrgetter("deps"), ops))
        try:
            lens = np.fromiter(map(len, deps), np.int64, n)
        except TypeError:  # deps that are not a sequence
            return None
        dep_start = np.zeros(n + 1, np.int64)
        np.cumsum(lens, out=dep_start[1:])
        dep_ids = _ints(list(chain.from_iterable(deps)), int(dep_start[-1]))
        if dep_ids is None:
            return None
        allocs, frees = list(map(attrgetter("alloc"), ops)), list(map(attrgetter("free"), ops))
        alloc = {i: allocs[i] for i in compress(range(n), allocs)}
        free = {i: frees[i] for i in compress(range(n), frees)}
        groups = list(map(attrgetter("members"), ops))
        member_rows = np.fromiter(compress(range(n), groups), np.int64)
        grouped = [groups[i] for i in member_rows.tolist()]
        member_start = np.zeros(len(grouped) + 1, np.int64)
        try:
            np.cumsum(np.fromiter(map(len, grouped), np.int64, len(grouped)), out=member_start[1:])
            flat = list(chain.from_iterable(grouped))
        except TypeError:  # members that are not a sequence
            return None
        if store is not None:
            member_ids, table = store.ids_of(flat), None
            if member_ids is None:
                return None
        else:  # distinct member objects (emitters store each distinct member once), every one's values judged
            objects = dict(zip(map(id, flat), flat, strict=True))
            index = {key: k for k, key in enumerate(objects)}
            member_ids = np.fromiter(map(index.__getitem__, map(id, flat)), MEMBER_ID, len(flat))
            table = member_table_of(list(objects.values()))
            if table is None:
                return None
        return cls(tuple(code), kind, stream, phase, payload, **ints, dep_start=dep_start, dep_ids=dep_ids,
                   alloc=alloc, free=free, member_rows=member_rows, member_start=member_start, member_ids=member_ids,
                   member_table=table)

    def to_ops(self, first: int = 0) -> list[Op]:
        """The ops the columns hold, field for field as `from_ops` read them (ids from `first`)."""
        n = len(self)
        starts, ids = self.dep_start.tolist(), self.dep_ids.tolist()
        deps = [tuple(ids[a:b]) for a, b in zip(starts, starts[1:], strict=False)] if n else []
        members: list[tuple[tuple[int, int, int, int], ...]] = [()] * n
        each = list(map(tuple, self.member_table.tolist()))  # one tuple per distinct member, shared by the ops
        flat, bounds = list(map(each.__getitem__, self.member_ids.tolist())), self.member_start.tolist()
        for k, row in enumerate(self.member_rows.tolist()):
            members[row] = tuple(flat[bounds[k]:bounds[k + 1]])
        alloc, free = self.alloc, self.free
        return list(map(Op, range(first, first + n), map(KINDS.__getitem__, self.kind.tolist()),
                        map(self.streams.__getitem__, self.stream.tolist()),
                        map(PHASES.__getitem__, self.phase.tolist()), self.step.tolist(), self.layer.tolist(),
                        self.micro_batch.tolist(), self.tokens.tolist(), self.flops.tolist(), self.bytes.tolist(), deps,
                        self.expert.tolist(), map(PAYLOADS.__getitem__, self.payload.tolist()),
                        self.kv_tokens.tolist(), (alloc.get(i, ()) for i in range(n)),
                        (free.get(i, ()) for i in range(n)), self.scope.tolist(), members))

    def decode(self) -> np.ndarray:
        """Whether each op is a decode op."""
        return self.phase == _DECODE

    def dep_owner(self) -> np.ndarray:
        """For each entry of `dep_ids`, the row (op) that depends on it."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.dep_start))

    def stream_positions(self, order: Sequence[str]) -> np.ndarray:
        """Each op's stream as its position in `order` (every stream of the plan listed), in the narrowest type."""
        index = {name: k for k, name in enumerate(order)}
        return np.array([index[name] for name in self.streams], count_dtype(len(order)))[self.stream]

    def op(self, i: int) -> Op:
        """Row i as an `Op` (what a cost model prices, or a per-op check names)."""
        a, b = int(self.dep_start[i]), int(self.dep_start[i + 1])
        k = int(np.searchsorted(self.member_rows, i))
        grouped = k < self.member_rows.size and int(self.member_rows[k]) == i
        ids = self.member_ids[self.member_start[k]:self.member_start[k + 1]] if grouped else ()
        members = tuple(map(tuple, self.member_table[ids].tolist())) if grouped else ()
        return Op(i, KINDS[self.kind[i]], self.streams[self.stream[i]], PHASES[self.phase[i]], int(self.step[i]),
                  int(self.layer[i]), int(self.micro_batch[i]), int(self.tokens[i]), int(self.flops[i]),
                  int(self.bytes[i]), tuple(self.dep_ids[a:b].tolist()), int(self.expert[i]),
                  PAYLOADS[self.payload[i]], int(self.kv_tokens[i]), self.alloc.get(i, ()), self.free.get(i, ()),
                  int(self.scope[i]), members)

    @classmethod
    def concat(cls, parts: list[OpTable], consume: Sequence[OpTable] = ()) -> OpTable:
        """The parts one after another, as tables of consecutive ops (each part's first row is the op after the
        previous part's last; dependencies are ids already). The parts in `consume` are the caller's to let go:
        each of their columns is dropped once concatenated (the peak is the result and a column, not twice the
        result)."""
        if len(parts) == 1:
            return parts[0]
        consumed = {id(part) for part in consume}
        code: dict[str, int] = {}
        for part in parts:
            for name in part.streams:
                code.setdefault(name, len(code))
        dtype = count_dtype(len(code))
        streams, alloc, free = [], {}, {}
        base = member_base = 0
        dep_starts, member_starts = [np.zeros(1, np.int64)], [np.zeros(1, np.int64)]
        member_rows, member_ids, tables, table_at = [], [], [], {}  # parts sharing a member table share it here
        for part in parts:
            at = table_at.get(id(part.member_table))
            if at is None:
                at = table_at[id(part.member_table)] = sum(len(table) for table in tables)
                tables.append(part.member_table)
            member_ids.append(part.member_ids.astype(np.int64) + at)
            remap = np.array([code[name] for name in part.streams], dtype=dtype)
            streams.append(remap[part.stream] if part.streams else part.stream.astype(dtype))
            dep_starts.append(part.dep_start[1:] + dep_starts[-1][-1])
            member_starts.append(part.member_start[1:] + member_base)
            member_base += int(part.member_start[-1])
            member_rows.append(part.member_rows + base)
            alloc.update((row + base, v) for row, v in part.alloc.items())
            free.update((row + base, v) for row, v in part.free.items())
            base += len(part)

        def cat(name: str) -> np.ndarray:
            out = np.concatenate([getattr(part, name) for part in parts])
            for part in parts:
                if id(part) in consumed:
                    setattr(part, name, None)
            return out

        return cls(tuple(code), cat("kind"), np.concatenate(streams), cat("phase"), cat("payload"),
                   **{name: cat(name) for name in INT_FIELDS}, dep_start=np.concatenate(dep_starts),
                   dep_ids=cat("dep_ids"), alloc=alloc, free=free, member_rows=np.concatenate(member_rows),
                   member_start=np.concatenate(member_starts), member_ids=np.concatenate(member_ids).astype(MEMBER_ID),
                   member_table=np.concatenate(tables))


class MemberStore:
    """The distinct grouped-op members of a plan being built, each stored once by object with its id: emitters
    store a member when they make it (they keep one tuple per distinct member), and the builder's column slices
    and replayed steps name members by these ids."""

    def __init__(self) -> None:
        self._id: dict[int, int] = {}
        self.members: list[tuple[int, int, int, int]] = []

    def add(self, member: tuple[int, int, int, int]) -> int:
        """The id of `member`, stored on first use (its values are judged with the table: `table`)."""
        found = self._id.get(id(member))
        if found is None:
            found = self._id[id(member)] = len(self.members)
            self.members.append(member)
        return found

    def extend(self, members: list[tuple[int, int, int, int]]) -> None:
        """Store members an emitter has just made (new objects, so none is stored yet), in order."""
        self._id.update(zip(map(id, members), count(len(self.members))))
        self.members.extend(members)

    def ids_of(self, flat: list) -> np.ndarray | None:
        """The ids of the members in `flat`, in one pass where all are stored; any not stored yet (a member no
        emitter stored) stored in order, or None (and nothing stored) when one of those is not four integers
        within int64."""
        known = self._id
        found = list(map(known.get, map(id, flat)))
        if None in found:
            new = {id(m): m for m in compress(flat, map(is_, found, repeat(None)))}
            if member_table_of(list(new.values())) is None:
                return None
            for member in new.values():
                self.add(member)
            found = list(map(known.__getitem__, map(id, flat)))
        return np.array(found, MEMBER_ID)

    def table(self) -> np.ndarray | None:
        """The stored members as an [D, 4] int64 table (None unless each is four integers within int64)."""
        return member_table_of(self.members)

    def objects(self) -> np.ndarray:
        """The stored members themselves, [D] of objects: the table of a plan handed over as ops because one of
        them holds what no int64 table can (`OpTable.to_ops` gives each back as it was)."""
        out = np.empty(len(self.members), object)
        for k, member in enumerate(self.members):
            out[k] = member
        return out


def member_table_of(members: list) -> np.ndarray | None:
    """Distinct members as an [D, 4] int64 table, or None unless each is four integers within int64."""
    if not members:
        return np.zeros((0, 4), np.int64)
    try:
        table = np.array(members)
    except (ValueError, TypeError):  # members of different lengths
        return None
    if table.ndim != 2 or table.shape[1] != 4:
        return None
    if table.dtype.kind in "bi" or (table.dtype.kind == "u" and table.max() <= INT64_MAX):
        return table.astype(np.int64, copy=False)
    if table.dtype.kind not in "fO":
        return None
    columns = [_ints([m[k] for m in members], len(members)) for k in range(4)]  # each value judged (uint64 beside
    return None if any(c is None for c in columns) else np.stack(columns, axis=1)  # ints reads as floats)


def _ints(values: list, n: int) -> np.ndarray | None:
    """`values` as int64, or None unless every one is an integer within int64's range (bools count as integers,
    as Python counts them)."""
    if n == 0:
        return np.zeros(0, np.int64)
    try:
        arr = np.array(values)
    except (ValueError, TypeError):  # sequences of different shapes among the values
        return None
    if arr.ndim == 1 and (arr.dtype.kind in "bi" or (arr.dtype.kind == "u" and arr.max() <= INT64_MAX)):
        return arr.astype(np.int64, copy=False)
    if arr.ndim == 1 and arr.dtype.kind in "fO" and all(map(_exact, values)):  # numpy's uint64 beside ints: floats
        return np.fromiter(map(int, values), np.int64, n)
    return None


INT64_MAX = int(np.iinfo(np.int64).max)


def unrepresentable(ops: Sequence[Op]) -> str:
    """Why `OpTable.from_ops(ops)` gives no columns, naming the first op and field: a plan the engine cannot run."""
    enums = {"kind": OpKind, "phase": Phase, "payload": Payload}
    for i, op in enumerate(ops):
        if not _exact(op.id) or op.id != i:
            return f"plan op at position {i} has id {op.id!r}"
        for name in INT_FIELDS:
            value = getattr(op, name)
            if not _exact(value):
                return f"plan op {i}: {name} must be an integer within int64, got {value!r}"
        for name, enum in enums.items():
            value = getattr(op, name)
            if not any(value is member for member in enum):
                return f"plan op {i}: {name} must be a {enum.__name__} member, got {value!r}"
        if not isinstance(op.stream, str):
            return f"plan op {i}: stream must be a name, got {op.stream!r}"
        if not isinstance(op.deps, tuple | list) or not all(_exact(d) for d in op.deps):
            return f"plan op {i}: deps must be op ids, got {op.deps!r}"
        if not isinstance(op.members, tuple | list) or not all(
                isinstance(m, tuple | list) and len(m) == 4 and all(_exact(v) for v in m) for m in op.members):
            return f"plan op {i}: members must be (expert, tokens, flops, bytes) integers, got {op.members!r}"
    return "plan ops hold values no plan can hold"


def _exact(value: object) -> bool:
    return isinstance(value, int | np.integer) and -(1 << 63) <= int(value) < (1 << 63)
