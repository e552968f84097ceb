"""The plan: engine-neutral list of ops that a policy produces and both engines (SimPy, torch) run.

Semantics, shared by the simulator and the executor:
- Ops run on a *stream*: `gpu` (compute), `cpu` and `cpu_experts` (two CPU workers), `h2d` and `h2d_act`
  (two host-to-device copy queues) and `d2h`.
- Ops on one stream run one at a time in plan order (like a CUDA stream or a CPU worker thread). Streams on
  one device (`DEVICE_OF`) run concurrently and share it: the engine slows each down to its fair share.
- An op starts when its stream is free and every op in `deps` has finished; `deps` only name earlier ops.
- `alloc` bytes are taken from a memory pool (`gpu` or `cpu`) when an op starts; `free` bytes are returned
  when it ends; a pool's level counts once all allocations and frees of an instant are done (an op ending and
  one starting at the same time never hold memory together). Memory that lives for the whole run is in
  `Plan.static_memory`.
See docs/architecture.md for the field-by-field description.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import repeat
from typing import TYPE_CHECKING, Any

import numpy as np

from sim.errors import SimInputError
from sim.specs import ModelSpec, SystemSpec
from sim.topology import topology_of
from sim.workload import Workload
from traces.limits import MEMBER_OP_SHARE, max_ops, too_many_ops

if TYPE_CHECKING:  # pandas (with pyarrow, ~110 MB resident and 0.25 s) is imported where a frame is made
    import pandas as pd

    from sim.op_table import OpTable


class Stream(StrEnum):
    """In-order queues. Streams of one device share it: `cpu` and `cpu_experts` share the cores and DRAM
    bandwidth, `h2d` and `h2d_act` share the PCIe host-to-device direction (see `DEVICE_OF`)."""

    GPU = "gpu"
    CPU = "cpu"
    CPU_EXPERTS = "cpu_experts"
    H2D = "h2d"
    H2D_ACT = "h2d_act"
    D2H = "d2h"


class Device(StrEnum):
    """Physical units that streams share: what they contend for."""

    GPU = "gpu"
    CPU = "cpu"
    H2D = "pcie_h2d"
    D2H = "pcie_d2h"


STREAMS: tuple[Stream, ...] = tuple(Stream)


def streams_of(ops: Sequence[Op]) -> tuple[str, ...]:
    """Track order for reports: the one-GPU machine's streams, then any other stream the ops use (a second GPU,
    a peer link) in order of first use."""
    extra = dict.fromkeys(op.stream for op in ops if op.stream not in _STANDARD)
    return (*STREAMS, *extra)
_STANDARD = frozenset(STREAMS)
DEVICE_OF: dict[Stream, Device] = {
    Stream.GPU: Device.GPU, Stream.CPU: Device.CPU, Stream.CPU_EXPERTS: Device.CPU,
    Stream.H2D: Device.H2D, Stream.H2D_ACT: Device.H2D, Stream.D2H: Device.D2H,
}


class OpKind(StrEnum):
    EMBED = "embed"
    QKV = "qkv"                  # OP0: norm + QKV projection
    ATTENTION = "attention"      # OP1: attention over the KV cache (appends this step's K/V)
    O_PROJ = "o_proj"            # OP2: output projection + residual
    ROUTER = "router"            # norm + gate logits + top-k
    EXPERT = "expert"            # OP3: one routed expert's gated FFN over its tokens (or several: `Op.members`)
    SHARED_EXPERT = "shared_expert"
    DENSE_FFN = "dense_ffn"      # FFN of a leading dense layer
    LM_HEAD = "lm_head"
    COPY = "copy"                # h2d / d2h transfer


class Payload(StrEnum):
    NONE = ""
    EXPERT_WEIGHTS = "expert_weights"
    # Weights copied from pageable host memory: the driver stages them through a pinned bounce buffer (a CPU
    # memcpy, then the DMA), so the copy is slower and reads host DRAM twice and writes it once.
    PAGEABLE_WEIGHTS = "pageable_weights"
    KV = "kv"
    # KV cache entries copied to or from pageable host memory (FlexGen allocates its DRAM cache unpinned):
    # staged through a pinned buffer like pageable weights, in either direction.
    PAGEABLE_KV = "pageable_kv"
    ACTIVATIONS = "activations"
    # The host half of a load from pageable memory issued as FlexGen's `general_copy` does it: `src.pin_memory()`
    # (a fresh pinned buffer filled on the issuing thread), then an asynchronous pinned DMA. On a CPU stream, so the
    # thread's later work waits for it; priced at what the link's pageable rate leaves after its pinned DMA.
    PAGEABLE_STAGING = "pageable_staging"
    # FlexGen's 4-bit group-wise decompression on the GPU before a compressed tensor is used (unpack, scale,
    # shift: memory traffic only), as a COPY-kind op on the compute stream.
    DECOMPRESS = "decompress"


PAGEABLE_PAYLOADS = frozenset({Payload.PAGEABLE_WEIGHTS, Payload.PAGEABLE_KV})


class Phase(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(slots=True)
class Op:
    """One unit of work. `tokens` is the batch the op processes; `bytes` is memory traffic (compute ops)
    or bytes moved (copies); `kv_tokens` is the KV entries attention reads."""

    id: int
    kind: OpKind
    stream: str  # a `Stream` on the one-GPU machine; any stream of the system's topology (sim/topology.py)
    phase: Phase
    step: int
    layer: int
    micro_batch: int
    tokens: int
    flops: int
    bytes: int
    deps: tuple[int, ...] = ()
    expert: int = -1
    payload: Payload = Payload.NONE
    kv_tokens: int = 0
    alloc: tuple[tuple[str, int], ...] = ()
    free: tuple[tuple[str, int], ...] = ()
    scope: int = -1  # index into Plan.scopes; -1: the op's micro-batch (all requests for -1) at its step
    # A grouped expert op: the routed experts it runs one after another, each (expert, tokens, flops, bytes);
    # `expert` is then -1 and tokens, flops and bytes are the members' sums (see `member_ops`).
    members: tuple[tuple[int, int, int, int], ...] = ()


def member_ops(op: Op) -> list[Op]:
    """What a grouped expert op runs, one op per member expert in order (the op itself when it is not grouped):
    how cost models price a group and how the executor runs it. A group stands for consecutive expert ops on one
    stream with the same dependencies whose ends in between nobody observes, so it ends when the last of those
    ops would: alone in its resource group, after the sum of their times; sharing it, after each member ran at
    its own fair rate in turn (issue 13)."""
    if not op.members:
        return [op]
    return [member_op(op, member) for member in op.members]


def member_op(op: Op, member: tuple[int, int, int, int]) -> Op:
    """The op one member (expert, tokens, flops, bytes) of grouped op `op` stands for: the group's fields, the
    member's expert and work, no memory of its own."""
    e, t, f, b = member
    return Op(op.id, op.kind, op.stream, op.phase, op.step, op.layer, op.micro_batch, t, f, b, op.deps, e, op.payload,
              op.kv_tokens, (), (), op.scope)


