"""Routing data as others publish it, mapped into trace format v1; anything malformed is one TraceError.

- JSONL, one record per (request, token, layer): `{"request": 0, "token": 5, "phase": "prefill"|"decode",
  "layer": 3, "experts": [1, 6], "probs": [0.7, 0.3]}` (`probs` optional). A request's prefill tokens come
  first; it routes prompt_len + gen_len - 1 tokens (its last generated token is never fed back).
- The Switch-base CSV of `../shared/data/switch-base-32-cnn-dailymail`: one row per article, then per decode
  step its number, the printed router logits and chosen expert of every decoder MoE layer, and the token id.
  Each article becomes a request whose routed tokens are its decode steps (prompt length 1: the decoder
  start token); the gate weight is the softmax probability of the chosen expert.
- Per-layer count tables ([layers, experts] of top-k selections, CSV with a header or .npy): a trace whose
  tokens reproduce every count exactly, in a seeded random token order (tables carry no order).
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from traces.errors import TraceError
from traces.format import RoutingTrace, TraceHeader, expert_dtype, read_npy_header
from traces.limits import MAX_EXPERTS, MAX_LENGTH, check_memory

MAX_LAYERS = 4096  # MoE layers of an imported trace (the largest models have about a hundred)

_TENSOR = re.compile(r"tensor\(\[([^\]]*)\]\)")


# Memory a text file takes once parsed into Python objects, per byte of the file (measured: a JSONL routing file
# peaked at 7.5x its size while parsed; CSV rows of numbers parse into less).
JSONL_PARSED_PER_BYTE = 10.0
CSV_PARSED_PER_BYTE = 6.0


def read_utf8(path: Path, parsed_per_byte: float) -> str:
    """A text file's contents, refused in one line when it is missing, not UTF-8, or would need more memory than
    the limit once parsed (`parsed_per_byte` times its size), before it is read."""
    if not path.is_file():
        raise TraceError(f"file not found: {path}")
    check_memory(path.stat().st_size * parsed_per_byte, f"parsing {path}")
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's CSV) is not part of the text
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not UTF-8 text") from None


class _Record(BaseModel):
    """One JSONL routing record, validated strictly: JSON integers for ids (not floats, strings or booleans),
    a non-empty list of distinct expert ids, probabilities in [0, 1] matching the experts."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    request: Annotated[int, Field(ge=0)]
    token: Annotated[int, Field(ge=0)]
    phase: Literal["prefill", "decode"]
    layer: Annotated[int, Field(ge=0, lt=MAX_LAYERS)]
    experts: Annotated[list[Annotated[int, Field(ge=0, lt=MAX_EXPERTS)]], Field(min_length=1)]
    probs: list[Annotated[float, Field(ge=0.0, le=1.0)]] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> _Record:
        if len(set(self.experts)) != len(self.experts):
            raise ValueError(f"experts lists an expert twice: {self.experts}")
        if self.probs is not None and len(self.probs) != len(self.experts):
            raise ValueError(f"{len(self.experts)} experts but {len(self.probs)} probs")
        return self


def _record_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        near = difflib.get_close_matches(where, list(_Record.model_fields), n=1)
        return f"unknown field {where!r}" + (f" (did you mean {near[0]}?)" if near else "")
    msg = str(err["msg"]).removeprefix("Value error, ")
    got = "" if err["type"] in ("missing", "value_error") else f", got {err.get('input')!r}"
    return f"{where}: {msg}{got}" if where else f"{msg}{got}"


