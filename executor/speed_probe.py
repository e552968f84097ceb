"""A quick reading of how fast this machine runs now: a bf16 GEMM's rate and a memory copy's bandwidth.

A profile records one reading before and one after its measurements; a validation takes one before and one
after the plan runs. On a shared VM whose speed drifts between profiling and validating (20-30% within an hour
on the development VMs), the ratio of the two says how much of a validation error is the machine's drift
rather than the cost model's. Nothing is corrected with it: it is reported beside the errors.

Readings themselves are noisy on such VMs (the AMX development VM read 1.51 and 0.74 TFLOP/s one second apart), so
a ratio counts as drift only when it moved by more than both DRIFT_NOTE and the spread between the validation's
own two readings, taken seconds apart around its runs (`spread`): a change inside the machine's short-term noise
is reported as noise. (The profile's two readings are minutes apart: their spread would be drift too.)
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

GEMM_SHAPE = (256, 4096, 4096)  # tokens x hidden x output: an expert-sized bf16 GEMM, 8.6 GFLOP
COPY_BYTES = 64 * 2**20  # out of every cache, small enough to take milliseconds
DRIFT_NOTE = 0.10  # a reading that moved by more than this is worth a line beside the errors


def speed_probe(repeats: int = 5) -> dict[str, float]:
    """This machine now, on the CPU: bf16 GEMM TFLOP/s and copy GB/s (read + write counted), medians of
    `repeats` timed runs after one untimed."""
    m, k, n = GEMM_SHAPE
    x = torch.randn(m, k, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    src = torch.ones(COPY_BYTES // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)

    def median_s(fn) -> float:
        fn()
        times = []
        for _ in range(max(repeats, 1)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    gemm_s = median_s(lambda: torch.nn.functional.linear(x, w))
    copy_s = median_s(lambda: dst.copy_(src))
    return {"gemm_tflops": 2 * m * k * n / gemm_s / 1e12, "copy_gb_s": 2 * COPY_BYTES / copy_s / 1e9}


def mean_reading(readings: list[dict[str, Any]]) -> dict[str, float] | None:
    """The mean of several readings (None when there are none, or a reading lacks a number)."""
    keys = ("gemm_tflops", "copy_gb_s")
    usable = [r for r in readings if isinstance(r, dict) and all(isinstance(r.get(key), int | float)
                                                                 and r[key] > 0 for key in keys)]
    if not usable or len(usable) != len(readings):
        return None
    return {key: statistics.fmean(r[key] for r in usable) for key in keys}


def drift(at_profile: dict[str, float] | None, now: dict[str, float]) -> dict[str, float] | None:
    """Each reading now over the same reading when the profile was measured (None for a profile without one)."""
    if at_profile is None:
        return None
    return {f"{key}_ratio": now[key] / at_profile[key] for key in ("gemm_tflops", "copy_gb_s")}


def describe(ratios: dict[str, float] | None) -> str:
    """'GEMM 0.83x, copy 1.02x of their speed at profiling' (or why there is no comparison)."""
    if ratios is None:
        return "no speed reading in the profile (profiled before readings were recorded)"
    return (f"GEMM {ratios['gemm_tflops_ratio']:.2f}x, copy {ratios['copy_gb_s_ratio']:.2f}x of their speed when "
            "the profile was measured")


def spread(windows: list[list[dict[str, Any] | None]]) -> dict[str, float] | None:
    """The largest relative spread (fastest over slowest reading, minus one) within any one window of readings
    taken close together (a validation's before and after its runs): how far this machine's speed moves by
    itself. None when a window lacks a usable reading."""
    spreads: dict[str, float] = {}
    for window in windows:
        if mean_reading(window) is None:
            return None
        for key in ("gemm_tflops", "copy_gb_s"):
            values = [r[key] for r in window]
            spreads[f"{key}_ratio"] = max(spreads.get(f"{key}_ratio", 0.0), max(values) / min(values) - 1.0)
    return spreads or None


def drifted(ratios: dict[str, float] | None, noise: dict[str, float] | None = None) -> bool:
    """Whether either reading moved since profiling by more than DRIFT_NOTE and more than the readings' own
    spread within a window (`noise`, from `spread`; none known: DRIFT_NOTE alone). Faster or slower alike: the
    move is the larger reading over the smaller, minus one, as a spread is."""
    if ratios is None:
        return False
    return any(max(r, 1.0 / r) - 1.0 > max(DRIFT_NOTE, (noise or {}).get(key, 0.0)) for key, r in ratios.items())


def noisy(noise: dict[str, float] | None) -> bool:
    """Whether the readings within one window already differ by more than DRIFT_NOTE: this machine's speed moves
    too much by itself for a drift since profiling to be told apart."""
    return noise is not None and any(v > DRIFT_NOTE for v in noise.values())