def ungroup(plan: Plan) -> Plan:
    """The same plan with every grouped expert op split into one op per member (ids renumbered in order; a
    dependency on a group becomes one on its last member): the plan as built before groups existed, which the
    engine must time identically (a group starts with its first member and ends with its last)."""
    if not any(op.members for op in plan.ops):
        return plan
    ops: list[Op] = []
    last_of: list[int] = []  # old id -> new id of the op (or last member) that stands for it
    for op in plan.ops:
        deps = tuple(last_of[d] for d in op.deps)
        parts = member_ops(op)
        for k, part in enumerate(parts):
            ops.append(dataclasses.replace(part, id=len(ops), deps=deps, alloc=op.alloc if k == 0 else (),
                                           free=op.free if k == len(parts) - 1 else ()))
        last_of.append(len(ops) - 1)
    return dataclasses.replace(plan, ops=ops)


def shard_bounds(n: int, shard: int, shards: int) -> tuple[int, int]:
    """[lo, hi) of part `shard` of `shards` contiguous parts of n items, sized as `np.array_split` sizes them
    (the first n % shards parts one larger): how an expert op's shard picks its tokens."""
    base, extra = divmod(n, shards)
    lo = shard * base + min(shard, extra)
    return lo, lo + base + (1 if shard < extra else 0)


@dataclass(frozen=True)
class Scope:
    """The tokens an op works on, named explicitly: a phase and step, a set of requests (at a decode step, those
    still generating; in prefill, their prompts), and for an expert op shard `shard` of `shards` of the tokens
    those requests route to its expert (contiguous parts in (row, slot) order, sizes as `np.array_split`).
    Explicit scopes let one expert's tokens be split between devices and experts batch differently from
    attention (several micro-batches' tokens in one expert op)."""

    phase: Phase
    step: int
    requests: np.ndarray
    shard: int = 0
    shards: int = 1

    def __post_init__(self) -> None:  # request ids as an int64 array whatever they were given as
        object.__setattr__(self, "requests", np.asarray(self.requests, dtype=np.int64))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scope) and (self.phase, self.step, self.shard, self.shards) == (
            other.phase, other.step, other.shard, other.shards) and np.array_equal(self.requests, other.requests)

    __hash__ = None  # type: ignore[assignment]


