"""Routing trace format v1: per request its lengths, per routed token and MoE layer the top-k expert ids.

File layout (`.npz`, loaded with `allow_pickle=False`):
- `header`: UTF-8 JSON bytes as a uint8 array: `format`, `version` (1), `model`, `num_layers` (MoE layers),
  `num_experts`, `top_k`, `source`.
- `prompt_lens`, `gen_lens`: int32 [R]. Request r routes `prompt_lens[r] + gen_lens[r] - 1` tokens: its prompt
  (in prefill) and every generated token but the last (each fed back in one decode step).
- `experts`: uint8 (or uint16 when experts > 256) [T, num_layers, top_k], requests back to back in order.
- `gate_weights` (optional): float16/float32 [T, num_layers, top_k].
- `request_features` (optional): float32 [R, D], a per-request feature vector (a prompt embedding, or the topic
  feature of a synthetic topic-mixture trace) that expert-aware stratification clusters on.
- `prompt_counts` (optional): unsigned [R, num_layers, num_experts], each request's prompt tokens routed to each
  expert. A trace with it keeps its prompts only as these counts (what the simulator reads; a quarter of the
  bytes at 800 prompt and 256 generated tokens): `experts` (and `gate_weights`) then hold the generated tokens'
  rows alone, `gen_lens[r] - 1` per request. The executor, routing statistics and plan verification need every
  row and refuse such a trace.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from traces import jit
from traces.errors import TraceError
from traces.limits import MAX_LENGTH, check_experts, check_memory
from traces.pages import plain_pages

FORMAT_NAME = "cox-moe-routing-trace"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TraceHeader:
    """What a trace describes: the model's MoE shape and where the routing came from."""

    model: str
    num_layers: int
    num_experts: int
    top_k: int
    source: str = "unknown"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": self.model,
                "num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "source": self.source, "extra": self.extra}


