"""Plans on disk: one Parquet file, one row per op, with everything else in the file's key-value metadata.

The executor (and any other engine) reads the same file, so a plan made by a policy here can be run for real
on another machine. Columns: id, kind, stream, phase, step, layer, micro_batch, tokens, expert, flops, bytes,
kv_tokens, payload, deps (list<int64>), alloc_pool / alloc_bytes and free_pool / free_bytes (parallel lists).
Metadata key `cox-moe-plan` holds JSON: format version, policy, knobs, model and system specs, per-request
lengths, static memory and micro-batch membership.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sim.errors import SimInputError
from sim.plan import Op, OpKind, Payload, Phase, Plan, Stream
from sim.specs.catalog import build_system
from sim.specs.model import ModelSpec
from sim.workload import Workload

PLAN_FORMAT = "cox-moe-plan"
PLAN_VERSION = 1
_META_KEY = PLAN_FORMAT.encode()
_INT_COLUMNS = ("id", "step", "layer", "micro_batch", "tokens", "expert", "flops", "bytes", "kv_tokens")
_ENUM_COLUMNS = {"kind": OpKind, "stream": Stream, "phase": Phase, "payload": Payload}


def _table(ops: list[Op]) -> pa.Table:
    cols: dict[str, Any] = {c: pa.array([getattr(op, c) for op in ops], pa.int64()) for c in _INT_COLUMNS}
    for c in _ENUM_COLUMNS:
        cols[c] = pa.array([str(getattr(op, c)) for op in ops], pa.string()).dictionary_encode()
    cols["deps"] = pa.array([list(op.deps) for op in ops], pa.list_(pa.int64()))
    for which in ("alloc", "free"):
        cols[f"{which}_pool"] = pa.array([[p for p, _ in getattr(op, which)] for op in ops], pa.list_(pa.string()))
        cols[f"{which}_bytes"] = pa.array([[b for _, b in getattr(op, which)] for op in ops], pa.list_(pa.int64()))
    return pa.table(cols)


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write `plan` atomically (temporary file, then rename)."""
    path = Path(path)
    meta = {
        "format": PLAN_FORMAT, "version": PLAN_VERSION, "policy": plan.policy, "knobs": plan.knobs,
        "model": dataclasses.asdict(plan.model), "system": dataclasses.asdict(plan.system),
        "prompt_lens": plan.workload.prompt_lens.tolist(), "gen_lens": plan.workload.gen_lens.tolist(),
        "static_memory": plan.static_memory, "decode_scale": plan.decode_scale,
        "micro_batches": {k: [g.tolist() for g in v] for k, v in plan.micro_batches.items()},
    }
    table = _table(plan.ops).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load_plan(path: str | Path) -> Plan:
    """Read a plan written by `save_plan`; a missing, foreign or newer file is a one-line SimInputError."""
    path = Path(path)
    if not path.is_file():
        raise SimInputError(f"plan file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SimInputError(f"{path}: not a readable Parquet plan ({type(exc).__name__})") from None
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise SimInputError(f"{path}: not a cox-moe plan (no {PLAN_FORMAT} metadata)")
    meta = json.loads(raw)
    if meta.get("version") != PLAN_VERSION:
        raise SimInputError(f"{path}: unsupported plan version {meta.get('version')!r} (this reader: {PLAN_VERSION})")
    model = ModelSpec(**meta["model"])
    system = build_system(meta["system"]["name"], meta["system"], f"plan {path}")
    workload = Workload(np.asarray(meta["prompt_lens"], dtype=np.int64), np.asarray(meta["gen_lens"], dtype=np.int64))
    d = table.to_pydict()
    enums = {c: [_ENUM_COLUMNS[c](v) for v in d[c]] for c in _ENUM_COLUMNS}
    ops = [
        Op(d["id"][i], enums["kind"][i], enums["stream"][i], enums["phase"][i], d["step"][i], d["layer"][i],
           d["micro_batch"][i], d["tokens"][i], d["flops"][i], d["bytes"][i], tuple(d["deps"][i]), d["expert"][i],
           enums["payload"][i], d["kv_tokens"][i], tuple(zip(d["alloc_pool"][i], d["alloc_bytes"][i], strict=True)),
           tuple(zip(d["free_pool"][i], d["free_bytes"][i], strict=True)))
        for i in range(table.num_rows)
    ]
    micro = {k: [np.asarray(g, dtype=np.int64) for g in v] for k, v in meta["micro_batches"].items()}
    plan = Plan(meta["policy"], meta["knobs"], model, system, workload, ops, meta["static_memory"], micro,
                decode_scale=float(meta.get("decode_scale", 1.0)))
    try:
        plan.validate()
    except ValueError as exc:
        raise SimInputError(f"{path}: {exc}") from None
    return plan