@dataclass
class Plan:
    """A policy's decisions, made concrete: ops in program order plus static memory and micro-batches.

    The ops are held one of two ways: as `Op` objects, or as columns (`sim.op_table.OpTable`, what a policy's
    builder makes and the engine reads). `ops` gives `Op` objects whichever way, made from the columns on first use;
    from then on they are the plan's ops (a caller may change them) and the columns are dropped. `table()` gives
    the columns."""

    policy: str
    knobs: dict[str, Any]
    model: ModelSpec
    system: SystemSpec
    workload: Workload
    ops: list[Op]
    static_memory: dict[str, dict[str, int]]
    micro_batches: dict[str, list[np.ndarray]] = field(default_factory=dict)
    # Decode steps in the workload per decode step in `ops` (> 1 when only a sample of steps was planned).
    decode_scale: float = 1.0
    scopes: list[Scope] = field(default_factory=list)  # explicit scopes ops point at (Op.scope)
    # How the runtime launches the GPU's routed experts (EXPERT_KERNELS): `per_expert`, a kernel call per expert
    # (a Python loop over experts, as Hugging Face's MoE block runs), or `fused`, one fused MoE call per layer and
    # micro-batch whose kernels run back to back behind the router's (vLLM's fused_moe and its ports); each CPU
    # expert op pays its dispatch under both. `fused_cpu`: the GPU's routed experts a kernel call each, the CPU's one
    # MoE call per layer and micro-batch, none paying a dispatch of its own (KTransformers' CPU MoE operator).
    expert_kernels: str = "per_expert"

    def table(self) -> OpTable | None:
        """The ops as columns: the plan's own, or read out of its `Op` objects (each call: those may have changed
        since); None when an op holds what a plan file could not (`OpTable.from_ops`)."""
        if self._table is not None:
            return self._table
        from sim.op_table import OpTable

        return OpTable.from_ops(self._ops)

    @property
    def columns(self) -> OpTable | None:
        """The plan's own columns, or None while it holds `Op` objects (nothing is converted)."""
        return self._table

    @property
    def num_ops(self) -> int:
        """How many ops the plan holds (without making `Op` objects)."""
        return len(self._table) if self._table is not None else len(self._ops)

    def scope_of(self, op: Op) -> tuple[np.ndarray, int, int]:
        """(requests, shard, shards) of an op, the one definition both engines use: its explicit scope, else its
        micro-batch (every request for -1); at a decode step only the requests still generating."""
        wl = self.workload
        if op.scope >= 0:
            sc = self.scopes[op.scope]
            group, shard, shards = sc.requests, sc.shard, sc.shards
        else:
            group = (self.micro_batches[str(op.phase)][op.micro_batch] if op.micro_batch >= 0
                     else np.arange(wl.batch))
            shard, shards = 0, 1
        if op.phase is Phase.DECODE:
            group = group[wl.gen_lens[group] > op.step]
        return group, shard, shards

    def static_bytes(self, pool: str) -> int:
        return int(sum(self.static_memory.get(pool, {}).values()))

    def to_frame(self) -> pd.DataFrame:
        """One row per op (deps and a grouped op's members as tuples), for inspection and plotting."""
        import pandas as pd

        cols = ["id", "kind", "stream", "phase", "step", "layer", "micro_batch", "tokens", "expert",
                "flops", "bytes", "kv_tokens", "payload", "deps", "members"]
        data = {c: [getattr(op, c) for op in self.ops] for c in cols}
        for c in ("kind", "stream", "phase", "payload"):
            data[c] = [str(v) for v in data[c]]
        return pd.DataFrame(data, columns=cols)

    def validate(self) -> None:
        """Ids are positions, deps point backwards: together with in-order streams this rules out deadlock."""
        for i, op in enumerate(self.ops):
            if op.id != i:
                raise ValueError(f"plan op at position {i} has id {op.id!r}")
            for d in op.deps:
                if not 0 <= d < i:
                    raise ValueError(f"plan op {i} depends on op {d!r}, which is not an earlier op")

    def check(self, table: OpTable | None = None) -> None:
        """Everything an engine relies on, as one SimInputError naming the first problem: ids and deps as
        `validate`; non-negative work within MAX_OP_WORK; memory pools that exist, with non-negative sizes, and
        no allocation freed twice; decode steps, layers, experts and micro-batches the workload, model and plan
        have; tokens and KV entries no more than the workload holds; a finite decode scale. `table`: the plan's
        ops as columns, when the caller has them (`table()`); the per-op conditions are then tested column-wide
        and only the ops that could fail them are looked at one by one (`sim.table_check`)."""
        from sim.table_check import deps_point_back, suspect_rows

        if table is None:
            table = self.table()
        if table is None or not deps_point_back(table):
            try:
                self.validate()  # names the first op out of place (a table is made only of ops in place)
            except ValueError as exc:
                raise SimInputError(str(exc)) from None
        if not (math.isfinite(self.decode_scale) and self.decode_scale >= 1.0):
            raise SimInputError(f"plan decode_scale must be a finite number >= 1, got {self.decode_scale!r}")
        if self.expert_kernels not in EXPERT_KERNELS:
            raise SimInputError(f"plan expert_kernels must be one of {', '.join(EXPERT_KERNELS)}, got "
                                f"{self.expert_kernels!r}")
        max_step = int(self.workload.gen_lens.max()) - 1
        topo = topology_of(self.system)
        pools, streams = set(topo.pools), topo.streams
        for pool, parts in self.static_memory.items():
            if pool not in pools or not isinstance(parts, dict) or any(
                    isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0 for v in parts.values()):
                raise SimInputError(f"plan static memory {pool!r}: needs a pool in {sorted(pools)} and integer sizes "
                                    ">= 0")
        bounds = _ScopeBounds.of(self)
        self._check_scopes(max_step)
        if table is None:
            dynamic = False
            for op in self.ops:
                dynamic = self._check_one(op, max_step, pools, bounds, topo) or dynamic
            if dynamic:
                self._check_alloc_balance(self.ops)
            return
        suspects = suspect_rows(table, max_step=max_step, layers=bounds.layers, experts=bounds.experts,
                                tokens=bounds.tokens, kv=bounds.kv, groups=bounds.groups, streams=streams)
        for i in suspects.tolist():
            self._check_one(table.op(i), max_step, pools, bounds, topo)
        if table.alloc or table.free:
            rows = sorted(table.alloc.keys() | table.free.keys())
            self._check_alloc_balance([table.op(i) for i in rows])

    def _check_one(self, op: Op, max_step: int, pools: set[str], bounds: _ScopeBounds, topo: Any) -> bool:
        """Check one op (raise on the first problem); True when it allocates or frees memory."""
        d = op.phase is Phase.DECODE
        if (0 <= op.tokens <= bounds.tokens[d] and 0 <= op.kv_tokens <= bounds.kv[d]
                and (1 <= op.step <= max_step if d else op.step == 0) and -1 <= op.layer <= bounds.layers
                and -1 <= op.expert < bounds.experts and -1 <= op.micro_batch < bounds.groups[d]
                and op.stream in topo.streams and op.scope == -1 and not (op.alloc or op.free)):
            if op.members:  # bounded member by member; the op's work is their sum, with no bound of its own
                _check_members(op, bounds.experts)
                return False
            if 0 <= op.flops <= MAX_OP_WORK and 0 <= op.bytes <= MAX_OP_WORK:
                return False
        self._check_op(op, max_step, pools, bounds)
        topo.unit_of(op.stream)  # a stream the system lacks is named
        if op.members:
            _check_members(op, bounds.experts)
        self._check_op_scope(op)
        return bool(op.alloc or op.free)

    def check_tokens_generated(self) -> None:
        """The ops generate the workload's tokens: the LM head runs once per request after prefill and once per
        request still generating at every decode step the plan holds; a plan of every step holds each of
        1..max_step, a sampled one scales its steps up to them (`decode_scale`). Throughput is computed from the
        workload, so a workload that is not the ops' would give a wrong number. Plan files are checked so when
        read (`plan_io.load_plan`); the engine's own check leaves it out, for hand-built plans of a few ops."""
        wl = self.workload
        max_step = int(wl.gen_lens.max()) - 1
        if not self.ops:
            raise SimInputError("plan has no ops")
        heads: dict[tuple[bool, int], int] = {}
        head = OpKind.LM_HEAD
        decode = Phase.DECODE
        for op in self.ops:
            if op.kind is head:
                key = (op.phase is decode, op.step)
                heads[key] = heads.get(key, 0) + op.tokens
        if heads.get((False, 0), 0) != wl.batch:
            raise SimInputError(f"plan's prefill ends {heads.get((False, 0), 0)} requests with an LM head; its "
                                f"workload has {wl.batch}: the workload is not the one its ops were built for")
        steps = sorted(step for is_decode, step in heads if is_decode)
        gen = np.sort(wl.gen_lens)
        for step in steps:
            active = int(gen.size - np.searchsorted(gen, step, side="right"))
            if heads[(True, step)] != active:
                raise SimInputError(f"plan's decode step {step} generates {heads[(True, step)]} tokens; its workload "
                                    f"has {active} requests still generating then")
        expected = max_step / len(steps) if steps else 1.0
        if (steps and steps[-1] > max_step) or (self.decode_scale == 1.0 and len(steps) != max_step) or (
                steps and not math.isclose(self.decode_scale, expected, rel_tol=1e-9)):
            raise SimInputError(f"plan holds {len(steps)} decode steps with decode_scale {self.decode_scale:g}; its "
                                f"workload generates for {max_step} steps after prefill")

    def _check_scopes(self, max_step: int) -> None:
        batch = self.workload.batch
        for k, sc in enumerate(self.scopes):
            r = np.asarray(sc.requests)
            if not isinstance(sc.phase, Phase) or r.ndim != 1 or r.dtype.kind not in "iu" or r.size == 0 or (
                    r.min() < 0 or r.max() >= batch or np.unique(r).size != r.size):
                raise SimInputError(f"plan scope {k}: needs a phase and distinct request ids in 0..{batch - 1}")
            if not (0 <= sc.shard < sc.shards <= MAX_SHARDS) or (
                    sc.phase is Phase.DECODE and not 1 <= sc.step <= max_step) or (
                    sc.phase is Phase.PREFILL and sc.step != 0):
                raise SimInputError(f"plan scope {k}: shard {sc.shard} of {sc.shards} at {sc.phase} step {sc.step} "
                                    f"is not a shard of a step the workload has")

    def _check_op_scope(self, op: Op) -> None:
        if op.scope == -1:
            return
        if not 0 <= op.scope < len(self.scopes):
            raise SimInputError(f"plan op {op.id}: scope {op.scope} does not exist ({len(self.scopes)} scopes)")
        sc = self.scopes[op.scope]
        if (sc.phase, sc.step) != (op.phase, op.step):
            raise SimInputError(f"plan op {op.id}: at {op.phase} step {op.step}, its scope {op.scope} at "
                                f"{sc.phase} step {sc.step}")
        if sc.shards > 1 and op.kind not in (OpKind.EXPERT, OpKind.COPY):
            raise SimInputError(f"plan op {op.id}: only expert ops (and copies of their tokens) work on a shard")

    @staticmethod
    def _check_alloc_balance(ops: Sequence[Op]) -> None:
        """No dynamic allocation is freed twice: no pool frees more than it holds at any point (an allocation
        may be held to the end of the run, as a growing KV cache is); `ops` in id order, those without memory
        may be left out."""
        held: dict[str, int] = {}
        for op in ops:
            for pool, size in op.alloc:
                held[pool] = held.get(pool, 0) + size
            for pool, size in op.free:
                held[pool] = held.get(pool, 0) - size
                if held[pool] < 0:
                    raise SimInputError(f"plan op {op.id}: frees {size} bytes of {pool!r} that were not allocated "
                                        "(or were freed already)")

    @staticmethod
    def _check_op(op: Op, max_step: int, pools: set[str], bounds: _ScopeBounds) -> None:
        # a grouped op's work is its members' sum: each member is bounded (`_check_members`), the sum need not be
        if not op.members and not (0 <= op.flops <= MAX_OP_WORK and 0 <= op.bytes <= MAX_OP_WORK):
            raise SimInputError(f"plan op {op.id}: flops and bytes must be in [0, 2^50], got {op.flops} and "
                                f"{op.bytes}")
        if op.tokens < 0 or op.kv_tokens < 0:
            raise SimInputError(f"plan op {op.id}: tokens and kv_tokens must be >= 0")
        if op.phase is Phase.DECODE and not 1 <= op.step <= max_step:
            raise SimInputError(f"plan op {op.id}: decode step {op.step} outside the workload's 1..{max_step}")
        if op.phase is Phase.PREFILL and op.step != 0:
            raise SimInputError(f"plan op {op.id}: a prefill op has step 0, not {op.step}")
        d = op.phase is Phase.DECODE
        for name, value, top, owner in (("layer", op.layer, bounds.layers + 1, "the model's layers and head"),
                                         ("expert", op.expert, bounds.experts, "the model's experts"),
                                         ("micro_batch", op.micro_batch, bounds.groups[d],
                                          f"the plan's {op.phase} micro-batches")):
            if not -1 <= value < top:
                raise SimInputError(f"plan op {op.id}: {name} {value} outside {owner} (-1..{top - 1})")
        for name, value, top in (("tokens", op.tokens, bounds.tokens[d]), ("kv_tokens", op.kv_tokens, bounds.kv[d])):
            if value > top:
                raise SimInputError(f"plan op {op.id}: {name} {value} exceeds the {top} a {op.phase} op of this "
                                    "workload can hold")
        for pool, size in (*op.alloc, *op.free):
            if pool not in pools or size < 0:
                raise SimInputError(f"plan op {op.id}: memory ({pool!r}, {size}) needs a pool in {sorted(pools)} "
                                    "and a size >= 0")


