"""Learned framework factors: fit on a declared training subset, report on the systems left out.

Each runtime (a framework: one implementation of a policy, `ValidationPoint.runtime`) gets, per machine parts
(GPU and CPU presets) it has training points on, a GPU time factor (one runtime's kernels sit at different
distances from the roofline on different parts) and, where it runs attention on the CPU with a kernel no
microbenchmark measured, a CPU time factor (`sim.cost.framework`); on parts it has no training point on, its
factors pooled over all its training points. The GPU factor is fitted on the training points without such CPU
attention, then the CPU factor on the others with the GPU factor fixed; each as the root of the mean log ratio
of predicted to measured total time over the log factor (Illinois regula falsi: the ratio grows with the factor,
so a few engine runs suffice). Only the simulation engine re-runs: the plans (and their searched knobs) stay as
the published-knob run chose.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sim.api import simulate_plan
from sim.cost import RooflineCostModel
from sim.cost.framework import FrameworkCostModel, FrameworkFactors
from sim.plan import Plan

# Factors searched between 1 and 10: below 1 an op would run faster than its unit's achievable rates and draw more
# than a resource's capacity (`FrameworkFactors`); a runtime the model already prices too slowly keeps 1.
LOG_RANGE = (0.0, math.log(10.0))
TOLERANCE = 0.005  # on the mean log ratio: about 0.5% in time
MAX_RUNS = 12


@dataclass
class FitCase:
    """One training or test point: its plan, measured total time, and whether it runs CPU attention with a
    kernel no microbenchmark measured (MoE-Lightning's was: the S2 presets come from it)."""

    id: str
    system: str
    runtime: str
    plan: Plan
    measured_total_s: float
    cpu_attention: bool


    @property
    def parts(self) -> str:
        """The machine's parts (GPU and CPU presets): factors are per runtime and parts, and two systems built
        from the same parts (FlexGen's and MoE-Lightning's GCP T4 VMs) share them."""
        return f"{self.plan.system.gpu.name}+{self.plan.system.cpu.name}"


def predicted_total_s(case: FitCase, factors: FrameworkFactors) -> float:
    cost = FrameworkCostModel(RooflineCostModel(case.plan.system), factors)
    _, metrics = simulate_plan(case.plan, cost)
    return float(metrics["total_s"])


def _root(f: Callable[[float], float], lo: float, hi: float) -> float:
    """x in [lo, hi] where the increasing function f crosses 0 (an end of the range if it never does)."""
    f_lo, f_hi = f(lo), f(hi)
    if f_lo >= 0:
        return lo
    if f_hi <= 0:
        return hi
    side = 0
    x = lo
    for _ in range(MAX_RUNS):
        x = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        fx = f(x)
        if abs(fx) < TOLERANCE:
            break
        if fx > 0:
            hi, f_hi = x, fx
            if side == 1:
                f_lo /= 2
            side = 1
        else:
            lo, f_lo = x, fx
            if side == -1:
                f_hi /= 2
            side = -1
    return x


def _mean_log_ratio(cases: list[FitCase], factors: FrameworkFactors) -> float:
    return sum(math.log(predicted_total_s(c, factors) / c.measured_total_s) for c in cases) / len(cases)


def fit_factors(cases: list[FitCase]) -> FrameworkFactors:
    """A runtime's factors from its training cases (one framework): the GPU factor on the cases without unmeasured
    CPU attention, then the CPU factor on those with it. With only one kind of case there is one factor to fit: the
    GPU factor, on all of them, and the CPU factor stays 1."""
    plain = [c for c in cases if not c.cpu_attention]
    with_cpu = [c for c in cases if c.cpu_attention]
    gpu = math.exp(_root(lambda x: _mean_log_ratio(plain or cases, FrameworkFactors(math.exp(x))), *LOG_RANGE))
    if not plain or not with_cpu:
        return FrameworkFactors(gpu)
    cpu = math.exp(_root(lambda x: _mean_log_ratio(with_cpu, FrameworkFactors(gpu, math.exp(x))), *LOG_RANGE))
    return FrameworkFactors(gpu, cpu)
