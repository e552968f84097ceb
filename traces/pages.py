"""Plain (4 KiB) pages for numpy's large arrays while a trace is synthesised or read from a file.

numpy asks the kernel for transparent huge pages on every array of 4 MiB or more (`madvise(MADV_HUGEPAGE)`).
Where the kernel's THP `defrag` setting is `madvise` (the usual default), a fault in such a region compacts memory
synchronously to find a free 2 MiB page. Synthesis allocates and first touches hundreds of MB (the trace, layer
blocks, per-token bookkeeping), and on the 2-vCPU dev VM (AMD EPYC, 2026-12-04) that compaction took 3.7-4.7 s of
system time in a 9.6-10.0 s Qwen3-30B-A3B B=4096 synthesis; with plain pages, 0.6-1.1 s in 6.1-6.3 s (three
interleaved pairs, same bytes); reading a 415 MB trace (Qwen3 B=1024, every row) took 2.1-4.7 s against 1.0-1.7 s.
numpy's own switch, `NUMPY_MADVISE_HUGEPAGE`, wins when it is set.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


def _setter():
    """numpy's run-time switch (private, numpy >= 1.20: `_set_madvise_hugepage(flag) -> previous flag`), or None."""
    for module in ("_core", "core"):
        multiarray = getattr(getattr(np, module, None), "multiarray", None)
        setter = getattr(multiarray, "_set_madvise_hugepage", None)
        if setter is not None:
            return setter
    return None


_LOCK = threading.Lock()
_DEPTH = 0  # blocks open now, in any thread
_RESTORE: bool | None = None  # numpy's choice when the first of them opened


@contextmanager
def plain_pages() -> Iterator[None]:
    """Within the block, numpy's new arrays do not ask for huge pages; numpy's previous choice comes back when the
    last open block (in any thread) closes. Process-wide while it lasts (another thread's arrays too: only how
    their pages are backed changes)."""
    global _DEPTH, _RESTORE
    setter = None if "NUMPY_MADVISE_HUGEPAGE" in os.environ else _setter()
    if setter is None:
        yield
        return
    with _LOCK:
        if _DEPTH == 0:
            _RESTORE = setter(False)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                setter(bool(_RESTORE))
