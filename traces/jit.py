"""Numba, where it is installed and not switched off: large traces are drawn (`traces/topk_kernels.py`) and their
decode steps counted (`traces/count_kernels.py`) by compiled kernels; without numba, or for small traces, the numpy
forms run and give the same bytes (tests/test_trace_jit.py compares the two); synthesis counts prompts with one
too (`count_kernels.add_prompt_counts`).

The kernels' modules import numba only when first used: importing it and loading the cached kernels costs a
process about 0.4 s, more than a small trace takes to draw in numpy, so callers ask `worth_it` first with what the
kernels save them per id. `COXMOE_JIT=off` (or 0, no, false) keeps the numpy forms; `COXMOE_JIT=on` compiles
whatever the size (tests). Kernels compile on first use (about a second) and are cached on disk next to their
module (numba's `cache=True`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from traces.errors import TraceError

JIT_ENV = "COXMOE_JIT"
_OFF = frozenset({"off", "0", "no", "false"})
_ON = frozenset({"on", "1", "yes", "true"})
# What using the kernels costs a process: numba's import and the first kernels loaded from its disk cache; once numba
# is loaded, a further kernel's load. Measured by benchmarks/trace_synthesis_speed.py (AMX Xeon dev VM, 2026-12-06).
LOAD_S = 0.4
LOADED_S = 0.05
# What the kernels save per id, measured the same way (numpy -> numba, load excluded): drawing a uniform table over
# a power-of-two number of experts 5.2 -> 3.5 ns (Qwen3-30B-A3B top-8), a skewed one with k <= 4 10.0 -> 4.2 ns
# (Mixtral-8x7B's table, top-2) and with k > 4 19 -> 6 ns (Zipf 1.0, Qwen3 top-8 and DeepSeek-V2-Lite top-6);
# counting decode steps 1.4 ns. Counting prompts during synthesis (per prompt id, on the store thread beside the
# draws, whose wall time it stretched): 0.53 (Qwen3 Zipf 1.0) to 1.64 ns (Qwen3 uniform B=4096), the lowest kept.
SAVED_NS_UNIFORM, SAVED_NS_SKEWED_SMALL_K, SAVED_NS_SKEWED, SAVED_NS_COUNT = 1.7, 5.8, 13.0, 1.4
SAVED_NS_PROMPT_COUNT = 0.5

F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def available() -> bool:
    """Whether numba is installed (found, not imported: the import itself is the cost callers avoid)."""
    return importlib.util.find_spec("numba") is not None


@functools.cache
def _import_error() -> str | None:
    """Why numba, though installed, does not import (e.g. a release that refuses this numpy), or None: asked only
    once the kernels are wanted, when the import is paid anyway."""
    try:
        import numba  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure to import means the numpy forms
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def setting() -> str:
    """$COXMOE_JIT read at each call: 'off', 'on' or 'auto' (unset, empty or `auto`); anything else is refused by
    name (a typo would otherwise mean auto without a word)."""
    value = os.environ.get(JIT_ENV, "").strip().lower()
    if value in _OFF:
        return "off"
    if value in _ON:
        return "on"
    if value in ("", "auto"):
        return "auto"
    raise TraceError(f"{JIT_ENV}={os.environ[JIT_ENV]!r}: use on, off or auto")


def worth_it(ids: int, saved_ns_per_id: float, paid: bool = False) -> bool:
    """Whether work over `ids` ids runs compiled: numba is there and imports, it is not switched off, and the time
    the kernels save (`saved_ns_per_id` each) repays loading them: numba's import unless this process has it
    already or `paid` (the caller runs other kernels anyway). With $COXMOE_JIT=on, a numba that is missing or does
    not import is an error, not numpy in silence."""
    mode = setting()
    if mode == "off":
        return False
    if mode == "on":
        if not available():
            raise TraceError(f"{JIT_ENV}=on needs numba, which is not installed")
        if _import_error() is not None:
            raise TraceError(f"{JIT_ENV}=on needs numba, which does not import ({_import_error()})")
        return True
    if not available():
        return False
    cost = LOADED_S if paid or "numba" in sys.modules else LOAD_S
    return ids * saved_ns_per_id * 1e-9 >= cost and _import_error() is None


def draw_saving_ns(uniform: bool, top_k: int) -> float:
    """What the compiled top-k draws save per id (`traces/topk_kernels.py`): a uniform power-of-two table, or a
    skewed one at small or larger k (larger k redraws more, which numpy does in many passes)."""
    return SAVED_NS_UNIFORM if uniform else SAVED_NS_SKEWED_SMALL_K if top_k <= 4 else SAVED_NS_SKEWED


def kernel(fn: F) -> F:
    """`fn` compiled in nopython mode with its machine code cached on disk (imports numba: only kernel modules,
    themselves imported when first used, call this); where numba finds no writable cache directory (a read-only
    install and home), compiled in each process instead."""
    import numba

    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(fn)
