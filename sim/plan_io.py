"""Plans on disk: one Parquet file, one row per op, with everything else in the file's key-value metadata.

The executor (and any other engine) reads the same file, so a plan made by a policy here can be run for real
on another machine. Columns: id, kind, stream, phase, step, layer, micro_batch, tokens, expert, flops, bytes,
kv_tokens, payload, deps (list<int64>), alloc_pool / alloc_bytes and free_pool / free_bytes (parallel lists),
member_expert / member_tokens / member_flops / member_bytes (parallel lists: a grouped expert op's members, empty
for other ops; a file without them has none).
Metadata key `cox-moe-plan` holds JSON: format version, policy, knobs, model and system specs, per-request
lengths, static memory and micro-batch membership.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sim.atomic_files import write_atomic
from sim.errors import SimInputError
from sim.parquet_footer import DecodeTooLarge, FooterError, footer_counts
from sim.plan import EXPERT_KERNELS, Op, OpKind, Payload, Phase, Plan, Scope, Stream
from sim.specs import SystemSpec
from sim.specs.catalog import build_system
from sim.specs.model import ModelSpec
from sim.specs.schema import validate_spec
from sim.topology import topology_of
from sim.workload import Workload
from traces.format import RepeatedKey, is_version, unique_keys
from traces.limits import MAX_LENGTH, check_memory, max_ops, memory_limit_bytes, too_many_ops

PLAN_FORMAT = "cox-moe-plan"
PLAN_VERSION = 1
_META_KEY = PLAN_FORMAT.encode()
# The metadata's SHA-256: Parquet checksums cover column pages only, and a flipped digit in the JSON (a static
# memory size, a request's length) would otherwise read as another number.
_DIGEST_KEY = f"{PLAN_FORMAT}-sha256".encode()
_INT_COLUMNS = ("id", "step", "layer", "micro_batch", "tokens", "expert", "flops", "bytes", "kv_tokens")
_MEMBER_COLUMNS = ("member_expert", "member_tokens", "member_flops", "member_bytes")
_ENUM_COLUMNS = {"kind": OpKind, "stream": Stream, "phase": Phase, "payload": Payload}


def _table(ops: list[Op]) -> pa.Table:
    cols: dict[str, Any] = {c: pa.array([getattr(op, c) for op in ops], pa.int64()) for c in _INT_COLUMNS}
    for c in _ENUM_COLUMNS:
        cols[c] = pa.array([str(getattr(op, c)) for op in ops], pa.string()).dictionary_encode()
    cols["scope"] = pa.array([op.scope for op in ops], pa.int64())
    cols["deps"] = pa.array([list(op.deps) for op in ops], pa.list_(pa.int64()))
    for which in ("alloc", "free"):
        cols[f"{which}_pool"] = pa.array([[p for p, _ in getattr(op, which)] for op in ops], pa.list_(pa.string()))
        cols[f"{which}_bytes"] = pa.array([[b for _, b in getattr(op, which)] for op in ops], pa.list_(pa.int64()))
    for k, name in enumerate(_MEMBER_COLUMNS):
        cols[name] = pa.array([[m[k] for m in op.members] for op in ops], pa.list_(pa.int64()))
    return pa.table(cols)


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write `plan` atomically (temporary file, then rename)."""
    path = Path(path)
    meta = {
        "format": PLAN_FORMAT, "version": PLAN_VERSION, "policy": plan.policy, "knobs": plan.knobs,
        "model": dataclasses.asdict(plan.model), "system": dataclasses.asdict(plan.system),
        "prompt_lens": plan.workload.prompt_lens.tolist(), "gen_lens": plan.workload.gen_lens.tolist(),
        "static_memory": plan.static_memory, "decode_scale": plan.decode_scale,
        "expert_kernels": plan.expert_kernels,
        # MLA's up-projection is in the attention ops (since 2026-12-06); older files carry it in OP0
        "attention_up_in_attention": True,
        "micro_batches": {k: [g.tolist() for g in v] for k, v in plan.micro_batches.items()},
        "scopes": [{"phase": str(sc.phase), "step": int(sc.step), "requests": np.asarray(sc.requests).tolist(),
                    "shard": int(sc.shard), "shards": int(sc.shards)} for sc in plan.scopes],
    }
    text = json.dumps(meta).encode()
    table = _table(plan.ops).replace_schema_metadata({_META_KEY: text, _DIGEST_KEY: _digest(text)})
    # Page checksums: a flipped byte in a column's data is refused when read, not turned into other numbers.
    return write_atomic(path, lambda tmp: pq.write_table(table, tmp, write_page_checksum=True))