def _check_members(op: Op, experts: int) -> None:
    """A grouped expert op: two or more distinct experts, each with tokens, summing to the op's tokens, FLOPs and
    bytes."""
    where = f"plan op {op.id}: grouped expert op"
    if op.kind is not OpKind.EXPERT or op.expert != -1:
        raise SimInputError(f"{where}: needs kind expert and expert -1 (its members name the experts)")
    members = op.members
    if len(members) < 2 or set(map(len, members)) != {4}:
        raise SimInputError(f"{where}: needs two or more members of (expert, tokens, flops, bytes)")
    ids, tokens, flops, nbytes = zip(*members, strict=True)
    if not (min(ids) >= 0 and max(ids) < experts and min(tokens) >= 1 and min(flops) >= 0 and min(nbytes) >= 0
            and max(flops) <= MAX_OP_WORK and max(nbytes) <= MAX_OP_WORK):
        e, t, f, b = next(m for m in members if not (0 <= m[0] < experts and m[1] >= 1 and 0 <= m[2] <= MAX_OP_WORK
                                                     and 0 <= m[3] <= MAX_OP_WORK))
        raise SimInputError(f"{where}: member (expert {e}, tokens {t}, flops {f}, bytes {b}) needs an expert in "
                            f"0..{experts - 1}, tokens >= 1 and work in [0, 2^50]")
    if len(set(ids)) != len(ids):
        raise SimInputError(f"{where}: an expert appears twice among its members")
    sums = (sum(tokens), sum(flops), sum(nbytes))
    if sums != (op.tokens, op.flops, op.bytes):
        raise SimInputError(f"{where}: its members sum to {sums[0]} tokens, {sums[1]} flops and {sums[2]} bytes; "
                            f"the op says {op.tokens}, {op.flops} and {op.bytes}")