def import_jsonl(path: str | Path, model: str = "imported", num_experts: int | None = None) -> RoutingTrace:
    """Per-(request, token, layer) records -> trace v1 (layers, top-k and experts from the data)."""
    path = Path(path)
    records: dict[tuple[int, int], dict[int, tuple[list[int], list[float] | None]]] = {}
    phases: dict[tuple[int, int], str] = {}
    for n, line in enumerate(read_utf8(path, JSONL_PARSED_PER_BYTE).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(raw, dict):
            raise TraceError(f"{path}:{n}: bad record (a record must be a JSON object)")
        try:
            rec = _Record.model_validate(raw)
        except ValidationError as exc:
            raise TraceError(f"{path}:{n}: bad record ({_record_error(exc)})") from None
        key, layer, experts, phase, probs = (rec.request, rec.token), rec.layer, rec.experts, rec.phase, rec.probs
        if phases.setdefault(key, phase) != phase:
            raise TraceError(f"{path}:{n}: request {key[0]} token {key[1]} is both prefill and decode")
        if layer in records.setdefault(key, {}):
            raise TraceError(f"{path}:{n}: request {key[0]} token {key[1]} layer {layer} appears twice")
        records[key][layer] = (experts, probs)
    if not records:
        raise TraceError(f"{path}: no records")
    layers = max(max(v) for v in records.values()) + 1
    seen_layers = set().union(*(v.keys() for v in records.values()))
    if len(seen_layers) != layers:
        missing = sorted(set(range(layers)) - seen_layers)
        raise TraceError(f"{path}: layers must be 0..{layers - 1} with none missing; no record has layer(s) "
                         f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    lengths = [len(e) for v in records.values() for e, _ in v.values()]
    top_k = max(set(lengths), key=lengths.count)  # the usual length; records that differ are reported
    requests = sorted({r for r, _ in records})
    if requests != list(range(len(requests))):
        raise TraceError(f"{path}: request ids must be 0..{len(requests) - 1}")
    with_probs = sum(p is not None for v in records.values() for _, p in v.values())
    all_records = sum(len(v) for v in records.values())
    has_probs = with_probs > 0
    if has_probs and with_probs != all_records:
        raise TraceError(f"{path}: probs on some records but not others ({with_probs:,} of {all_records:,}); give "
                         "them on every record or on none")
    check_memory(len(records) * layers * top_k * 16.0, f"{path}: {len(records):,} tokens x {layers} layers")
    if num_experts is not None:
        top_id = max(e for v in records.values() for ex, _ in v.values() for e in ex)
        if top_id >= num_experts:
            raise TraceError(f"{path}: expert id {top_id} is out of range for --experts {num_experts}")
    rows, gates, prompt_lens, gen_lens = [], [], [], []
    tokens_of: dict[int, list[int]] = {}  # one pass over the records (scanning them per request was quadratic)
    for rr, t in records:
        tokens_of.setdefault(rr, []).append(t)
    for r in requests:
        tokens = sorted(tokens_of[r])
        if tokens != list(range(len(tokens))):
            raise TraceError(f"{path}: request {r} tokens must be 0..{len(tokens) - 1} with none missing")
        kinds = [phases[(r, t)] for t in tokens]
        n_prompt = kinds.count("prefill")
        if n_prompt == 0 or kinds != ["prefill"] * n_prompt + ["decode"] * (len(tokens) - n_prompt):
            raise TraceError(f"{path}: request {r} needs its prefill tokens first (at least one)")
        prompt_lens.append(n_prompt)
        gen_lens.append(len(tokens) - n_prompt + 1)
        for t in tokens:
            per = records[(r, t)]
            if sorted(per) != list(range(layers)):
                raise TraceError(f"{path}: request {r} token {t} lacks layer(s) "
                                 f"{sorted(set(range(layers)) - set(per))}")
            row, grow = [], []
            for layer in range(layers):
                experts, probs = per[layer]
                if len(experts) != top_k:
                    raise TraceError(f"{path}: request {r} token {t} layer {layer} lists {len(experts)} experts, "
                                     f"expected {top_k}")
                row.append(experts)
                grow.append(probs if probs is not None else [0.0] * top_k)
            rows.append(row)
            gates.append(grow)
    ids = np.asarray(rows, dtype=np.int64)
    experts_n = num_experts or int(ids.max()) + 1
    header = TraceHeader(model, layers, experts_n, top_k, source=f"jsonl:{path.name}")
    gate_array = np.asarray(gates, dtype=np.float32) if has_probs else None
    return RoutingTrace(header, np.asarray(prompt_lens, dtype=np.int32), np.asarray(gen_lens, dtype=np.int32),
                        ids.astype(expert_dtype(experts_n)), gate_array)


def import_switch_csv(path: str | Path, model: str = "switch-base-32") -> RoutingTrace:
    """The Switch-base decoder routing CSV -> trace v1 (top-1, gate = softmax probability of the choice)."""
    path = Path(path)
    text = read_utf8(path, CSV_PARSED_PER_BYTE)
    experts_rows, gate_rows, gen_lens = [], [], []
    layers = num_experts = None
    try:
        parsed = list(csv.reader(text.splitlines()))
    except csv.Error as exc:  # e.g. a field longer than the csv module's limit
        raise TraceError(f"{path}: not a readable CSV ({exc})") from None
    for n, row in enumerate(parsed, start=1):
        if not row:
            continue
        if (len(row) - 1) % 3 or len(row) < 4:
            raise TraceError(f"{path}:{n}: expected an article id then (step, routing, token) triples")
        steps = (len(row) - 1) // 3
        for i in range(steps):
            cell = row[2 + 3 * i]
            try:
                tensors = [np.array([float(v) for v in m.replace("\n", " ").split(",") if v.strip()])
                           for m in _TENSOR.findall(cell)]
            except ValueError:
                raise TraceError(f"{path}:{n}: step {i}: a tensor holds something that is not a number") from None
            if len(tensors) < 2 or len(tensors) % 2:
                raise TraceError(f"{path}:{n}: step {i}: expected (logits, choice) tensor pairs")
            logits, chosen = tensors[0::2], tensors[1::2]
            if layers is None:
                layers, num_experts = len(logits), len(logits[0])
                if not num_experts:
                    raise TraceError(f"{path}:{n}: step {i}: a layer lists no logits")
            if len(logits) != layers or any(len(x) != num_experts for x in logits) or any(len(c) != 1 for c in chosen):
                raise TraceError(f"{path}:{n}: step {i}: every step needs {layers} layers of {num_experts} logits "
                                 "and one choice")
            choices = [float(c[0]) for c in chosen]
            if not all(np.isfinite(x).all() for x in logits) or not all(
                    math.isfinite(c) and c == int(c) and 0 <= c < num_experts for c in choices):
                raise TraceError(f"{path}:{n}: step {i}: logits must be finite and each choice a whole expert id in "
                                 f"0..{num_experts - 1}")
            ids = [int(c[0]) for c in chosen]
            probs = []
            for x, e in zip(logits, ids, strict=True):
                p = np.exp(x - x.max())
                probs.append(float(p[e] / p.sum()))
            experts_rows.append([[e] for e in ids])
            gate_rows.append([[p] for p in probs])
        gen_lens.append(steps)
    if not gen_lens:
        raise TraceError(f"{path}: no articles")
    assert layers is not None and num_experts is not None
    header = TraceHeader(model, layers, num_experts, 1, source=f"switch-csv:{path.name}")
    return RoutingTrace(header, np.ones(len(gen_lens), dtype=np.int32), np.asarray(gen_lens, dtype=np.int32),
                        np.asarray(experts_rows, dtype=expert_dtype(num_experts)),
                        np.asarray(gate_rows, dtype=np.float32))


def read_count_table(path: str | Path) -> np.ndarray:
    """A [layers, experts] table of selection counts from .npy or CSV (first column may name the layer)."""
    path = Path(path)
    if path.suffix == ".npy":
        if not path.is_file():  # a FIFO would block the open below
            raise TraceError(f"file not found: {path}")
        try:
            with open(path, "rb") as fh:  # the header first: a 64-byte file may declare terabytes
                shape, dtype = read_npy_header(fh)
            if dtype.kind not in "biuf":
                raise TraceError(f"{path}: counts must be a real integer or float array, got {dtype}")
            check_memory(float(np.prod(shape, dtype=np.float64)) * 16, f"a counts table {path}")
            table = np.load(path, allow_pickle=False)
        except TraceError:  # a ValueError too: keep its own message
            raise
        except (OSError, ValueError) as exc:
            raise TraceError(f"{path}: cannot read ({type(exc).__name__})") from None
    else:
        lines = [r for r in csv.reader(read_utf8(path, CSV_PARSED_PER_BYTE).splitlines()) if r]
        try:
            body = lines[1:] if lines and not _numeric(lines[0]) else lines
            values = np.asarray([[float(v) for v in r] for r in body])
        except ValueError:
            raise TraceError(f"{path}: counts must be numbers") from None
        # the first column numbers the layers when its header says so, or is empty (pandas' `to_csv` index)
        if values.ndim == 2 and lines and not _numeric(lines[0]) and lines[0][0].strip().lower() in ("layer", ""):
            layer = values[:, 0]
            if sorted(layer.tolist()) != list(range(len(layer))):
                raise TraceError(f"{path}: the layer column must number the rows 0..{len(layer) - 1}, each once; "
                                 f"got {layer[:8].astype(int).tolist()}{' ...' if len(layer) > 8 else ''}")
            values = values[np.argsort(layer, kind="stable"), 1:]
        table = values
    if table.ndim != 2 or table.size == 0:
        raise TraceError(f"{path}: expected a 2-D [layers, experts] table")
    if table.dtype.kind == "f" and table.dtype.itemsize < 8:  # the bound below overflows a float16 (a warning)
        table = table.astype(np.float64)
    if not np.isfinite(table).all() or (table < 0).any() or (table != np.round(table)).any() or (
            table.max() > MAX_LENGTH * MAX_EXPERTS):  # counts beyond any request's tokens x experts overflow casts
        raise TraceError(f"{path}: counts must be non-negative integers of at most {MAX_LENGTH * MAX_EXPERTS:,}")
    return table.astype(np.int64)


def _numeric(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


def trace_from_counts(table: np.ndarray, top_k: int, model: str = "counts", seed: int = 0,
                      source: str = "counts") -> RoutingTrace:
    """A one-request trace whose tokens reproduce `table` exactly (every layer's row must sum to k x tokens)."""
    layers, num_experts = table.shape
    sums = table.sum(axis=1)
    if (sums % top_k).any() or len(set(sums.tolist())) != 1:
        raise TraceError(f"every layer's counts must sum to the same multiple of top_k={top_k}; got {sums.tolist()}")
    tokens = int(sums[0] // top_k)
    if tokens == 0:
        raise TraceError("the table holds no selections")
    if tokens > MAX_LENGTH:
        raise TraceError(f"the table holds {tokens:,} tokens; a request holds at most {MAX_LENGTH:,}")
    # the trace's ids plus one layer's repeated expert ids (int64) while they are dealt out
    check_memory(tokens * top_k * (layers * expert_dtype(num_experts).itemsize + 8), "a trace from counts")
    if (table > tokens).any():
        raise TraceError(f"an expert is chosen more often ({int(table.max())}) than there are tokens ({tokens})")
    rng = np.random.default_rng([seed, 0xC0])
    ids = np.empty((tokens, layers, top_k), dtype=expert_dtype(num_experts))
    for layer in range(layers):
        flat = np.repeat(np.arange(num_experts), table[layer])
        # Column c takes flat[c*T:(c+1)*T]: an expert's run is at most T long, so no row repeats an expert.
        ids[:, layer, :] = flat.reshape(top_k, tokens).T
        ids[:, layer, :] = ids[rng.permutation(tokens), layer, :]
    header = TraceHeader(model, layers, num_experts, top_k, source=source)
    return RoutingTrace(header, np.array([tokens], dtype=np.int32), np.array([1], dtype=np.int32), ids)