def load_plan(path: str | Path, isolate_footer: bool = True) -> Plan:
    """Read a plan written by `save_plan`; a missing, foreign, corrupt or newer file is a one-line SimInputError.
    The footer is read in a child process first (`sim.parquet_footer`: a corrupt one can abort pyarrow);
    `isolate_footer=False` reads it here (files this process has just written through pyarrow)."""
    path = Path(path)
    if not path.is_file():
        raise SimInputError(f"plan file not found: {path}")
    try:
        rows, entries = footer_counts(path, isolate=isolate_footer, decode_within=(
            memory_limit_bytes(), LOAD_BYTES_PER_ROW, LOAD_BYTES_PER_LIST_ENTRY))
    except FooterError as exc:
        raise SimInputError(f"{path}: not a readable Parquet plan ({exc})") from None
    except DecodeTooLarge:
        raise SimInputError(f"{path}: its columns hold more than its footer says, more than the "
                            f"{memory_limit_bytes() / 2**30:.3g} GiB memory limit allows (a damaged or forged plan; "
                            "--max-gib or COXMOE_MAX_GIB raise the limit)") from None
    if rows > max_ops():  # before any column is read: a small compressed file may hold millions of rows
        raise too_many_ops(rows)
    check_memory(load_bytes(rows, entries), f"reading plan {path}")  # rows and list entries (deps, members) both
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: also a metadata string that is not UTF-8
        raise SimInputError(f"{path}: not a readable Parquet plan ({type(exc).__name__})") from None
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise SimInputError(f"{path}: not a cox-moe plan (no {PLAN_FORMAT} metadata)")
    digest = (table.schema.metadata or {}).get(_DIGEST_KEY)
    if digest is not None and digest != _digest(raw):  # files written before digests, or by hand, have none
        raise SimInputError(f"{path}: plan metadata is corrupt (its SHA-256 does not match the one stored with it)")
    try:
        meta = json.loads(raw, parse_constant=_no_constant, object_pairs_hook=unique_keys)
    except RepeatedKey as exc:
        raise SimInputError(f"{path}: plan metadata repeats key {exc.args[0]!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise SimInputError(f"{path}: plan metadata is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise SimInputError(f"{path}: plan metadata must be a JSON object")
    if not is_version(meta.get("version"), PLAN_VERSION):
        raise SimInputError(f"{path}: unsupported plan version {meta.get('version')!r} (this reader: {PLAN_VERSION})")
    missing = [c for c in (*_INT_COLUMNS, *_ENUM_COLUMNS, "deps", "alloc_pool", "alloc_bytes", "free_pool",
                           "free_bytes") if c not in table.column_names]
    if missing:
        raise SimInputError(f"{path}: plan lacks column(s) {', '.join(missing)}")
    try:
        plan = _decode(meta, table.to_pydict(), table.num_rows, str(path))
        plan.check()
        plan.check_tokens_generated()
    except KeyError as exc:
        raise SimInputError(f"{path}: plan metadata lacks {exc.args[0]!r}") from None
    except SimInputError as exc:
        raise SimInputError(f"{path}: {str(exc).removeprefix(f'plan {path}: ')}") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise SimInputError(f"{path}: malformed plan ({(str(exc).splitlines() or [type(exc).__name__])[0]})") \
            from None
    return plan


def _digest(text: bytes) -> bytes:
    return hashlib.sha256(text).hexdigest().encode()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _enum(kind: str, values: list[Any]) -> list[Any]:
    cls = _ENUM_COLUMNS[kind]
    known = {str(m): m for m in cls}
    out = []
    for v in values:
        if v not in known:
            raise SimInputError(f"unknown {kind} {v!r}; one of {', '.join(known)}")
        out.append(known[v])
    return out


def _streams(system: SystemSpec, values: list[Any]) -> list[str]:
    """Stream names, each one the plan's system has (the one-GPU machine's as `Stream` members)."""
    known: dict[Any, str] = {str(m): m for m in Stream}
    streams = topology_of(system).streams
    out = []
    for v in values:
        hit = known.get(v)
        if hit is None:
            if v not in streams:
                raise SimInputError(f"unknown stream {v!r}; the plan's system has {', '.join(streams)}")
            hit = known[v] = v
        out.append(hit)
    return out


def _ints(name: str, values: list[Any]) -> list[int]:
    if any(v is None for v in values):
        raise SimInputError(f"column {name} has empty cells")
    if not all(type(v) is int for v in values):  # a float column (ids of 1.0) would index nothing right
        raise SimInputError(f"column {name} must hold integers")
    return values


# Resident bytes while a plan file is read (columns as Python lists and the plan's ops alive together), measured
# with ru_maxrss on the 2-vCPU AMD EPYC dev VM (2026-12-05): the standard scenario's plan, 259,308 rows and 2.6 M
# list entries, 451 MB; a 3,751-row file with 20 M dependency ids, 622 MB (31 bytes an entry).
LOAD_BYTES_PER_ROW = 1536
LOAD_BYTES_PER_LIST_ENTRY = 32


def load_bytes(rows: int, entries: int) -> int:
    """About how much memory reading a plan file takes, from its Parquet footer's counts alone: rows, and the
    entries of its list columns (`sim.parquet_footer.list_entries`)."""
    return rows * LOAD_BYTES_PER_ROW + entries * LOAD_BYTES_PER_LIST_ENTRY


def _decode(meta: dict[str, Any], d: dict[str, list[Any]], rows: int, where: str) -> Plan:
    """The plan a file's metadata and columns describe (each part checked as it is read)."""
    for key, kind in (("policy", str), ("knobs", dict), ("model", dict), ("system", dict), ("static_memory", dict),
                      ("micro_batches", dict), ("prompt_lens", list), ("gen_lens", list)):
        if not isinstance(meta[key], kind):
            raise SimInputError(f"metadata {key} must be a JSON {'object' if kind is dict else kind.__name__}")
    for name, groups in meta["micro_batches"].items():
        if not isinstance(groups, list) or not all(
                isinstance(g, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in g) for g in groups):
            raise SimInputError(f"metadata micro_batches {name!r} must be lists of request ids")
    model = validate_spec(ModelSpec, meta["model"], f"plan {where}: model")
    if model.attention_up_params and meta.get("attention_up_in_attention") is not True:
        raise SimInputError("an MLA plan written before 2026-12-06, whose QKV ops carry the latent up-projection that "
                            "attention ops now carry (its attention would be priced wrong): rebuild it with "
                            "`simulate --plan-out`")
    system = build_system(meta["system"]["name"], meta["system"], f"plan {where}: system")
    lengths = {k: np.asarray(meta[k]) for k in ("prompt_lens", "gen_lens")}
    for k, arr in lengths.items():
        if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.size == 0 or arr.min() < 1:
            raise SimInputError(f"metadata {k} must be a non-empty list of integers >= 1")
        if int(arr.max()) > MAX_LENGTH:  # as in a trace: bounds every sum of lengths below int64's range
            raise SimInputError(f"metadata {k}: a request holds at most {MAX_LENGTH:,} tokens (found "
                                f"{int(arr.max()):,})")
    workload = Workload(lengths["prompt_lens"].astype(np.int64), lengths["gen_lens"].astype(np.int64))
    if set(meta["micro_batches"]) != {"prefill", "decode"}:
        raise SimInputError("metadata micro_batches: needs prefill and decode groups (and nothing else)")
    for name, groups in meta["micro_batches"].items():
        if not groups or any(
                not g or min(g) < 0 or max(g) >= workload.batch for g in groups):
            raise SimInputError(f"metadata micro_batches {name!r}: needs prefill and decode groups of request ids "
                                f"in 0..{workload.batch - 1}")
        ids = [r for g in groups for r in g]
        if len(set(ids)) != len(ids):  # an op's requests would be counted twice (every policy partitions the batch)
            twice = next(r for r, n in Counter(ids).items() if n > 1)
            raise SimInputError(f"metadata micro_batches {name!r}: request {twice} is in more than one group, or twice "
                                "in one")
    enums = {c: _enum(c, d[c]) for c in _ENUM_COLUMNS if c != "stream"}
    enums["stream"] = _streams(system, d["stream"])
    ints = {c: _ints(c, d[c]) for c in _INT_COLUMNS}
    ints["scope"] = _ints("scope", d["scope"]) if "scope" in d else [-1] * rows  # files before scopes: none
    for which in ("alloc", "free"):
        for i in range(rows):
            if len(d[f"{which}_pool"][i] or ()) != len(d[f"{which}_bytes"][i] or ()):
                raise SimInputError(f"op {i}: {which}_pool and {which}_bytes differ in length")
    members = _members(d, rows)
    for col in ("deps", "alloc_bytes", "free_bytes"):  # ids and byte counts: whole numbers only (not 1.5 bytes)
        if not all(type(v) is int for cell in d[col] for v in (cell or ())):
            raise SimInputError(f"column {col} must hold lists of integers")
    ops = [
        Op(ints["id"][i], enums["kind"][i], enums["stream"][i], enums["phase"][i], ints["step"][i], ints["layer"][i],
           ints["micro_batch"][i], ints["tokens"][i], ints["flops"][i], ints["bytes"][i], tuple(d["deps"][i] or ()),
           ints["expert"][i], enums["payload"][i], ints["kv_tokens"][i],
           tuple(zip(d["alloc_pool"][i] or (), d["alloc_bytes"][i] or (), strict=True)),
           tuple(zip(d["free_pool"][i] or (), d["free_bytes"][i] or (), strict=True)), ints["scope"][i], members[i])
        for i in range(rows)
    ]
    micro = {k: [np.asarray(g, dtype=np.int64) for g in v] for k, v in meta["micro_batches"].items()}
    scale = meta.get("decode_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise SimInputError(f"metadata decode_scale must be a number, got {scale!r}")
    kernels = meta.get("expert_kernels", "per_expert")  # files before the field: a kernel call per expert
    if kernels not in EXPERT_KERNELS:
        raise SimInputError(f"metadata expert_kernels must be one of {', '.join(EXPERT_KERNELS)}, got {kernels!r}")
    return Plan(meta["policy"], meta["knobs"], model, system, workload, ops, meta["static_memory"], micro,
                decode_scale=float(scale), scopes=_scopes(meta.get("scopes", [])), expert_kernels=kernels)


def _members(d: dict[str, list[Any]], rows: int) -> list[tuple[tuple[int, int, int, int], ...]]:
    """Each op's grouped-expert members from the four parallel list columns (all or none; files written before
    grouped ops have none); `Plan.check` judges their values."""
    present = [c for c in _MEMBER_COLUMNS if c in d]
    if not present:
        return [()] * rows
    if len(present) != len(_MEMBER_COLUMNS):
        raise SimInputError(f"plan has {', '.join(present)} but lacks "
                            f"{', '.join(c for c in _MEMBER_COLUMNS if c not in d)}")
    out = []
    for i in range(rows):
        parts = [d[c][i] or () for c in _MEMBER_COLUMNS]
        if len({len(p) for p in parts}) != 1 or any(type(v) is not int for p in parts for v in p):
            raise SimInputError(f"op {i}: the member columns differ in length or hold something other than "
                                "integers")
        out.append(tuple(zip(*parts, strict=True)))
    return out


def _scopes(raw: Any) -> list[Scope]:
    """Explicit scopes from the metadata: each a phase, a step, request ids and a shard (checked by Plan.check)."""
    if not isinstance(raw, list):
        raise SimInputError("metadata scopes must be a list")
    out = []
    for k, sc in enumerate(raw):
        ok = isinstance(sc, dict) and set(sc) == {"phase", "step", "requests", "shard", "shards"} and all(
            isinstance(sc[f], int) and not isinstance(sc[f], bool) for f in ("step", "shard", "shards")) and \
            isinstance(sc["requests"], list) and all(isinstance(r, int) and not isinstance(r, bool)
                                                     for r in sc["requests"]) and sc["phase"] in ("prefill", "decode")
        if not ok:
            raise SimInputError(f"metadata scope {k}: needs phase (prefill/decode), step, requests (ids), shard and "
                                "shards (integers)")
        out.append(Scope(Phase(sc["phase"]), sc["step"], np.asarray(sc["requests"], dtype=np.int64), sc["shard"],
                         sc["shards"]))
    return out
