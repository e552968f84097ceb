"""Synthetic routing traces: per-layer popularity (uniform, Zipf, or a measured table) plus expert reuse.

Each routed token draws its top-k experts without replacement from its layer's popularity vector; with
probability `reuse_prob` it instead repeats the previous token's experts (same request, same layer), which
models the temporal locality measured on real MoE models. Everything is vectorised numpy, seeded.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from traces import jit
from traces.errors import TraceError
from traces.format import RoutingTrace, TraceHeader, count_dtype, expert_dtype, narrowed, request_groups
from traces.limits import MAX_LENGTH, check_experts, check_memory
from traces.pages import plain_pages
from traces.rng_words import random_f32, words32

DATA_DIR = Path(__file__).with_name("data")
POPULARITY_TABLES = {"mixtral-8x7b": DATA_DIR / "mixtral-8x7b_expert_frequencies.npy"}


def popularity_table(name: str) -> np.ndarray:
    """A measured popularity table [layers, experts] (rows sum to 1): a shipped one by name, or a count table
    file (.npy or CSV, as `trace import --format counts` reads)."""
    if name in POPULARITY_TABLES:
        table = np.load(POPULARITY_TABLES[name], allow_pickle=False).astype(np.float64)
    elif Path(name).suffix in (".npy", ".csv"):
        from traces.importers import read_count_table

        table = read_count_table(name).astype(np.float64)
        if (table.sum(axis=1) <= 0).any():
            raise TraceError(f"{name}: a layer has no selections")
    else:
        raise TraceError(f"unknown popularity table {name!r}; choose from {', '.join(sorted(POPULARITY_TABLES))} "
                         "or give a .npy/.csv count table")
    return table / table.sum(axis=1, keepdims=True)


def popularity_matrix(spec: str, num_layers: int, num_experts: int, seed: int, top_k: int = 1) -> np.ndarray:
    """Per-layer draw weights [L, E] from 'uniform', 'zipf:ALPHA' (the Zipf weights themselves) or 'table:NAME' (a
    measured table counts selections: weights whose top_k draws without replacement select each expert with its
    measured share, `traces.selection.draw_weights`)."""
    kind, _, arg = spec.partition(":")
    if kind == "uniform" and not arg:
        return np.full((num_layers, num_experts), 1.0 / num_experts)
    if kind == "zipf":
        alpha = _zipf_alpha(spec, arg)
        rng = np.random.default_rng([seed, 0x5A1F])
        with np.errstate(over="ignore"):  # a huge alpha: rank**alpha is inf, its weight 0 (the check below names it)
            weights = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** alpha
        rows = [weights[rng.permutation(num_experts)] for _ in range(num_layers)]
        probs = np.stack(rows)
        return probs / probs.sum(axis=1, keepdims=True)
    if kind == "table":
        from traces.selection import draw_weights

        return draw_weights(_table_for(arg, num_layers, num_experts), top_k)
    raise TraceError(f"unknown routing {spec!r}; use uniform, zipf:ALPHA or table:NAME")


def check_routing(spec: str, num_layers: int, num_experts: int) -> None:
    """Refuse a routing `popularity_matrix` would refuse (an unknown kind, a bad Zipf exponent, a count table that
    cannot be read or has another shape), without solving its draw weights: a sweep checks every point so."""
    kind, _, arg = spec.partition(":")
    if kind == "uniform" and not arg:
        return
    if kind == "zipf":
        _zipf_alpha(spec, arg)
    elif kind == "table":
        _table_for(arg, num_layers, num_experts)
    else:
        raise TraceError(f"unknown routing {spec!r}; use uniform, zipf:ALPHA or table:NAME")


def _zipf_alpha(spec: str, arg: str) -> float:
    try:
        alpha = float(arg)
    except ValueError:
        raise TraceError(f"routing {spec!r}: zipf needs a number, e.g. zipf:1.2") from None
    if not np.isfinite(alpha) or alpha < 0:
        raise TraceError(f"routing {spec!r}: zipf alpha must be >= 0")
    return alpha


def _table_for(name: str, num_layers: int, num_experts: int) -> np.ndarray:
    """A popularity table's first `num_layers` rows (a model cut to its first layers takes them), checked against
    the model's shape."""
    table = popularity_table(name)
    if table.shape[1] != num_experts or table.shape[0] < num_layers:
        raise TraceError(f"popularity table {name} is {table.shape[0]} layers x {table.shape[1]} experts; "
                         f"the model has {num_layers} MoE layers x {num_experts} experts")
    return table[:num_layers]


LENGTH_STREAM = 0x1E46  # seeds the per-request length draws apart from the routing's stream


