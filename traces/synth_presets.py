"""Synthesis presets tuned to published routing statistics (see `../shared/data/README.md` for the facts).

Each preset names a model and sets the popularity (a measured table, or a Zipf alpha solved for a published
skew figure) and the per-layer reuse probability solved for a published first-choice repeat rate. The solving
is closed-form or a bisection on the routing statistic itself, never on an end-to-end throughput.
`experiments/synth_presets_table.py` shows how close each preset lands (through `trace_stats`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from traces.errors import TraceError
from traces.synth import SynthConfig, popularity_matrix


def reuse_for_same_top1(probs: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-layer reuse probability p that gives P(first choice repeats) = target. A fresh draw repeats by chance
    with c = sum(probs^2) (the first column is drawn from probs), so target = p + (1 - p) c."""
    chance = (probs**2).sum(axis=1)
    return np.clip((np.asarray(target, dtype=np.float64) - chance) / (1.0 - chance), 0.0, 1.0)


def zipf_weights(num_experts: int, alpha: float) -> np.ndarray:
    w = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** alpha
    return w / w.sum()


def coverage_share(probs: np.ndarray, mass: float) -> float:
    """Smallest share of experts whose popularity sums to at least `mass`."""
    cum = np.cumsum(np.sort(probs)[::-1])
    return float((np.searchsorted(cum, mass - 1e-12) + 1) / probs.size)


def selection_share(weights: np.ndarray, top_k: int, tokens: int = 20_000, seed: int = 0) -> np.ndarray:
    """Share of top-k selections per expert when each token draws k distinct experts from `weights` (flatter than
    the weights: the hottest can be picked once per token). Monte Carlo with the generator's own sampler."""
    from traces.synth import _InverseCdf, _sample_topk

    ids = _sample_topk(np.random.default_rng(seed), _InverseCdf(weights), tokens, top_k, weights.size,
                       np.dtype(np.uint16))
    return np.bincount(ids.ravel(), minlength=weights.size) / ids.size


def solve_zipf_alpha(num_experts: int, top_k: int, statistic, target: float, lo: float = 0.0,
                     hi: float = 4.0) -> float:
    """Bisection for the alpha at which `statistic` of the top-k selection shares of Zipf(alpha) meets `target`;
    the statistic must be monotone in alpha (coverage falls, hottest share rises). Common random numbers (one
    seed) keep the Monte Carlo estimate monotone enough for bisection."""

    def stat(alpha: float) -> float:
        return statistic(selection_share(zipf_weights(num_experts, alpha), top_k))

    f_lo = stat(lo) - target
    for _ in range(30):
        mid = (lo + hi) / 2
        if (stat(mid) - target) * f_lo > 0:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2, 4)


@dataclass(frozen=True)
class SynthPreset:
    """A model's synthesis settings and the published figures they target (name -> value, with sources)."""

    model: str
    routing: str
    same_top1: tuple[float, ...]        # target first-choice repeat rate per MoE layer
    targets: dict[str, float] = field(default_factory=dict)
    sources: str = ""

    def config(self, num_layers: int, num_experts: int, top_k: int, seed: int = 0, **extra) -> SynthConfig:
        """A SynthConfig with the per-layer reuse solved for this preset's repeat-rate targets."""
        if len(self.same_top1) != num_layers:
            raise TraceError(f"preset {self.model}: {len(self.same_top1)} layer targets, model has {num_layers}")
        probs = popularity_matrix(self.routing, num_layers, num_experts, seed, top_k)
        reuse = reuse_for_same_top1(probs, np.asarray(self.same_top1))
        return SynthConfig(self.model, num_layers, num_experts, top_k, self.routing, seed=seed,
                           reuse_by_layer=tuple(float(r) for r in reuse), **extra)


def _mixtral() -> SynthPreset:
    # Mixtral paper (arXiv 2401.04088, sec. 5): first choice repeats ~14% at layer 0, 27-31% in middle layers.
    # Between the two we ramp linearly over layers 0-8 and hold 0.29 after (an assumption: the paper's figure
    # shows no late-layer drop large enough to model).
    same = tuple(float(v) for v in np.minimum(0.14 + (0.29 - 0.14) * np.arange(32) / 8, 0.29))
    return SynthPreset("mixtral-8x7b", "table:mixtral-8x7b", same,
                       targets={"same_top1_layer0": 0.14, "same_top1_middle": 0.29, "lru_hit_c2": 0.30,
                                "lru_hit_c3": 0.45, "lru_hit_c4": 0.60},
                       sources="popularity: abhibambhaniya/mixtral-offloading-residency-info counts (MIT); "
                               "repeat rate: Mixtral paper sec. 5; LRU hit rates (a check, not a target of the "
                               "solver): Eliseev and Mazur arXiv 2312.17238 Fig. 2")


def _qwen3() -> SynthPreset:
    # About 45-51% of Qwen3-30B-A3B's 128 experts cover 90% of the routing mass: solve alpha for 48%.
    alpha = solve_zipf_alpha(128, 8, lambda p: coverage_share(p, 0.9), 0.48)
    # No published repeat rate for Qwen3; Qwen1.5-MoE's (0.117, from the shipped transition matrix) stands in.
    return SynthPreset("qwen3-30b-a3b", f"zipf:{alpha}", (0.117,) * 48,
                       targets={"coverage90_share": 0.48, "same_top1_mean": 0.117},
                       sources="coverage: shared/data README (Qwen3-30B-A3B samples); repeat rate borrowed from "
                               "Qwen1.5-MoE-A2.7B transitions (Yuelinfeng/mixtral-offloading, MIT)")


def _deepseek_v2_lite() -> SynthPreset:
    # DeepSeek-V3's hottest expert per layer takes 2.4% of 256 (6.2x uniform); we carry that ratio to V2-Lite's 64.
    ratio = 0.024 / (1 / 256)
    alpha = solve_zipf_alpha(64, 6, lambda p: float(p.max()), ratio / 64)
    return SynthPreset("deepseek-v2-lite", f"zipf:{alpha}", (0.117,) * 26,
                       targets={"hottest_share": round(ratio / 64, 4), "same_top1_mean": 0.117},
                       sources="skew: DeepSeek-V3 hottest-expert share (ratio to uniform carried over); repeat "
                               "rate borrowed from Qwen1.5-MoE-A2.7B transitions")


PRESETS = {"mixtral-8x7b": _mixtral, "qwen3-30b-a3b": _qwen3, "deepseek-v2-lite": _deepseek_v2_lite}


def synth_preset(name: str) -> SynthPreset:
    """The preset of that name (built once per process: solving a Zipf exponent draws thousands of samples, 0.1 s,
    and a sweep asks once per point)."""
    if name not in PRESETS:
        raise TraceError(f"unknown synthesis preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return _built(name)


@functools.cache
def _built(name: str) -> SynthPreset:
    return PRESETS[name]()
