"""Compiled count tables: `RoutingTrace.decode_step_counts` in one pass over the decode rows (request by request,
each row's layers and top-k ids added into its (step, group) entry), where numpy gathers, sorts and bincounts them
in bands; and synthesis's per-request prompt counts (`synth._PromptCounts`) a layer at a time, where numpy builds a
key per id and bincounts them. Same integers, so the same tables; used for traces large enough to repay loading
numba (`traces.jit`).
"""

from __future__ import annotations

import numpy as np

from traces.jit import kernel


@kernel
def _add_decode_rows(experts: np.ndarray, first_rows: np.ndarray, steps: np.ndarray, groups: np.ndarray,
                     num_groups: int, out: np.ndarray) -> None:
    """out[(t - 1) * G + g, layer, e] += 1 for each decode step t of each listed request (its rows first_rows[i],
    first_rows[i] + 1, ... for steps[i] steps) in group groups[i], for each layer and each of its top-k ids e."""
    layers, k = experts.shape[1], experts.shape[2]
    for i in range(first_rows.size):
        g = groups[i]
        row = first_rows[i]
        for t in range(steps[i]):
            table = out[t * num_groups + g]
            ids = experts[row + t]
            for layer in range(layers):
                for c in range(k):
                    table[layer, ids[layer, c]] += 1


def decode_step_table(experts: np.ndarray, first_rows: np.ndarray, steps: np.ndarray, groups: np.ndarray,
                      num_groups: int, out: np.ndarray) -> None:
    """Add every listed request's decode rows into `out` [S * G, L, E] (see `_add_decode_rows`); `experts` is the
    trace's [rows, L, k] ids, read as they lie where they are C-ordered in native byte order (a trace file may
    hold big-endian ids, which numba does not take: copied first)."""
    native = np.ascontiguousarray(experts, dtype=experts.dtype.newbyteorder("="))
    _add_decode_rows(native, first_rows.astype(np.int64), steps.astype(np.int64), groups.astype(np.int64),
                     num_groups, out)


@kernel
def _add_prompt_rows(ids: np.ndarray, starts: np.ndarray, lens: np.ndarray, layer: int, table: np.ndarray) -> None:
    """table[r, layer, e] += 1 for each of request r's prompt rows (rows starts[r] .. starts[r] + lens[r] - 1 of
    `ids` [k, rows]) and each of its top-k ids e."""
    k = ids.shape[0]
    for r in range(starts.size):
        first, last = starts[r], starts[r] + lens[r]
        counts = table[r, layer]
        for c in range(k):
            column = ids[c]
            for i in range(first, last):
                counts[column[i]] += 1


def add_prompt_counts(ids: np.ndarray, starts: np.ndarray, lens: np.ndarray, layer: int, table: np.ndarray) -> None:
    """Count one layer's prompt rows into `table` [R, L, E] (see `_add_prompt_rows`); `ids` [rows, k] as synthesis
    draws them (a transposed [k, rows] block: read in place), any other layout or byte order copied to that form
    first. The ids must lie in 0..E-1, as a synthesis's draws do: the kernel does not bound them."""
    by_column = np.ascontiguousarray(ids.T, dtype=ids.dtype.newbyteorder("="))  # no copy when already so
    _add_prompt_rows(by_column, starts, lens, layer, table)