def workload_lengths(prompt_len: str | int, gen_len: str | int, count: int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and generation lengths of `count` requests drawn from `seed`'s length stream: what `simulate`
    draws for a point without a trace and `trace gen` stores, so a saved trace gives the same workload."""
    rng = np.random.default_rng([seed, LENGTH_STREAM])
    return (request_lengths(prompt_len, count, rng, "--prompt-len"),
            request_lengths(gen_len, count, rng, "--gen-len"))


def request_lengths(spec: str | int, count: int, rng: np.random.Generator, what: str) -> np.ndarray:
    """Lengths for `count` requests: N, 'fixed:N', 'uniform:LO:HI', 'lognormal:MEDIAN:SIGMA[:MAX]' or
    'preset:NAME' (a published workload's lognormal, `traces.length_presets`)."""
    text = str(spec)
    parts = text.split(":")
    if parts[0] == "preset":
        from traces.length_presets import length_preset

        if len(parts) != 2:
            raise TraceError(f"{what} {text!r}: use preset:NAME")
        return request_lengths(length_preset(parts[1], f"{what} {text!r}").spec, count, rng, what)

    def length(raw: str, name: str) -> int:
        value = int(raw)
        if not 1 <= value <= MAX_LENGTH:
            raise TraceError(f"{what} {text!r}: {name} must be in [1, {MAX_LENGTH:,}], got {value:,}")
        return value

    try:
        if len(parts) == 1 or parts[0] == "fixed":
            value = length(parts[-1], "the length")
            lens = np.full(count, value, dtype=np.int64)
        elif parts[0] == "uniform" and len(parts) == 3:
            lo, hi = length(parts[1], "LO"), length(parts[2], "HI")
            if hi < lo:
                raise TraceError(f"{what} {text!r}: HI must be >= LO")
            lens = rng.integers(lo, hi + 1, size=count)
        elif parts[0] == "lognormal" and len(parts) in (3, 4):
            median, sigma = float(parts[1]), float(parts[2])
            if not (np.isfinite(median) and 0 < median <= MAX_LENGTH and np.isfinite(sigma) and 0 <= sigma <= 10):
                # a median past any request's length, or a spread past e^10 per sigma, would be clipped silently
                raise TraceError(f"{what} {text!r}: MEDIAN must be in (0, {MAX_LENGTH:,}] and SIGMA in [0, 10]")
            cap = length(parts[3], "MAX") if len(parts) == 4 else MAX_LENGTH
            if cap < median:  # at least half the requests would be clipped to MAX, silently
                raise TraceError(f"{what} {text!r}: MAX must be >= MEDIAN")
            with np.errstate(over="ignore"):  # exp of a far tail is inf and clips to MAX: not worth a warning line
                draws = np.rint(median * np.exp(sigma * rng.standard_normal(count)))
            lens = np.clip(draws, 1, cap).astype(np.int64)
        else:
            raise TraceError(f"{what} {text!r}: use N, fixed:N, uniform:LO:HI, lognormal:MEDIAN:SIGMA[:MAX] or "
                             "preset:NAME")
    except TraceError:
        raise
    except ValueError:
        raise TraceError(f"{what} {text!r}: not a number") from None
    if lens.size and int(lens.min()) < 1:
        raise TraceError(f"{what} must be >= 1, got {int(lens.min())}")
    return lens.astype(np.int32)


ONE_STEP_BUCKETS_MAX = 1 << 16  # the finest one-step guide table (64 K entries stay in cache)
ONE_STEP_MIN_DRAWS = 16_384  # built on the first call with this many draws: fewer do not repay its cost


class _InverseCdf:
    """Inverse-CDF sampling with a guide table (Chen and Asau): one table look-up plus rare fix-up steps,
    several times faster than a binary search for millions of draws. Uniform popularity over a power-of-two
    number of experts has its CDF steps at exact float32 multiples of 1/E, so there the id is floor(u E): the
    same ids, about ten times faster. Otherwise, where a power-of-two table of at most 2^16 buckets holds at
    most one CDF step per bucket, one look-up and one comparison give the id the guide table and its fix-ups
    give (the first with cdf > u): Zipf 1.0 over 128 experts 11.2 -> 7.6 ns an id (AMX Xeon dev VM,
    2026-12-03)."""

    def __init__(self, probs: np.ndarray):
        self.probs = np.asarray(probs, dtype=np.float64) / float(np.sum(probs))  # exact, for the fallback
        cdf = np.cumsum(probs, dtype=np.float64)
        cdf = (cdf / cdf[-1]).astype(np.float32)
        cdf[-1] = 1.0  # draws are < 1, so every index stays below the number of experts
        self.cdf = cdf
        # a power of two: u * buckets is then exact in float32, so a draw's bucket never lies past its id (a
        # size like 1200, for 300 experts, rounded 21 of the 2^24 float32 draws one id too high)
        self.buckets = 1 << (max(1024, 4 * cdf.size) - 1).bit_length()
        edges = np.arange(self.buckets, dtype=np.float32) / np.float32(self.buckets)
        self.guide = np.searchsorted(cdf, edges, side="right").astype(expert_dtype(cdf.size))
        size = cdf.size
        steps = np.arange(1, size + 1, dtype=np.float64) / size
        self.linear = size & (size - 1) == 0 and bool((cdf.astype(np.float64) == steps).all())
        self.one_step: np.ndarray | None = None  # guide table of `one_step_buckets` entries, one fix-up at most
        self.one_step_buckets = 0
        self.one_step_tried = self.linear  # a uniform power-of-two table needs none

    def _one_step_table(self) -> None:
        """A power-of-two guide table (at least `buckets`, at most ONE_STEP_BUCKETS_MAX entries) whose every
        bucket (j / B, (j + 1) / B) holds at most one CDF step strictly inside: its entry is then the answer or
        one below it. Power-of-two scaling is exact in float32, so floor(u B) is the bucket u lies in, and the
        entry (the first id with cdf > j / B) is never past the answer. B is the first size whose bucket is no
        wider than the closest two steps; the count of steps per bucket decides (repeated steps, from experts of
        zero popularity, pass only on a bucket edge); no table when B would pass the limit."""
        self.one_step_tried = True
        cdf = self.cdf
        steps = cdf[(cdf > 0) & (cdf < 1)]
        gaps = np.diff(steps)
        closest = float(gaps[gaps > 0].min()) if (gaps > 0).any() else 1.0
        buckets = max(self.buckets, 1 << max(0, math.ceil(math.log2(1.0 / closest))))
        if buckets > ONE_STEP_BUCKETS_MAX:
            return
        lo = np.arange(buckets, dtype=np.float32) / np.float32(buckets)
        hi = np.arange(1, buckets + 1, dtype=np.float32) / np.float32(buckets)
        first = np.searchsorted(cdf, lo, side="right")
        if int((np.searchsorted(cdf, hi, side="left") - first).max()) <= 1:
            self.one_step, self.one_step_buckets = first.astype(self.guide.dtype), buckets

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Ids for n new draws: exactly `self(rng.random(n, dtype=np.float32))`, the numbers read from the
        generator's words (`traces.rng_words`); a power-of-two uniform table takes each word's top bits (floor(u E)
        is w >> (32 - log2 E), as u = (w >> 8) / 2^24)."""
        if self.linear:
            words = words32(rng, n)
            if words is not None:
                bits = self.cdf.size.bit_length() - 1
                if not bits:  # one expert
                    return np.zeros(n, dtype=self.guide.dtype)
                return (words >> np.uint32(32 - bits)).astype(self.guide.dtype)
        return self(random_f32(rng, n))

    def __call__(self, u: np.ndarray) -> np.ndarray:
        if self.linear:  # u * E is exact in float32, and u < (j + 1) / E exactly when floor(u * E) <= j
            return (u * np.float32(self.cdf.size)).astype(self.guide.dtype)
        if not self.one_step_tried and u.size >= ONE_STEP_MIN_DRAWS:
            self._one_step_table()
        if self.one_step is not None:
            idx = self.one_step[(u * np.float32(self.one_step_buckets)).astype(np.int32)]
            idx += self.cdf[idx] <= u
            return idx
        u_scaled = u * np.float32(self.buckets)
        idx = self.guide[u_scaled.astype(np.int32)]
        pending = np.flatnonzero(self.cdf[idx] <= u)
        while pending.size:
            idx[pending] += 1
            pending = pending[self.cdf[idx[pending]] <= u[pending]]
        return idx


REDRAW_ROUNDS = 64  # redraws of a repeated expert before the exact fallback (a skewed table repeats forever)
FALLBACK_BYTES = 1 << 24  # the fallback's [rows, experts] float64 tables, per block


def _exclusive_draw(rng: np.random.Generator, probs: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """One id per row of `chosen` (the ids it already holds), drawn from `probs` without those ids, in float64:
    the exact next step of sampling without replacement, for rows whose redraws keep repeating (a Zipf table
    so skewed that float32 draws reach only its first expert)."""
    out = np.empty(chosen.shape[0], dtype=np.int64)
    rows = max(1, FALLBACK_BYTES // (8 * probs.size))  # 16 MiB a table whatever the number of experts
    for s in range(0, chosen.shape[0], rows):
        block = chosen[s:s + rows].astype(np.int64)
        p = np.broadcast_to(probs, (block.shape[0], probs.size)).copy()
        np.put_along_axis(p, block, 0.0, axis=1)
        cdf = np.cumsum(p, axis=1)
        u = rng.random(block.shape[0]) * cdf[:, -1]
        out[s:s + block.shape[0]] = np.minimum((cdf <= u[:, None]).sum(axis=1), probs.size - 1)
    return out


def _sample_topk(rng: np.random.Generator, draw_ids: _InverseCdf, n: int, k: int, num_experts: int,
                 dtype: np.dtype, chunk: int = 1 << 16, out: np.ndarray | None = None, compiled: bool = False
                 ) -> np.ndarray:
    """k distinct ids per row, drawn one position at a time, redrawing repeats (exact sequential sampling
    without replacement). Small k compares against earlier columns; larger k processes rows in chunks to bound
    memory, checking repeats against the chunk's chosen columns unless popularity is so skewed that most rows redraw
    many times, then against a per-row 'taken' table (an O(1) check; `_compare_columns`). Rows
    still repeating after REDRAW_ROUNDS redraws take the exact float64 draw without their chosen ids (bounded
    time, same law). Returned as [n, k], a view of a column-major block (each position's ids contiguous: the
    draws fill whole columns, and counting and gathering read them as they lie): `out` [k, n] when given (a
    buffer reused from layer to layer), else a new one. `compiled`: by numba's kernels (`traces/topk_kernels.py`),
    the same ids from the same generator words."""
    cols = np.empty((k, n), dtype=dtype) if out is None else out
    if compiled and cols.flags.c_contiguous and cols.shape == (k, n):  # else numpy's own errors and strides
        from traces import topk_kernels  # imports numba: only for a trace worth it (`jit.worth_it`)

        topk_kernels.sample_topk(rng, draw_ids, n, k, chunk, cols, REDRAW_ROUNDS, _exclusive_draw)
        return cols.T
    if k <= 4:
        for j in range(k):
            draw = draw_ids.draw(rng, n)
            if j:
                bad = np.flatnonzero(_collides(cols[:j].T, draw))
                for _ in range(REDRAW_ROUNDS):
                    if not bad.size:
                        break
                    redraw = draw_ids.draw(rng, bad.size)
                    draw[bad] = redraw
                    bad = bad[_collides(cols[:j, bad].T, redraw)]
                if bad.size:
                    draw[bad] = _exclusive_draw(rng, draw_ids.probs, cols[:j, bad].T)
            cols[j] = draw
        return cols.T
    compare = _compare_columns(draw_ids.probs, k)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        _topk_chunk(rng, draw_ids, m, k, num_experts, dtype, by_columns=compare, out=cols[:, s:s + m])
    return cols.T


def _topk_chunk(rng: np.random.Generator, draw_ids: _InverseCdf, m: int, k: int, num_experts: int,
                dtype: np.dtype, by_columns: bool, out: np.ndarray | None = None) -> np.ndarray:
    """One chunk of `_sample_topk`: ids drawn a column at a time; a repeat is redrawn four candidates at a time
    (the first one not taken wins) and, after REDRAW_ROUNDS, drawn exactly without the row's ids. The chosen ids
    are kept as columns [k, m] (written into `out` when given, e.g. a slice of the layer's columns) and returned
    as an [m, k] view. A repeat is found by comparing
    with the row's filled columns (`by_columns`: up to a moderately skewed popularity; ids in the trace's dtype) or in
    a per-row table of taken experts (`_taken_mask`: very skewed popularity, many redraws; int32 indices, as a chunk's
    rows x experts stay below 2^31). Both find the same repeats, so they draw the same ids."""
    chosen = np.empty((k, m), dtype=dtype) if out is None else out
    if by_columns:
        id_dtype = dtype

        def taken(j: int, rows: np.ndarray | None, ids: np.ndarray) -> np.ndarray:
            if rows is None:  # every row: compare whole columns
                return _collides(chosen[:j].T, ids)
            picked = chosen[:j, rows]  # [j, rows]: those rows' chosen ids, against their [rows, 4] candidates
            hit = picked[0][:, None] == ids
            for c in range(1, j):
                hit |= picked[c][:, None] == ids
            return hit
    else:
        id_dtype = np.dtype(np.int32)
        every = np.arange(m, dtype=np.int32)
        is_taken, mark = _taken_mask(m, num_experts)

        def taken(j: int, rows: np.ndarray | None, ids: np.ndarray) -> np.ndarray:
            return is_taken(every if rows is None else rows[:, None], ids)

    for j in range(k):
        draw = draw_ids.draw(rng, m).astype(id_dtype, copy=False)
        if j:
            bad = np.flatnonzero(taken(j, None, draw))
            for _ in range(REDRAW_ROUNDS):
                if not bad.size:
                    break
                cand = draw_ids.draw(rng, bad.size * 4).astype(id_dtype, copy=False)
                cand = cand.reshape(-1, 4)
                free = ~taken(j, bad, cand)
                # the first free candidate of each row (candidates in draw order), by columns: cheaper than
                # any/argmax along a 4-wide axis
                f0, f1, f2, f3 = free.T
                found = f0 | f1 | f2 | f3
                first = np.where(f0, cand[:, 0], np.where(f1, cand[:, 1], np.where(f2, cand[:, 2], cand[:, 3])))
                draw[bad[found]] = first[found]
                bad = bad[~found]
            if bad.size:
                draw[bad] = _exclusive_draw(rng, draw_ids.probs, chosen[:j, bad].T)
        if not by_columns:
            mark(every, draw)
        chosen[j] = draw
    return chosen.T


TAKEN_BYTES_PER_ROW = 1024  # a byte per expert up to this many experts, a bit per expert beyond
# Compare against the chosen columns while the k likeliest experts hold less mass than this. Measured per chunk
# of 65,536 rows (AMX Xeon dev VM, 2026-12-03; E/k = 64/6, 128/8, 160/6, 256/8, Zipf 0.8-3.0): the columns win
# by 1.3-3x up to a top-k mass of about 0.8 (Zipf 1.0 over 128 experts, top-8: 0.5, 2.2x), the two are within
# 10-25% either way from 0.9 on, where most rows redraw many times and the table's O(1) check holds its own.
COMPARE_MAX_TOP_MASS = 0.9


def _compare_columns(probs: np.ndarray, k: int) -> bool:
    """Whether repeats are checked against the row's chosen ids (k contiguous byte columns, cache-resident)
    rather than a per-row table of every expert (a scattered write per draw, out of cache): cheaper unless
    repeats are so likely (a very skewed popularity) that most rows redraw many times. Both give the same ids."""
    return float(np.sort(probs)[-k:].sum()) < COMPARE_MAX_TOP_MASS


def _taken_mask(rows: int, num_experts: int):
    """(is_taken(r, ids), mark(r, ids)) over a per-row set of chosen experts: a byte per (row, expert) read by one
    flat gather when the experts are few (the common case), else a bit per expert packed in 64-bit words."""
    if num_experts <= TAKEN_BYTES_PER_ROW:
        flat = np.zeros(rows * num_experts, dtype=bool)

        def is_taken(r: np.ndarray, ids: np.ndarray) -> np.ndarray:
            return flat[r * num_experts + ids]

        def mark(r: np.ndarray, ids: np.ndarray) -> None:
            flat[r * num_experts + ids] = True

        return is_taken, mark
    one = np.uint64(1)
    taken = np.zeros((rows, (num_experts + 63) // 64), dtype=np.uint64)  # bit e % 64 of word e // 64

    def is_taken_bits(r: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return ((taken[r, ids >> 6] >> (ids & 63).astype(np.uint64)) & one).astype(bool)

    def mark_bits(r: np.ndarray, ids: np.ndarray) -> None:
        taken[r, ids >> 6] |= one << (ids & 63).astype(np.uint64)

    return is_taken_bits, mark_bits


def _collides(earlier: np.ndarray, draw: np.ndarray) -> np.ndarray:
    hit = earlier[:, 0] == draw
    for c in range(1, earlier.shape[1]):
        hit |= earlier[:, c] == draw
    return hit


LAYER_BLOCK_BYTES = 64 << 20  # layers gathered before one write into the [tokens, layers, k] trace ...
LAYER_BLOCK_SHARE = 8  # ... or an eighth of the trace, if that is more: a large trace is written in 8 passes


def layer_block_bytes(trace_bytes: int) -> int:
    """The most a trace of `trace_bytes` gathers in layer blocks before writing them."""
    return max(LAYER_BLOCK_BYTES, trace_bytes // LAYER_BLOCK_SHARE)


class _LayerBlocks:
    """Writes a trace's layers in blocks: a layer's ids fill one k-wide slice of every token's row, so writing
    them one layer at a time streams the whole trace through memory once per layer; a block of layers (at
    most `layer_block_bytes`) goes in with one transposed copy, each token's k ids moved as one element (an
    unsigned integer of their width, else raw bytes): a 2-D transpose instead of a 3-D one with a k-long inner
    loop (about 5x faster for 8 one-byte ids)."""

    def __init__(self, experts: np.ndarray):
        self.experts = experts
        n, layers, k = experts.shape
        size = max(1, min(layers, layer_block_bytes(experts.nbytes) // max(1, n * k * experts.itemsize)))
        self.buffer = np.empty((size, n, k), dtype=experts.dtype) if size > 1 else None
        self.first = 0  # the first layer held in the buffer
        self.held = 0

    def put(self, layer: int, ids: np.ndarray) -> None:
        """Store layer `layer`'s ids [n, k] (layers in order)."""
        if self.buffer is None:
            self.experts[:, layer, :] = ids
            return
        if self.held == len(self.buffer):
            self.flush()
        if not self.held:
            self.first = layer
        self.buffer[self.held] = ids
        self.held += 1

    def flush(self) -> None:
        if self.buffer is None or not self.held:
            return
        n, layers, k = self.experts.shape  # the trace synthesis allocated: C-contiguous
        width = k * self.experts.itemsize
        token = np.dtype(f"u{width}") if width in (1, 2, 4, 8) else np.dtype((np.void, width))
        if n:  # no rows kept: nothing to write
            rows = self.experts.reshape(n, layers * k).view(token)  # [n, layers]: a token's k ids per element
            block = self.buffer[:self.held].reshape(self.held, n * k).view(token)  # [held, n]
            rows[:, self.first:self.first + self.held] = block.T
        self.held = 0


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic trace; same config and seed give the same bytes."""

    model: str
    num_layers: int
    num_experts: int
    top_k: int
    routing: str = "uniform"
    reuse_prob: float = 0.0
    seed: int = 0
    reuse_by_layer: tuple[float, ...] = ()  # per-layer reuse probabilities; overrides reuse_prob when given
    affinity: float = 0.0        # probability a token's experts at layer l+1 follow from its experts at layer l
    topics: int = 0              # latent topics (0: one shared popularity for every request)
    topic_shift: float = 0.5     # share of a topic's popularity that is its own (a permuted copy of the base)
    feature_dim: int = 16        # length of the per-request feature vector of a topic mixture
    feature_noise: float = 0.5   # std of the noise around the topic's centroid (centroids are N(0, I))


def _rank_successors(probs: np.ndarray) -> np.ndarray:
    """successor[l][e]: the expert at layer l+1 with the popularity rank that e has at layer l. Mapping by rank
    keeps each layer's popularity when tokens follow their previous layer's experts."""
    L, E = probs.shape
    order = np.argsort(-probs, axis=1, kind="stable")
    succ = np.empty((max(L - 1, 0), E), dtype=expert_dtype(E))
    for layer in range(L - 1):
        succ[layer, order[layer]] = order[layer + 1]
    return succ


# The topics' average selection share of each expert is corrected to the base's within this (a trace's own
# sampling noise is larger: about 1e-3 per share at 100,000 tokens), in at most this many steps.
TOPIC_SHARE_TOLERANCE = 1e-4
TOPIC_SHARE_STEPS = 30


def _balanced_lean(start: np.ndarray, base: np.ndarray, tol: float = 1e-12, steps: int = 10_000) -> np.ndarray:
    """Z [T, L, E] >= 0 from `start` by Sinkhorn scaling: sum over topics of Z[:, l, e] = 1 for every expert, and
    sum over experts of base[l, e] Z[t, l, e] = 1/T for every topic (each topic leans on an equal share of the
    mass). `start` is floored at a small positive value so the scaling exists."""
    topics = start.shape[0]
    z = np.maximum(start, 1e-6 * start.max(axis=(0, 2), keepdims=True) + 1e-300)
    for _ in range(steps):
        z /= z.sum(axis=0, keepdims=True)
        mass = (z * base[None]).sum(axis=2, keepdims=True)
        if np.abs(mass - 1.0 / topics).max() <= tol:
            break
        z *= (1.0 / topics) / mass
    return z


def topic_mixture(cfg: SynthConfig, base: np.ndarray, requests: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-topic draw weights [T, L, E], request topics [R], request features [R, D]) for a topic mixture.
    Topic t's weights are w * (1 - shift + shift * T * Z_t): each topic leans towards its own experts (Z starts from
    w permuted per (topic, layer)), and Z is scaled (Sinkhorn) so that every expert's lean sums to 1 over the topics
    and every topic leans on 1/T of the mass; so the topics' weights average to w. Selection shares are not linear in
    the weights (top-k draws without replacement; top-1's shares are its weights, so it needs nothing more): for
    top-2 (exact shares in closed form) w starts at the base and is corrected until the topics' average selection
    shares are the base's (within TOPIC_SHARE_TOLERANCE),
    so the aggregate keeps the base's (measured or preset) popularity; beyond top-2 the shares need an integral per
    (topic, layer) and step (40 s for Qwen3's 8 topics x 48 layers), so w is the base and the aggregate comes out
    somewhat flatter (8 topics, shift 0.7: Qwen3's preset, top-8, total variation 0.035 from the base's shares, 90%
    of the mass on 0.51 of the experts instead of 0.48; DeepSeek-V2-Lite's, top-6, 0.011). Features = centroid +
    noise."""
    if cfg.topics < 1:
        raise TraceError(f"topics must be >= 1 for a topic mixture, got {cfg.topics}")
    if not 0.0 <= cfg.topic_shift <= 1.0:
        raise TraceError(f"topic shift must be in [0, 1], got {cfg.topic_shift}")
    if cfg.feature_dim < 1 or cfg.feature_noise < 0:
        raise TraceError("feature dimension must be >= 1 and feature noise >= 0")
    rng = np.random.default_rng([cfg.seed, 0x70C1C])
    L, E = base.shape
    perms = np.stack([np.stack([rng.permutation(E) for _ in range(L)]) for _ in range(cfg.topics)])  # [T, L, E]

    def mix(weights: np.ndarray) -> np.ndarray:
        own = np.take_along_axis(np.broadcast_to(weights, perms.shape), perms, axis=2)
        out = weights[None] * (1.0 - cfg.topic_shift + cfg.topic_shift * cfg.topics * _balanced_lean(own, weights))
        return out / out.sum(axis=2, keepdims=True)  # rounding only: each row sums to 1 by construction

    probs = mix(base)
    if cfg.top_k == 2 and cfg.topics > 1 and cfg.topic_shift > 0:
        from traces.selection import selection_shares

        target, weights = selection_shares(base, cfg.top_k), base
        for _ in range(TOPIC_SHARE_STEPS):
            shares = selection_shares(probs, cfg.top_k).mean(axis=0)
            if np.abs(shares - target).max() <= TOPIC_SHARE_TOLERANCE:
                break
            with np.errstate(divide="ignore", invalid="ignore"):
                weights = np.where(target > 0, weights * target / shares, 0.0)
            weights = weights / weights.sum(axis=1, keepdims=True)
            probs = mix(weights)
    topic_of = rng.integers(cfg.topics, size=requests)
    centroids = rng.standard_normal((cfg.topics, cfg.feature_dim))
    features = centroids[topic_of] + cfg.feature_noise * rng.standard_normal((requests, cfg.feature_dim))
    return probs, topic_of, features.astype(np.float32)


def _draw_layer(cfg: SynthConfig, rng: np.random.Generator, groups: list, probs: np.ndarray, layer: int, n: int,
                dtype: np.dtype, successor: list | None, previous: np.ndarray | None, reuse: np.ndarray,
                first_token: np.ndarray, index: np.ndarray, block: np.ndarray | None = None,
                compiled: bool = False) -> np.ndarray:
    """One layer's expert ids [n, k] for every routed token: fresh top-k draws (per topic; `compiled`: by numba's
    kernels), then cross-layer affinity and within-request reuse, in the order that keeps a seed's bytes. `block`
    [k, n]: where one popularity's draws go (reused across layers)."""
    if len(groups) == 1:
        fresh = _sample_topk(rng, _InverseCdf(probs[layer]), n, cfg.top_k, cfg.num_experts, dtype, out=block,
                             compiled=compiled)
    else:
        fresh = np.empty((n, cfg.top_k), dtype=dtype)
        for probs_t, rows in groups:
            fresh[rows] = _sample_topk(rng, _InverseCdf(probs_t[layer]), rows.size, cfg.top_k, cfg.num_experts,
                                       dtype, compiled=compiled)
    if successor is not None and layer > 0:
        # Cross-layer affinity: some tokens take the rank-matched successors of their previous-layer experts.
        follow = np.flatnonzero(rng.random(n, dtype=np.float32) < np.float32(cfg.affinity))
        fresh[follow] = successor[layer - 1][previous[follow]]
    if reuse[layer] > 0:
        reusing = (rng.random(n, dtype=np.float32) < np.float32(reuse[layer])) & ~first_token
        # Each reusing token copies the latest fresh token before it in the same request.
        source = np.maximum.accumulate(np.where(reusing, 0, index))
        fresh = fresh[source]
    return fresh


@plain_pages()  # hundreds of MB first touched: huge-page compaction would cost a third of the time (traces/pages.py)
def generate_trace(cfg: SynthConfig, prompt_lens: np.ndarray, gen_lens: np.ndarray,
                   progress: bool = False, prompt_counts: bool = False) -> RoutingTrace:
    """Draw a trace for requests with the given lengths (a progress bar per layer when `progress` and a TTY).
    `prompt_counts` keeps the prompts as per-request expert counts and only the generated tokens' rows (the
    simulator's form, `RoutingTrace.prompt_counts`): the same draws, so its decode rows and counts equal the full
    trace's, in about a quarter of the memory at 800 prompt and 256 generated tokens."""
    check_experts(cfg.num_experts, "routing", cfg.top_k)
    if not 0.0 <= cfg.reuse_prob <= 1.0:
        raise TraceError(f"reuse probability must be in [0, 1], got {cfg.reuse_prob}")
    reuse = np.asarray(cfg.reuse_by_layer or [cfg.reuse_prob] * cfg.num_layers, dtype=np.float64)
    if reuse.shape != (cfg.num_layers,) or not ((reuse >= 0) & (reuse <= 1)).all():
        raise TraceError(f"reuse_by_layer needs {cfg.num_layers} probabilities in [0, 1], got {reuse.size}")
    # the popularity tables first ([L, E] float64 and its temporaries; per topic, its permutations, weights and
    # their mixing temporaries): 10^8 layers or 10^9 topics ran out of memory before the trace's own check
    check_memory(cfg.num_layers * cfg.num_experts * 8.0 * (4 + 5 * cfg.topics),
                 f"the popularity tables of {cfg.num_layers:,} layers x {cfg.num_experts:,} experts"
                 + (f" x {cfg.topics:,} topics" if cfg.topics else ""))
    probs = popularity_matrix(cfg.routing, cfg.num_layers, cfg.num_experts, cfg.seed, cfg.top_k)
    if ((probs > 0).sum(axis=1) < cfg.top_k).any():
        raise TraceError(f"routing {cfg.routing!r}: some layer has fewer than top_k={cfg.top_k} experts with "
                         "non-zero probability")
    prompt_lens, gen_lens = np.asarray(prompt_lens), np.asarray(gen_lens)
    if prompt_lens.size == 0 or prompt_lens.min() < 1 or gen_lens.min() < 1:
        raise TraceError("every request needs prompt and generation lengths >= 1")
    if max(int(prompt_lens.max()), int(gen_lens.max())) > MAX_LENGTH:
        raise TraceError(f"request lengths must be at most {MAX_LENGTH:,} tokens, got "
                         f"{max(int(prompt_lens.max()), int(gen_lens.max())):,}")
    prompt_lens = prompt_lens.astype(np.int32)
    gen_lens = gen_lens.astype(np.int32)
    routed = prompt_lens.astype(np.int64) + gen_lens - 1
    n = int(routed.sum())
    itemsize = expert_dtype(cfg.num_experts).itemsize
    rows = int(gen_lens.astype(np.int64).sum()) - gen_lens.size if prompt_counts else n  # rows the trace keeps
    # the trace itself, its layer blocks, two [k, n] draw blocks, per-token bookkeeping (index, flags, draws);
    # prompts as counts: their table (and its narrowed copy, at most half of it) and each row's key base and position
    trace_bytes = rows * cfg.num_layers * cfg.top_k * itemsize
    table_bytes = prompt_lens.size * cfg.num_layers * cfg.num_experts * \
        count_dtype(int(prompt_lens.max()) * cfg.top_k).itemsize if prompt_counts else 0
    check_memory(trace_bytes + min(layer_block_bytes(trace_bytes), trace_bytes) + n * (cfg.top_k * 10 + 16)
                 + (table_bytes + table_bytes // 2 + n * 16 if prompt_counts else 0),
                 f"a routing trace of {n:,} routed tokens x {cfg.num_layers} layers x top-{cfg.top_k}")
    starts = np.concatenate([[0], np.cumsum(routed)[:-1]])
    first_token = np.zeros(n, dtype=bool)
    first_token[starts] = True
    dtype = expert_dtype(cfg.num_experts)
    experts = np.empty((rows, cfg.num_layers, cfg.top_k), dtype=dtype)
    rng = np.random.default_rng([cfg.seed, 0x7ACE])
    index = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    features = None
    if cfg.topics:
        topic_probs, topic_of, features = topic_mixture(cfg, probs, prompt_lens.size)
        token_topic = np.repeat(topic_of, routed)
        groups = [(probs_t, np.flatnonzero(token_topic == t)) for t, probs_t in enumerate(topic_probs)]
    else:
        groups = [(probs, None)]
    if not 0.0 <= cfg.affinity <= 1.0:
        raise TraceError(f"cross-layer affinity must be in [0, 1], got {cfg.affinity}")
    successor = _rank_successors(probs) if cfg.affinity > 0 else None
    layers = tqdm(range(cfg.num_layers), desc="routing layers", unit="layer", disable=None if progress else True,
                  leave=False)
    layers_out = _LayerBlocks(experts)
    previous = None  # the last layer's ids, [n, k]
    # Storing a layer (and counting its prompt rows) runs in a worker thread while the next layer is drawn (numpy's
    # copies and bincount run mostly outside the GIL). One worker keeps the layers in order, and a layer's block is
    # drawn into again two layers later, only after the store of the layer between has been waited for
    # (`stored.result()` before each submit): so the worker never reads a block being overwritten.
    def store(layer: int, fresh: np.ndarray) -> None:
        if counts is None:
            layers_out.put(layer, fresh)
        else:  # count the prompt rows, keep the generated ones
            counts.add(layer, fresh)
            layers_out.put(layer, fresh[counts.decode_idx])

    worker = ThreadPoolExecutor(max_workers=1) if (os.cpu_count() or 1) > 1 else None
    stored = None
    # Two [k, n] blocks the layers' draws alternate in: the worker stores one layer while the next is drawn, and the
    # layer before is the cross-layer affinity's source. A fresh block per layer would be a new mapping of tens of
    # MB each time (past malloc's mmap threshold), every page faulted and zeroed again: Qwen3 B=4096 synthesis
    # 7.0 -> 6.3 s with the blocks reused (plain pages in both).
    blocks = [np.empty((cfg.top_k, n), dtype=dtype) for _ in range(2)] if len(groups) == 1 else [None, None]
    uniform = len(groups) == 1 and _InverseCdf(probs[0]).linear and bool((probs == probs[0]).all())
    compiled = jit.worth_it(n * cfg.num_layers * cfg.top_k, jit.draw_saving_ns(uniform, cfg.top_k))  # traces/jit.py
    counts = _PromptCounts(prompt_lens, gen_lens, cfg.num_layers, cfg.num_experts, cfg.top_k,
                           jit.worth_it(int(prompt_lens.astype(np.int64).sum()) * cfg.num_layers * cfg.top_k,
                                        jit.SAVED_NS_PROMPT_COUNT, paid=compiled)) if prompt_counts else None
    try:
        for layer in layers:
            fresh = _draw_layer(cfg, rng, groups, probs, layer, n, dtype, successor, previous, reuse, first_token,
                                index, blocks[layer % 2], compiled)
            if stored is not None:
                stored.result()
            if worker is None:
                store(layer, fresh)
            else:
                stored = worker.submit(store, layer, fresh)
            previous = fresh
        if stored is not None:
            stored.result()
    finally:
        if worker is not None:
            worker.shutdown(wait=True)
    layers_out.flush()
    header = TraceHeader(model=cfg.model, num_layers=cfg.num_layers, num_experts=cfg.num_experts,
                         top_k=cfg.top_k, source=f"synthetic:{cfg.routing}",
                         extra={"reuse_prob": cfg.reuse_prob, "seed": cfg.seed,
                                **({"reuse_by_layer": [round(float(r), 4) for r in reuse]} if cfg.reuse_by_layer
                                   else {}),
                                **({"affinity": cfg.affinity} if cfg.affinity else {}),
                                **({"topics": cfg.topics, "topic_shift": cfg.topic_shift} if cfg.topics else {})})
    return RoutingTrace(header, prompt_lens, gen_lens, experts, request_features=features,
                        prompt_counts=None if counts is None else narrowed(counts.table))


class _PromptCounts:
    """Per-request prompt counts [R, L, E] gathered layer by layer during synthesis, and the rows (in trace
    order) of the generated tokens the trace keeps. `compiled`: counted by numba's kernel (`traces/count_kernels.py`)
    request by request over its prompt rows, in place. Else requests are counted in groups of about 2^16 prompt
    tokens, each over its requests' contiguous rows: a prompt row's key is its request's bin base plus the expert id,
    a generated row's a spare bin block past the group's (dropped), so no rows are gathered and each bincount's bins
    (the group's requests x experts) stay small; int32 keys halve the temporary. Numpy's key and bincount passes on the
    store thread slowed the drawing beside it: with the kernel, Qwen3-30B-A3B's B=4096 800/256 trace took 7.85 -> 5.79
    s (benchmarks/trace_synthesis_speed.py, AMX Xeon dev VM, 2026-12-06)."""

    GROUP_TOKENS = 1 << 16
    GROUP_BINS = 1 << 22  # and at most this many (request, expert) bins a group: int32 keys, a 32 MiB bincount

    def __init__(self, prompt_lens: np.ndarray, gen_lens: np.ndarray, layers: int, experts: int, top_k: int,
                 compiled: bool = False):
        plens, routed = prompt_lens.astype(np.int64), prompt_lens.astype(np.int64) + gen_lens - 1
        first = np.concatenate([[0], np.cumsum(routed)])  # each request's first row; the last entry: every row
        position = np.arange(int(first[-1]), dtype=np.int64) - np.repeat(first[:-1], routed)  # row within request
        is_prompt = position < np.repeat(plens, routed)
        self.decode_idx = np.flatnonzero(~is_prompt)
        self.experts = experts
        self.table = np.zeros((plens.size, layers, experts), dtype=count_dtype(int(plens.max(initial=0)) * top_k))
        self.compiled = (first[:-1], plens) if compiled else None  # each request's first row and prompt rows
        self.groups = []  # (first request, last request + 1, first row, last row + 1, each row's key base)
        if compiled:  # the kernel counts request by request: no groups
            return
        for lo, hi in request_groups(plens, self.GROUP_TOKENS, max_requests=self.GROUP_BINS // experts):
            a, b = int(first[lo]), int(first[hi])
            base = np.repeat(np.arange(hi - lo, dtype=np.int32) * np.int32(experts), routed[lo:hi])
            base[~is_prompt[a:b]] = (hi - lo) * experts  # generated rows: the spare block
            self.groups.append((lo, hi, a, b, base[:, None]))

    def add(self, layer: int, ids: np.ndarray) -> None:
        """Count layer `layer`'s ids [rows, k] of every routed token into the requests' prompt counts."""
        if self.compiled is not None:
            from traces import count_kernels

            count_kernels.add_prompt_counts(ids, *self.compiled, layer, self.table)
            return
        E = self.experts
        for lo, hi, a, b, base in self.groups:
            keys = np.add(ids[a:b], base, dtype=np.int32)  # laid out as `ids` is (column-major from synthesis)
            counts = np.bincount(keys.ravel(order="K"), minlength=(hi - lo + 1) * E)
            self.table[lo:hi, layer, :] = counts[:(hi - lo) * E].reshape(hi - lo, E)
