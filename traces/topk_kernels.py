"""Compiled top-k sampling: `synth._sample_topk`'s draws, repeat checks and redraws in one pass per column and
per redraw round instead of a dozen numpy passes, for the same ids from the same generator words.

The generator is read exactly as the numpy form reads it (`traces.rng_words`): per column, one number per row;
per redraw round, one per repeating row when k <= 4 (written even when it repeats again) or four per row otherwise
(the first not among the row's earlier ids wins); after REDRAW_ROUNDS, the exact float64 draw without the row's ids
(`synth._exclusive_draw`, in numpy). Where the draws come as 32-bit words, the kernels read each id off its word as
the numpy form's uniform shortcut or one-step table does (`_WordTable`); plain float32 numbers (fewer than 16,384
draws), or a table with neither form, take numpy's ids (`_InverseCdf.draw`). Measured by
`benchmarks/trace_synthesis_speed.py`: Qwen3-30B-A3B Zipf 1.0, B=1024, 800/256, 7.8 -> 2.8 s (AMX Xeon dev VM,
2026-12-06, numba's 0.4 s load included); tests/test_trace_jit.py holds the bytes equal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from traces.jit import kernel
from traces.rng_words import words32

if TYPE_CHECKING:
    from traces.synth import _InverseCdf

_NO_WORDS = np.empty(0, dtype=np.uint32)
LINEAR, ONE_STEP = 0, 1  # how the kernels read an id off a word (`_WordTable`)


class _WordTable(NamedTuple):
    """A table's inverse CDF read off 32-bit words: `mode` LINEAR (uniform over 2^bits experts: the word's top
    bits) or ONE_STEP (the entry of the word's bucket, one of `table`'s 2^(32 - shift), is the id or one below it:
    one more when the word's top 24 bits reach `threshold[bucket]`)."""

    mode: int
    table: np.ndarray
    shift: int  # 32 - log2(buckets): a word's bucket is w >> shift
    threshold: np.ndarray


def word_table(table: _InverseCdf) -> _WordTable | None:
    """`table` read off words (its one-step table built here if not yet tried), or None where it has neither form
    (a popularity whose CDF steps lie closer than 2^-16, or one expert: numpy gives the ids)."""
    if table.linear and table.cdf.size > 1:
        return _WordTable(LINEAR, table.guide, _shift(table.cdf.size), _NO_WORDS)
    if not table.one_step_tried:
        table._one_step_table()
    if table.one_step is None:
        return None
    # cdf[entry] <= u = v / 2^24 exactly when ceil(cdf[entry] 2^24) <= v (v = w >> 8 an integer; 2^24 never is)
    scaled = np.ceil(table.cdf.astype(np.float64) * float(1 << 24)).astype(np.uint32)
    return _WordTable(ONE_STEP, table.one_step, _shift(table.one_step_buckets), scaled[table.one_step])


def _shift(buckets: int) -> int:
    """32 - log2(buckets) for a power of two from 2 to 2^16: floor(u buckets) of a word's number is w >> it."""
    return 32 - (buckets.bit_length() - 1)


@kernel
def _id_of(x: int, words: np.ndarray, ids: np.ndarray, mode: int, table: np.ndarray, shift: int,
           threshold: np.ndarray) -> int:
    """The id of draw x: read off word x (LINEAR: its top bits; ONE_STEP: its bucket's entry, plus one where its
    top 24 bits reach the entry's threshold), or ids[x] when no words were read. (The guide table's walk runs in
    numpy, `_draws`: inlined beside these paths, numba's code ran 50x slower.)"""
    if ids.size:
        return np.int64(ids[x])
    w = np.uint32(words[x])
    if mode == LINEAR:  # floor(u E) = w >> (32 - log2 E)
        return np.int64(w >> np.uint32(shift))
    bucket = np.int64(w >> np.uint32(shift))  # floor(u B)
    return np.int64(table[bucket]) + np.int64((w >> np.uint32(8)) >= threshold[bucket])


@kernel
def _fill_column(words: np.ndarray, ids: np.ndarray, mode: int, table: np.ndarray, shift: int, threshold: np.ndarray,
                 cols: np.ndarray, j: int, start: int, rows: int, bad: np.ndarray, hit: np.ndarray) -> int:
    """Column j of rows start .. start + rows from one draw each; rows (0-based within the block) whose id repeats
    one of their earlier columns are listed in `bad`, in order. Returns how many. The repeats are found column
    against column over contiguous rows (`hit`: a scratch flag per row), which vectorises; a scan of each row's
    earlier ids in turn ran at 1-2 ns a comparison."""
    column = cols[j, start:start + rows]
    for r in range(rows):
        column[r] = _id_of(r, words, ids, mode, table, shift, threshold)
    if j == 0:
        return 0
    flags = hit[:rows]
    earlier = cols[0, start:start + rows]
    for r in range(rows):
        flags[r] = earlier[r] == column[r]
    for c in range(1, j):
        earlier = cols[c, start:start + rows]
        for r in range(rows):
            flags[r] |= earlier[r] == column[r]
    count = 0
    for r in range(rows):  # branch-free compaction
        bad[count] = r
        count += np.int64(flags[r])
    return count


@kernel
def _redraw_round(words: np.ndarray, ids: np.ndarray, mode: int, table: np.ndarray, shift: int, threshold: np.ndarray,
                  cols: np.ndarray, j: int, start: int, bad: np.ndarray, count: int, width: int, stamp: np.ndarray,
                  epoch: int) -> int:
    """One redraw round for the `count` repeating rows in `bad`: row i reads draws i * width .. i * width + width
    - 1 and takes the first not among its earlier columns (width 1: its one draw, kept even if it repeats). The
    rows still repeating move to the front of `bad`, in order; returns how many. A row's earlier ids are stamped
    with `epoch + i` in `stamp` (one entry per expert, never cleared: each row's stamp is new), so each candidate
    costs one look-up."""
    left = 0
    for i in range(count):
        r = bad[i]
        row = start + r
        mark = epoch + i
        for p in range(j):
            stamp[cols[p, row]] = mark
        found = False
        for c in range(width):
            idx = _id_of(i * width + c, words, ids, mode, table, shift, threshold)
            repeats = stamp[idx] == mark
            if width == 1:
                cols[j, row] = idx
            if not repeats:
                cols[j, row] = idx
                found = True
                break
        if not found:
            bad[left] = r
            left += 1
    return left


def _draws(rng: np.random.Generator, table: _InverseCdf, form: _WordTable | None, n: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """(words, ids) of n draws, consumed as `rng.random(n, dtype=np.float32)` would: the words when they can be
    read (`words32`) and the kernels read ids off them, else no words and the ids numpy gives (`table.draw`)."""
    if form is not None:
        words = words32(rng, n)
        if words is not None:
            return words, table.guide[:0]
    return _NO_WORDS, table.draw(rng, n)


def sample_topk(rng: np.random.Generator, table: _InverseCdf, n: int, k: int, chunk: int, cols: np.ndarray,
                rounds: int, exclusive) -> None:
    """`synth._sample_topk` into `cols` [k, n] (C-contiguous): k <= 4 in one block of n rows with one redraw per
    repeating row and round, larger k in blocks of `chunk` rows with four; `exclusive(rng, probs, earlier_ids)` is
    the exact draw for rows still repeating after `rounds` rounds."""
    form = word_table(table)
    args = form if form is not None else (LINEAR, table.guide, 0, _NO_WORDS)  # unused: ids come from numpy
    block, width = (n, 1) if k <= 4 else (chunk, 4)
    bad = np.empty(min(block, n), dtype=np.int64)
    hit = np.empty(min(block, n), dtype=np.bool_)
    stamp = np.zeros(table.cdf.size, dtype=np.int64)  # per expert: the redraw row whose earlier ids hold it
    epoch = 1
    for start in range(0, n, max(block, 1)):
        rows = min(block, n - start)
        for j in range(k):
            words, ids = _draws(rng, table, form, rows)
            count = _fill_column(words, ids, *args, cols, j, start, rows, bad, hit)
            for _ in range(rounds):
                if not count:
                    break
                words, ids = _draws(rng, table, form, count * width)
                left = _redraw_round(words, ids, *args, cols, j, start, bad, count, width, stamp, epoch)
                epoch += count
                count = left
            if count:
                at = start + bad[:count]
                cols[j, at] = exclusive(rng, table.probs, cols[:j, at].T)