@dataclass(frozen=True, slots=True)
class _ScopeBounds:
    """What an op of a plan may name, indexed by `phase is decode`: tokens (a prefill op covers at most every
    request's prompt, padded to the longest, a decode op one token per request, each times top-k, since a copy
    may carry every routed assignment of its tokens), KV entries read (the padded
    prefill's causal triangle; every request's full context), micro-batch indices, and the model's layers (the
    LM head is layer `num_layers`, the embedding -1) and experts."""

    layers: int
    experts: int
    tokens: tuple[int, int]
    kv: tuple[int, int]
    groups: tuple[int, int]

    @classmethod
    def of(cls, plan: Plan) -> _ScopeBounds:
        wl, m = plan.workload, plan.model
        batch, prompt = wl.batch, int(wl.prompt_lens.max())
        context = prompt + int(wl.gen_lens.max())
        groups = tuple(len(plan.micro_batches[p]) if p in plan.micro_batches else 1 << 62
                       for p in ("prefill", "decode"))
        k = max(m.top_k, 1)  # a copy may carry every routed assignment of its tokens
        return cls(m.num_layers, max(m.num_experts, 1), (batch * prompt * k, batch * k),
                   (batch * prompt * (prompt + 1) // 2, batch * context), (groups[0], groups[1]))


def _plan_ops(plan: Plan) -> list[Op]:
    if plan._ops is None:
        plan._ops = plan._table.to_ops()
        plan._table = None
    return plan._ops


def _set_plan_ops(plan: Plan, ops: list[Op] | OpTable) -> None:
    from sim.op_table import OpTable

    if isinstance(ops, OpTable):
        plan._ops, plan._table = None, ops
    else:
        plan._ops, plan._table = ops, None


Plan.ops = property(_plan_ops, _set_plan_ops, doc="The ops in program order, as `Op` objects (see `Plan`).")  # type: ignore[assignment]


EXPERT_KERNELS = ("per_expert", "fused", "fused_cpu")  # Plan.expert_kernels
GPU_EXPERT_KERNELS = ("fused", "per_expert")  # what a policy option `expert_kernels` may choose
RESULT_SLICE = 1 << 16  # emitted ops read into columns at a time by `PlanBuilder.result`
ESTIMATE_MARGIN = 1.25  # a plan is refused early only when its estimate exceeds the op limit by this factor
MAX_SHARDS = 4096  # parts one scope's expert tokens may be split into
MAX_OP_WORK = 1 << 50  # flops or bytes of one op (a petabyte at most: nanosecond clocks stay in int64)


class PlanBuilder:
    """Appends ops with ids in program order; policies call `add` and keep the returned ids as handles."""

    def __init__(self, decode_step_sizes: Sequence[int] = ()) -> None:
        """`decode_step_sizes`: active requests of each decode step the policy will emit, in order; with them,
        a plan whose first decode step extrapolates past the memory limit is refused at once, not after
        building most of it (steps shrink as requests finish, so the estimate scales by requests)."""
        # The ops in id order; a decode step replayed as columns (`sim.policies.step_replay`) holds None for each of
        # its ops here and its columns in `chunks`, with the id of its first op.
        self.ops: list[Op | None] = []
        self.chunks: list[tuple[int, OpTable]] = []
        self.prefix: OpTable | None = None  # the first ops' columns, when known already (a prefill a search copies)
        self.settled: list[tuple[int, OpTable]] = []  # the first ops read into columns by `settle` (first id, part)
        self._settled_to = 0
        self._unsettled = False  # an op no column holds was met: nothing more is settled
        # the plan's grouped-op members, each stored once (by object: emitters keep one tuple per distinct member and
        # store it when they make it), named by id in replayed steps and column slices
        from sim.op_table import MemberStore

        self.members = MemberStore()
        self.max_ops = max_ops()  # plans past the memory limit are refused while they are built
        self.member_load = 0.0  # grouped ops' members, in ops' worth of memory (MEMBER_OP_SHARE each)
        self._sizes = [int(n) for n in decode_step_sizes]
        self.step = 0  # step of the last op added (prefill 0, decode >= 1); emitters call `new_step` on a change
        self._first_start = -1  # the load when the first decode step began, then -2 once estimated

    def next_id(self, step: int) -> int:
        """The id the next op gets, after the memory guards: the op limit, and the size estimate when a new
        step begins. Every path that appends ops (here and the emitters' fast paths) calls it first."""
        op_id = len(self.ops)
        if op_id + self.member_load >= self.max_ops:
            raise too_many_ops(int(op_id + self.member_load))
        if step != self.step:
            self.new_step(step)
        return op_id

    def reserve(self, last: int, members: int) -> None:
        """Emitters that append several ops at once (ids up to `last`, with `members` grouped-op members): charge
        the members and apply the op limit once for all of them."""
        self.member_load += members * MEMBER_OP_SHARE
        if last + self.member_load >= self.max_ops:
            raise too_many_ops(int(last + self.member_load))

    def settle(self) -> None:
        """Emitters call this where no op built so far will be read back (the walks of policies that do not replay:
        MoE-Lightning, FlexGen, Fiddler, ZeRO-Inference, between steps or tasks): once RESULT_SLICE ops wait, they
        are read into columns and their `Op`s let go, so a plan of millions of ops never holds them all as objects
        (whose memory, once held, the process keeps)."""
        if (len(self.ops) - self._settled_to < RESULT_SLICE or self.chunks or self.prefix is not None
                or self._unsettled):
            return
        from sim.op_table import OpTable

        at, stop = self._settled_to, len(self.ops)
        part = OpTable.from_ops(self.ops[at:stop], first=at, store=self.members)
        if part is None:  # left for `result`, which hands the plan over as ops for the check to name; not tried again
            self._unsettled = True
            return
        self.settled.append((at, part))
        self.ops[at:stop] = repeat(None, stop - at)
        self._settled_to = stop

    def result(self) -> list[Op] | OpTable:
        """The ops built, as columns for `Plan`: replayed steps' chunks, and the ops emitted one by one read into
        columns a slice at a time, each slice's `Op`s let go once read and its columns once concatenated (a plan of
        millions of emitted ops never holds them and their columns at once: MoE-Lightning's 2.4 M, 0.8 GB). The
        list of `Op`s when an emitted op, or a member an emitter made, holds what no column can (a number past int64
        that a replay declined): `Plan.check` then names it."""
        from sim.op_table import OpTable

        ops = self.ops
        parts: list[tuple[int, OpTable]] = list(self.settled)  # (first id, columns)
        read: list[OpTable] = [part for _, part in parts]  # those read here and the replayed chunks: to let go
        at = self._settled_to
        prefix = self.prefix
        if not parts and prefix is not None and len(prefix) <= (self.chunks[0][0] if self.chunks else len(ops)):
            parts, at = [(0, prefix)], len(prefix)
        for first, chunk in [*self.chunks, (len(ops), None)]:
            while at < first:
                stop = min(first, at + RESULT_SLICE)
                part = OpTable.from_ops(ops[at:stop], first=at, store=self.members)
                if part is None:
                    return self._as_ops(parts)
                parts.append((at, part))
                read.append(part)
                ops[at:stop] = repeat(None, stop - at)
                at = stop
            if chunk is not None:
                parts.append((first, chunk))
                read.append(chunk)  # its own columns are the replay's; those it shares stay its template's
                at = first + len(chunk)
        members = self.members.table()
        if members is None:  # a member an emitter made holds what no column can: Plan.check names its op
            return self._as_ops(parts)
        self._name_members([part for _, part in parts], members)
        self.chunks, self.settled = [], []
        if not parts:
            return OpTable.from_ops([])
        return OpTable.concat([part for _, part in parts], consume=read)

    def _name_members(self, parts: list[OpTable], members: np.ndarray) -> None:
        """Give the parts that name members by their ids in the builder's store (all but a copied prefix, which
        has its own table) the store's table, once every part is made."""
        for part in parts:
            if part is not self.prefix:
                part.member_table = members

    def _as_ops(self, parts: list[tuple[int, OpTable]]) -> list[Op]:
        """Every op as an `Op`: those read into columns so far (`parts`) and the replayed chunks made back (their
        members the stored objects themselves where one holds what no int64 table can)."""
        ops = self.ops
        members = self.members.table()
        self._name_members([part for _, part in [*parts, *self.chunks]],
                           self.members.objects() if members is None else members)
        for first, part in [*parts, *self.chunks]:
            ops[first:first + len(part)] = part.to_ops(first)
        self.chunks, self.settled = [], []
        return ops

    def load(self) -> float:
        """The plan's memory so far in ops' worth: its ops, and its grouped ops' members at MEMBER_OP_SHARE."""
        return len(self.ops) + self.member_load

    def new_step(self, step: int) -> None:
        """Called when the step of the ops being added changes: at the end of the first decode step,
        extrapolate the plan's size and refuse it if it cannot fit."""
        self.step = step
        if self._first_start == -1:
            if step >= 1 and self._sizes:
                self._first_start = self.load()
            return
        if self._first_start >= 0:
            first_ops = self.load() - self._first_start
            self._first_start = -2
            first = max(self._sizes[0], 1)
            rest = sum(self._sizes[1:]) / first
            estimate = int(self.load() + first_ops * rest)
            # Routing varies by step, so the estimate can run a little high (1.5% at most over ~4,700 plans of
            # every policy); only a clear overflow is refused here, a close call is left to the op limit.
            if estimate > ESTIMATE_MARGIN * self.max_ops:
                raise too_many_ops(estimate, estimated=True)

    def add(self, kind: OpKind, stream: str, phase: Phase, step: int, layer: int, *, tokens: int = 0,
            flops: int = 0, nbytes: int = 0, deps: tuple[int, ...] = (), micro_batch: int = -1,
            expert: int = -1, payload: Payload = Payload.NONE, kv_tokens: int = 0,
            alloc: tuple[tuple[str, int], ...] = (), free: tuple[tuple[str, int], ...] = ()) -> int:
        """Append an op; negative ids in `deps` mean "no dependency" and are dropped. Returns the new id."""
        op_id = self.next_id(step)
        if deps:
            deps = tuple([d for d in deps if d >= 0])
        self.ops.append(Op(op_id, kind, stream, phase, step, layer, micro_batch, tokens, flops, nbytes, deps,
                           expert, payload, kv_tokens, alloc, free))
        return op_id