REQUEST_TABLE_BYTES = 64 << 20  # per-request prefill counts (RoutingTrace.prefill_counts) are kept up to this
BAND_BYTES = 16 << 20  # a decode table's layer is counted in bands of (step, group) slots of this many int64 bytes
SMALL_TABLE_BINS = 1 << 17  # a decode table of at most this many entries (1 MiB of int64 bins) is counted in place


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """A validated routing trace held in memory (see the module docstring for the layout)."""

    header: TraceHeader
    prompt_lens: np.ndarray
    gen_lens: np.ndarray
    experts: np.ndarray
    gate_weights: np.ndarray | None = None
    request_features: np.ndarray | None = None
    prompt_counts: np.ndarray | None = None  # prompts as per-request counts; `experts` then holds decode rows only

    def __post_init__(self) -> None:
        validate(self, thorough=False)

    @property
    def has_prompt_rows(self) -> bool:
        """Whether every routed token has its row (False: the prompts are kept as per-request counts)."""
        return self.prompt_counts is None

    def require_prompt_rows(self, what: str) -> None:
        """Refuse, naming `what`, a trace that keeps its prompts only as counts."""
        if self.prompt_counts is not None:
            raise TraceError(f"{what} needs every prompt token's experts; this trace keeps its prompts as "
                             "per-request counts (the simulator's form): write a full one with `coxmoe trace gen`")

    # ---- shape ------------------------------------------------------------------------------------------
    @property
    def num_requests(self) -> int:
        return int(self.prompt_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        """Rows of `experts`: every routed token, or the generated ones alone when prompts are counts."""
        return int(self.experts.shape[0])

    @cached_property
    def routed_lens(self) -> np.ndarray:
        return self.prompt_lens.astype(np.int64) + self.gen_lens.astype(np.int64) - 1

    @cached_property
    def token_offsets(self) -> np.ndarray:
        """offsets[r] is the first token row of request r; offsets[R] == num_tokens."""
        lens = self.routed_lens if self.prompt_counts is None else self.gen_lens.astype(np.int64) - 1
        return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)

    @cached_property
    def decode_offsets(self) -> np.ndarray:
        """decode_offsets[r] is the row of request r's first generated token fed back (decode step 1)."""
        first = self.token_offsets[:-1]
        return first + self.prompt_lens.astype(np.int64) if self.prompt_counts is None else first

    def head(self, n: int) -> RoutingTrace:
        """The first `n` requests as a trace of their own (views, no copies)."""
        end = int(self.token_offsets[n])
        return RoutingTrace(self.header, self.prompt_lens[:n], self.gen_lens[:n], self.experts[:end],
                            None if self.gate_weights is None else self.gate_weights[:end],
                            None if self.request_features is None else self.request_features[:n],
                            None if self.prompt_counts is None else self.prompt_counts[:n])

    # ---- token selections used by both engines ------------------------------------------------------------
    def prefill_rows(self, requests: np.ndarray) -> np.ndarray:
        """Token rows of the prompts of `requests` (request order, then position)."""
        self.require_prompt_rows("prompt rows")
        requests = np.asarray(requests, dtype=np.int64)
        return concatenated_ranges(self.token_offsets[requests], self.prompt_lens[requests])

    def decode_rows(self, step: int, requests: np.ndarray) -> np.ndarray:
        """Token rows fed at decode step `step` (1-based) by those of `requests` still generating."""
        requests = np.asarray(requests, dtype=np.int64)
        active = requests[self.gen_lens[requests] > step]
        return self.decode_offsets[active] + (step - 1)

    def expert_counts(self, rows: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
        """Tokens routed to each expert at each MoE layer over `rows`: int64 [num_layers, num_experts]."""
        L, E = self.header.num_layers, self.header.num_experts
        out = np.zeros(L * E, dtype=np.int64)
        offsets = (np.arange(L, dtype=np.int32) * E)[None, :, None]
        for start in range(0, len(rows), chunk):  # chunks bound the int32 temporary
            flat = self.experts[rows[start:start + chunk]] + offsets  # [n, L, k]
            out += np.bincount(flat.ravel(), minlength=L * E)
        return out.reshape(L, E)

    def prefill_counts(self, requests: np.ndarray) -> np.ndarray:
        """`expert_counts(prefill_rows(requests))`, summed from per-request counts when those are kept: a
        search builds many plans whose micro-batches group the same prompts differently. The table covers
        requests 0..n-1 only, n growing (at least doubling) as later requests are asked for, so a small batch
        from a large trace counts no more than it uses."""
        requests = np.asarray(requests, dtype=np.int64)
        if requests.size == 0:
            return self.expert_counts(np.zeros(0, dtype=np.int64))
        if self.prompt_counts is not None:
            return self.prompt_counts[requests].sum(axis=0, dtype=np.int64)
        table = self._prefill_table(int(requests.max()) + 1)
        if table is None:
            return self.expert_counts(self.prefill_rows(requests))
        return table[requests].sum(axis=0, dtype=np.int64)

    def _prefill_table(self, needed: int) -> np.ndarray | None:
        """Per-request prompt counts [n, L, E] with n >= `needed`, in the narrowest unsigned type that holds a
        request's count (`count_dtype`: 16 bits for prompts up to 8,191 tokens at top-8), kept on the trace and
        grown by counting only the requests it lacked; None when [needed, L, E] would exceed
        REQUEST_TABLE_BYTES."""
        L, E = self.header.num_layers, self.header.num_experts
        table = self.__dict__.get("_prefill_counts_table")
        if table is not None and table.shape[0] >= needed:
            return table
        dtype = count_dtype(int(self.prompt_lens.max(initial=0)) * self.header.top_k)
        row_bytes = L * E * dtype.itemsize
        if needed * row_bytes > REQUEST_TABLE_BYTES:
            return None
        have = 0 if table is None else table.shape[0]
        n = min(max(needed, 2 * have), self.num_requests, REQUEST_TABLE_BYTES // row_bytes)
        out = np.zeros((n, L, E), dtype=dtype)
        if table is not None:
            out[:have] = table
        lens = self.prompt_lens[:n].astype(np.int64)
        for first, last in request_groups(lens, 1 << 15, start=have):
            size = last - first
            request_of_row = np.repeat(np.arange(size, dtype=np.int64), lens[first:last])
            for layer, counts in self._layer_counts(self.prefill_rows(np.arange(first, last)), request_of_row, size):
                out[first:last, layer, :] = counts
        self.__dict__["_prefill_counts_table"] = table = out  # a cache on a frozen dataclass, as cached_property does
        return table

    def decode_step_counts(self, groups: Sequence[np.ndarray]) -> np.ndarray | None:
        """Tokens routed per (decode step, group, MoE layer, expert), [S, G, L, E] in the narrowest unsigned type
        that holds them (counted in `count_dtype` of their bound, then `narrowed`; widen before adding entries up):
        entry [t - 1, g] is
        `expert_counts(decode_rows(t, groups[g]))`. One pass over the groups' decode rows, where asking step by
        step gathers and counts each step's rows apart. Kept on the trace for the last few groupings (a search
        plans several); None when the table would exceed REQUEST_TABLE_BYTES. Groups that split every request
        between them, once the whole batch's table is kept (`phase_counts` keeps it), count all but the largest:
        its counts are the batch's less the others' (`_derived_group`)."""
        L, E = self.header.num_layers, self.header.num_experts
        groups = [np.asarray(g, dtype=np.int64) for g in groups]
        sizes = np.array([g.size for g in groups], dtype=np.int64)
        requests = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
        key = (tuple(sizes.tolist()), requests.tobytes())
        cache = self.__dict__.setdefault("_decode_step_tables", {})
        if key in cache:
            return cache[key]
        steps = self.gen_lens[requests].astype(np.int64) - 1  # decode rows per request (steps 1..gen-1)
        S, G = (int(steps.max()) if steps.size else 0), len(groups)
        dtype = count_dtype(int(sizes.max(initial=0)) * self.header.top_k)  # a group's tokens at one step, top-k
        if S * G * L * E * dtype.itemsize > REQUEST_TABLE_BYTES:
            return None
        out = np.zeros((S * G, L, E), dtype=dtype)
        derived, whole = self._derived_group(cache, groups, requests)
        counted = [i for i in range(G) if i != derived]
        self._count_steps([groups[i] for i in counted], counted, G, out)
        table = out.reshape(S, G, L, E)
        block = max(1, BAND_BYTES // 16 // (L * E * 8))  # steps at a time: a 1 MiB int64 temporary
        for lo in range(0, S if derived >= 0 else 0, block):  # in place, beside the table
            rest = whole[lo:lo + block, 0].astype(np.int64)
            for i in counted:
                rest -= table[lo:lo + block, i]
            table[lo:lo + block, derived] = rest
        return self._keep_decode_table(cache, key, table)

    def _derived_group(self, cache: dict, groups: list[np.ndarray], requests: np.ndarray
                       ) -> tuple[int, np.ndarray | None]:
        """(index of the largest group, the whole batch's kept table) when the groups, two or more, hold every
        request once and that table is kept: the largest group's counts are then the batch's less the others'.
        (-1, None) otherwise."""
        R = self.num_requests
        if len(groups) < 2 or requests.size != R:
            return -1, None
        every = np.arange(R, dtype=np.int64)
        whole = cache.get(((R,), every.tobytes()))
        if whole is None or not np.array_equal(np.sort(requests), every):
            return -1, None
        return int(np.argmax([g.size for g in groups])), whole

    def _count_steps(self, groups: list[np.ndarray], slots: list[int], G: int, out: np.ndarray) -> None:
        """Add the decode rows of each of `groups` into `out` [S * G, L, E] as group `slots[k]` of the G: row
        (t - 1) * G + slots[k] holds group k's counts at step t (`decode_step_counts`). Numba's kernel where it
        pays; else numpy, in place for a small table (`_count_in_place`), in bands of slots for a larger one."""
        L, E = self.header.num_layers, self.header.num_experts
        sizes = np.array([g.size for g in groups], dtype=np.int64)
        requests = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
        steps = self.gen_lens[requests].astype(np.int64) - 1
        slot_of = np.repeat(np.asarray(slots, dtype=np.int64), sizes)  # each request's group slot
        n = int(steps.sum())
        if jit.worth_it(n * L * self.header.top_k, jit.SAVED_NS_COUNT):  # one compiled pass (traces/count_kernels.py)
            from traces import count_kernels

            count_kernels.decode_step_table(self.experts, self.decode_offsets[requests], steps, slot_of, G, out)
            return
        first = np.concatenate([[0], np.cumsum(steps)[:-1]]) if steps.size else steps
        local = np.arange(n, dtype=np.int64) - np.repeat(first, steps)  # 0-based step of each decode row
        rows = np.repeat(self.decode_offsets[requests], steps) + local
        slot = local * G + np.repeat(slot_of, steps)  # its (step, group)
        if out.size <= SMALL_TABLE_BINS:  # the whole table's bins stay in cache: count the rows as they lie
            self._count_in_place(rows, slot, out)
            return
        order = np.argsort(slot, kind="stable")  # step-major: a chunk of rows covers a narrow band of slots
        rows, slot = rows[order], slot[order]
        chunk, band_slots = 1 << 15, max(1, BAND_BYTES // (8 * E))
        start = 0
        while start < n:  # chunks bound the int64 temporaries: rows, and the band of slots they count into
            lo = int(slot[start])
            stop = min(start + chunk, int(np.searchsorted(slot, lo + band_slots, side="left")))
            hi = int(slot[stop - 1]) + 1
            for layer, counts in self._layer_counts(rows[start:stop], slot[start:stop] - lo, hi - lo):
                band = out[lo:hi, layer, :]
                np.add(band, counts, out=band, casting="unsafe")
            start = stop

    def _count_in_place(self, rows: np.ndarray, slot: np.ndarray, out: np.ndarray) -> None:
        """Add decode rows into `out` [slots, L, E] (a table small enough that its int64 bins stay in cache) in
        their own order, a chunk at a time: one key per id (slot, layer, expert) and one bincount over the whole
        table, into one reused key buffer (a fresh one a chunk cost more in page faults than the count), with no
        sort and, where the rows run consecutively, no gather (Mixtral-8x7B's batch of 1,024 over 255 steps:
        0.10 -> 0.06 s against the bands of `_count_steps`)."""
        L, E = self.header.num_layers, self.header.num_experts
        layer_base = (np.arange(L, dtype=np.int64) * E)[None, :, None]
        total = np.zeros(out.size, dtype=np.int64)
        chunk = 1 << 14
        buffer = np.empty((min(chunk, rows.size), L, self.header.top_k), dtype=np.int64)  # one key buffer, reused
        for start in range(0, rows.size, chunk):
            r = rows[start:start + chunk]
            keys = buffer[:r.size]
            ids = self.experts[int(r[0]):int(r[-1]) + 1] if bool((np.diff(r) == 1).all()) else self.experts[r]
            np.add(ids, layer_base, out=keys)
            keys += (slot[start:start + chunk] * (L * E))[:, None, None]
            total += np.bincount(keys.ravel(), minlength=out.size)
        np.add(out, total.reshape(out.shape), out=out, casting="unsafe")

    @staticmethod
    def _keep_decode_table(cache: dict, key: tuple, table: np.ndarray) -> np.ndarray:
        """A decode step table kept read-only (shared by every plan of a search), for the last few groupings, in the
        narrowest type its counts fit (`narrowed`)."""
        table = narrowed(table)
        table.flags.writeable = False
        if len(cache) >= 4:
            cache.pop(next(iter(cache)))
        cache[key] = table
        return table

    def _layer_counts(self, rows: np.ndarray, bin_of_row: np.ndarray, bins: int) -> Iterator[tuple[int, np.ndarray]]:
        """(layer, int64 [bins, E]) for each MoE layer: the tokens of `rows` routed to each expert, summed per bin
        (`bin_of_row`). The rows' ids are transposed once so each layer's are contiguous and count into bins that
        stay cached (the count tables' kernel)."""
        ids = self.experts[rows].transpose(1, 0, 2).copy()  # [L, rows, k]
        E = self.header.num_experts
        base = bin_of_row[:, None] * E
        for layer in range(self.header.num_layers):
            yield layer, np.bincount((ids[layer] + base).ravel(), minlength=bins * E).reshape(bins, E)

    @cached_property
    def phase_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt, generated) tokens routed to each expert per MoE layer over the whole trace: [L, E] each."""
        every = np.arange(self.num_requests)
        prompt = self.prefill_counts(every)
        steps = self.decode_step_counts([every])  # counts only the decode rows (and keeps them per step)
        if steps is None:
            every_row = self.expert_counts(np.arange(self.num_tokens))
            return prompt, every_row - prompt if self.prompt_counts is None else every_row
        return prompt, steps.sum(axis=(0, 1), dtype=np.int64)


def request_groups(prompt_lens: np.ndarray, tokens: int, start: int = 0,
                   max_requests: int | None = None) -> Iterator[tuple[int, int]]:
    """(first, last + 1) of consecutive requests from `start` on, each group holding about `tokens` prompt tokens
    (at least one request, at most `max_requests`): how the count tables bound their temporaries."""
    ends = np.cumsum(prompt_lens, dtype=np.int64)
    n, first = len(ends), start
    while first < n:
        done = int(ends[first - 1]) if first else 0
        last = int(np.searchsorted(ends, done + tokens, side="right"))
        if max_requests is not None:
            last = min(last, first + max_requests)
        last = min(max(last, first + 1), n)
        yield first, last
        first = last


def count_dtype(bound: int) -> np.dtype:
    """The narrowest unsigned integer type that holds counts up to `bound` (count tables: a request's or a
    group's tokens times top-k bounds any one expert's count, even in a trace that repeats an expert)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if bound <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def narrowed(table: np.ndarray) -> np.ndarray:
    """An unsigned count table in the narrowest type that holds its largest entry (`count_dtype` sizes a table by
    what its counts could reach; most reach far less: Qwen3-30B-A3B's prompt counts at 800 tokens, bound 6,400,
    stay below 100 under uniform routing, so half the bytes). The same values; readers widen before summing. The
    narrow copy is made beside the table (at most half its bytes) before the table is let go."""
    if table.dtype.kind != "u" or table.dtype.itemsize == 1 or table.size == 0:
        return table
    dtype = count_dtype(int(table.max()))
    return table.astype(dtype) if dtype.itemsize < table.dtype.itemsize else table


def _has_repeats(ex: np.ndarray, num_experts: int) -> bool:
    """Whether any token lists one expert twice: a popcount of OR-ed bit masks when ids fit in 64 bits."""
    k = ex.shape[-1]
    if k == 2:
        return bool((ex[..., 0] == ex[..., 1]).any())
    if k <= 8:  # pairwise column compares beat a sort for small k
        return any(bool((ex[..., i] == ex[..., j]).any()) for i in range(k) for j in range(i + 1, k))
    srt = np.sort(ex, axis=-1)
    return bool((srt[..., 1:] == srt[..., :-1]).any())


COUNT_TABLES = 4  # [layers, experts] int64 tables alive at once while a trace is counted (stats, EAS)


def validate(trace: RoutingTrace, thorough: bool = True) -> None:
    """Raise TraceError naming the first inconsistency. `thorough` also checks every token's top-k for a repeated
    expert (traces from files and importers; synthesised traces are distinct by construction)."""
    h = trace.header
    for name in ("num_layers", "num_experts", "top_k"):
        value = getattr(h, name)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            raise TraceError(f"trace header: {name} must be a positive integer, got {value!r}")
    check_experts(int(h.num_experts), "trace header")
    if not isinstance(h.extra, dict):
        raise TraceError(f"trace header: extra must be a JSON object, got {type(h.extra).__name__}")
    if h.top_k > h.num_experts:
        raise TraceError(f"trace header: top_k {h.top_k} exceeds num_experts {h.num_experts}")
    # Counting a trace builds [layers, experts] int64 tables (counts, bincount's result, statistics, EAS's ranking):
    # a header of a few bytes may declare billions of cells, so they are charged before any is made.
    check_memory(COUNT_TABLES * 8 * int(h.num_layers) * int(h.num_experts),
                 f"counting a trace of {int(h.num_layers):,} layers x {int(h.num_experts):,} experts")
    for name in ("prompt_lens", "gen_lens"):
        arr = getattr(trace, name)
        if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise TraceError(f"trace: {name} must be a 1-D integer array")
        if arr.size and int(arr.min()) < 1:
            raise TraceError(f"trace: {name} must be >= 1 for every request (found {int(arr.min())})")
        if arr.size and int(arr.max()) > MAX_LENGTH:  # bounds every sum of lengths below int64's range
            raise TraceError(f"trace: {name} must be at most {MAX_LENGTH:,} tokens (found {int(arr.max()):,})")
    if trace.prompt_lens.shape != trace.gen_lens.shape:
        raise TraceError("trace: prompt_lens and gen_lens have different lengths")
    if trace.prompt_lens.size == 0:
        raise TraceError("trace: no requests")
    ex = trace.experts
    if not isinstance(ex, np.ndarray) or ex.dtype.kind != "u" or ex.dtype.itemsize > 2:
        raise TraceError("trace: experts must be an unsigned 8- or 16-bit integer array")
    counted = trace.prompt_counts is not None
    rows = int(trace.routed_lens.sum()) - (int(trace.prompt_lens.astype(np.int64).sum()) if counted else 0)
    expected = (rows, h.num_layers, h.top_k)
    if ex.shape != expected:
        raise TraceError(f"trace: experts has shape {ex.shape}, expected {expected} from the lengths and header"
                         + (" (generated tokens only: the prompts are counts)" if counted else ""))
    if counted:
        _validate_prompt_counts(trace, thorough)
    if ex.size:
        top = int(ex.max())
        if top >= h.num_experts:
            raise TraceError(f"trace: expert id {top} out of range for {h.num_experts} experts")
        if thorough and h.top_k > 1 and _has_repeats(ex, h.num_experts):
            raise TraceError("trace: a token lists the same expert twice in its top-k")
    gw = trace.gate_weights
    if gw is not None:
        if not isinstance(gw, np.ndarray) or gw.dtype.kind != "f" or gw.shape != ex.shape:
            raise TraceError(f"trace: gate_weights must be a float array of shape {ex.shape}")
        if gw.size and (not np.isfinite(gw).all() or float(gw.min()) < 0 or float(gw.max()) > 1.0 + 1e-3):
            raise TraceError("trace: gate_weights must be finite and within [0, 1]")
    feats = trace.request_features
    if feats is not None:
        if not isinstance(feats, np.ndarray) or feats.dtype.kind != "f" or feats.ndim != 2 \
                or feats.shape[0] != trace.prompt_lens.size or feats.shape[1] < 1:
            raise TraceError(f"trace: request_features must be a float array of shape [{trace.prompt_lens.size}, D] "
                             "with D >= 1")
        if not np.isfinite(feats).all():
            raise TraceError("trace: request_features must be finite")
        if feats.dtype.itemsize > 4 and feats.size and float(np.abs(feats).max()) > float(np.finfo(np.float32).max):
            raise TraceError("trace: request_features must fit float32 (the file format's type; a larger value "
                             "would be saved as inf)")


def _validate_prompt_counts(trace: RoutingTrace, thorough: bool) -> None:
    """Per-request prompt counts: unsigned [R, L, E], each (request, layer) summing to its prompt's tokens times
    top-k; `thorough` also bounds every entry by its prompt's length (no token lists an expert twice)."""
    h, pc = trace.header, trace.prompt_counts
    shape = (trace.num_requests, h.num_layers, h.num_experts)
    if not isinstance(pc, np.ndarray) or pc.dtype.kind != "u" or pc.dtype.itemsize > 4 or pc.shape != shape:
        raise TraceError(f"trace: prompt_counts must be a uint8, uint16 or uint32 array of shape {shape}")
    lens = trace.prompt_lens.astype(np.int64)
    if lens.size and int(lens.max()) > MAX_LENGTH:  # no rows bound them here, as they do in the full form
        raise TraceError(f"trace: a prompt of {int(lens.max()):,} tokens exceeds the {MAX_LENGTH:,} a request may hold")
    sums = pc.sum(axis=2, dtype=np.int64)
    if not (sums == (lens * h.top_k)[:, None]).all():
        r, layer = np.argwhere(sums != (lens * h.top_k)[:, None])[0]
        raise TraceError(f"trace: prompt_counts of request {r} at layer {layer} sum to {sums[r, layer]}, expected "
                         f"its {lens[r]} prompt tokens x top-{h.top_k}")
    if thorough and pc.size and (pc > lens[:, None, None]).any():
        raise TraceError("trace: a prompt_counts entry exceeds its prompt's length (a token lists an expert twice)")


def concatenated_ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The rows starts[i] .. starts[i] + lens[i] - 1 of every i, in order, as one int64 array."""
    lens = np.asarray(lens, dtype=np.int64)
    if lens.size == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.repeat(np.asarray(starts, dtype=np.int64) - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return first + np.arange(int(lens.sum()), dtype=np.int64)


def expert_dtype(num_experts: int) -> np.dtype:
    check_experts(num_experts, "routing")
    return np.dtype(np.uint8) if num_experts <= 256 else np.dtype(np.uint16)


def save_trace(trace: RoutingTrace, path: str | Path, compress: bool = False) -> Path:
    """Write atomically (temporary file, then rename) so a crash never leaves a half-written trace."""
    path = Path(path)
    if path.suffix != ".npz":
        raise TraceError(f"trace files end in .npz, got {path.name}")
    arrays: dict[str, np.ndarray] = {
        "header": np.frombuffer(json.dumps(trace.header.to_json()).encode(), dtype=np.uint8),
        "prompt_lens": trace.prompt_lens.astype(np.int32),
        "gen_lens": trace.gen_lens.astype(np.int32),
        "experts": trace.experts,
    }
    if trace.gate_weights is not None:
        arrays["gate_weights"] = trace.gate_weights
    if trace.request_features is not None:
        arrays["request_features"] = trace.request_features.astype(np.float32)
    if trace.prompt_counts is not None:
        arrays["prompt_counts"] = trace.prompt_counts
    return write_npz_atomic(path, arrays, compress)


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray], compress: bool = False) -> Path:
    """Write an .npz through a temporary file and a rename, so a crash never leaves a half-written file."""
    from traces.files import write_atomic

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            (np.savez_compressed if compress else np.savez)(fh, **arrays)

    return write_atomic(path, write)


def is_version(value: Any, expected: int) -> bool:
    """A file header's version is exactly `expected` (JSON `true` equals 1 in Python and is not a version)."""
    return value == expected and not isinstance(value, bool)


@plain_pages()  # a trace's arrays are hundreds of MB: huge-page compaction made a 415 MB load 2.1-4.7 s, not 1.7 s
def read_npz(path: Path, required: set[str], optional: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """The `required` arrays and whichever `optional` ones exist, read from an .npz without unpickling; a
    missing file, a missing array or a damaged archive is one TraceError naming the file and `what` it is."""
    if path.is_dir():
        raise TraceError(f"{what} {path} is a directory")
    if not path.is_file():
        raise TraceError(f"{what} not found: {path}")
    try:
        _check_declared_sizes(path, what)
        with np.load(path, allow_pickle=False) as npz:
            missing = required - set(npz.files)
            if missing:
                raise TraceError(f"{path}: missing array(s) {', '.join(sorted(missing))}")
            return {name: npz[name] for name in (*sorted(required), *optional) if name in npz.files}
    except TraceError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, struct.error, EOFError, OSError, ValueError,
            KeyError, NotImplementedError, RuntimeError, OverflowError) as exc:  # what a damaged archive raises
        noun = what.removesuffix(" file")
        raise TraceError(f"{path}: cannot read {noun} (truncated or not an .npz file: {type(exc).__name__})") from None


def read_npy_header(stream: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) an .npy stream declares, read from its header alone (a few bytes, nothing expanded)."""
    version = np.lib.format.read_magic(stream)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(stream)
    return shape, dtype


class RepeatedKey(ValueError):
    """A JSON object names one key twice (json keeps the last silently)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads` object hook: refuse an object that repeats a key (the last would win without a word)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RepeatedKey(key)
        out[key] = value
    return out


def _check_declared_sizes(path: Path, what: str) -> None:
    """Read each member's .npy header (a few bytes of its stream) and refuse, before anything is expanded, an
    archive whose arrays would exceed the memory limit, or whose declared and stored sizes disagree."""
    if not zipfile.is_zipfile(path):
        raise TraceError(f"{path}: cannot read {what.removesuffix(' file')} (not an .npz archive)")
    total = 0
    with zipfile.ZipFile(path) as archive:
        names = [info.filename for info in archive.infolist()]
        if len(set(names)) != len(names):  # numpy keeps the last of a repeated name, other zip readers the first
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise TraceError(f"{path}: archive member {repeated[0][:60]!r} appears more than once")
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):  # numpy would hand it back as raw bytes, unchecked
                raise TraceError(f"{path}: archive member {info.filename[:60]!r} is not an .npy array")
            with archive.open(info) as stream:
                shape, dtype = read_npy_header(stream)
            if dtype.hasobject:
                raise TraceError(f"{path}: array {info.filename} holds Python objects (refused: never unpickled)")
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes > info.file_size:  # the stored .npy is header + data: it cannot be shorter than its data
                raise TraceError(f"{path}: array {info.filename} declares {nbytes} bytes but stores "
                                 f"{info.file_size} (damaged or crafted archive)")
            total += nbytes
    check_memory(total, f"{what} {path}")


def _parse_header(raw: np.ndarray, path: Path) -> TraceHeader:
    try:
        meta = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"), object_pairs_hook=unique_keys)
    except RepeatedKey as exc:
        raise TraceError(f"{path}: header repeats key {exc.args[0]!r}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError):
        raise TraceError(f"{path}: header is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise TraceError(f"{path}: not a cox-moe routing trace (header format {meta.get('format')!r})"
                         if isinstance(meta, dict) else f"{path}: header is not a JSON object")
    if not is_version(meta.get("version"), FORMAT_VERSION):
        raise TraceError(f"{path}: unsupported trace version {meta.get('version')!r} (this reader: {FORMAT_VERSION})")
    extra = meta.get("extra") or {}
    if not isinstance(extra, dict):
        raise TraceError(f"{path}: header field extra must be a JSON object, got {type(extra).__name__}")
    try:
        return TraceHeader(model=str(meta["model"]), num_layers=meta["num_layers"],
                           num_experts=meta["num_experts"], top_k=meta["top_k"],
                           source=str(meta.get("source", "unknown")), extra=extra)
    except KeyError as exc:
        raise TraceError(f"{path}: header lacks {exc.args[0]}") from None


def trace_summary(path: str | Path) -> tuple[TraceHeader, np.ndarray, np.ndarray]:
    """A trace file's header and length arrays, without reading its routing (a sweep checks its points so; the
    full load still validates the rest when the point runs)."""
    path = Path(path)
    arrays = read_npz(path, {"header", "prompt_lens", "gen_lens"}, (), "trace file")
    return _parse_header(arrays["header"], path), arrays["prompt_lens"], arrays["gen_lens"]


def load_trace(path: str | Path, thorough: bool = True) -> RoutingTrace:
    """Load and validate a v1 trace; any problem is one TraceError naming the file. `thorough=False` skips the
    per-token repeated-expert scan (for a file this tool synthesised and wrote, as the trace cache does)."""
    path = Path(path)
    arrays = read_npz(path, {"header", "prompt_lens", "gen_lens", "experts"},
                      ("gate_weights", "request_features", "prompt_counts"), "trace file")
    header = _parse_header(arrays["header"], path)
    try:
        trace = RoutingTrace(header, arrays["prompt_lens"], arrays["gen_lens"], arrays["experts"],
                             arrays.get("gate_weights"), arrays.get("request_features"), arrays.get("prompt_counts"))
        validate(trace, thorough=thorough)
        return trace
    except TraceError as exc:
        raise TraceError(f"{path}: {str(exc).removeprefix('trace: ')}") from None
