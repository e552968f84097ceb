"""Numba, where it is installed and not switched off: large traces are drawn (`traces/topk_kernels.py`) and their
decode steps counted (`traces/count_kernels.py`) by compiled kernels; without numba, or for small traces, the numpy
forms run and give the same bytes (tests/test_trace_jit.py compares the two).

The kernels' modules import numba only when first used: importing it and loading the cached kernels costs a
process about 0.3-0.5 s, more than a small trace takes to draw in numpy, so callers ask `worth_it` first.
`COXMOE_JIT=off` (or 0, no, false) keeps the numpy forms; `COXMOE_JIT=on` compiles whatever the size (tests).
Kernels compile on first use (about a second) and are cached on disk next to their module (numba's `cache=True`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any, TypeVar

JIT_ENV = "COXMOE_JIT"
_OFF = frozenset({"off", "0", "no", "false"})
_ON = frozenset({"on", "1", "yes", "true"})
# Draws (routed tokens x layers x top-k) from which a trace is drawn compiled: numba's import and kernel loading
# (0.3-0.5 s a process) are then repaid. Measured by benchmarks/trace_synthesis_speed.py (AMX Xeon dev VM,
# 2026-12-06): compiled draws save 2-3 ns an id on a uniform top-2 trace and 10-14 ns on Zipf 1.0 top-8.
JIT_MIN_DRAWS = 1 << 27

F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def available() -> bool:
    """Whether numba can be imported (found, not imported: the import itself is the cost callers avoid)."""
    return importlib.util.find_spec("numba") is not None


def setting() -> str:
    """$COXMOE_JIT read at each call: 'off', 'on' or 'auto' (anything else)."""
    value = os.environ.get(JIT_ENV, "").strip().lower()
    return "off" if value in _OFF else "on" if value in _ON else "auto"


def worth_it(draws: int) -> bool:
    """Whether a trace of `draws` ids is drawn compiled: numba is there, not switched off, and the trace is
    large enough to repay loading it (or $COXMOE_JIT=on)."""
    mode = setting()
    return available() and mode != "off" and (mode == "on" or draws >= JIT_MIN_DRAWS)


def kernel(fn: F) -> F:
    """`fn` compiled in nopython mode with its machine code cached on disk (imports numba: only kernel modules,
    themselves imported when first used, call this)."""
    import numba

    return numba.njit(cache=True, nogil=True)(fn)
