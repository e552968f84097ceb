"""Request-length presets from published workload statistics: `--prompt-len preset:NAME`, `--gen-len preset:NAME`.

Each preset is a lognormal (request lengths are right-skewed and positive) whose two parameters are solved in
closed form from two published statistics of the dataset, never from an end-to-end throughput. The sources and
the statistics are kept with the preset; `coxmoe presets --lengths` lists them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from traces.errors import TraceError


@dataclass(frozen=True)
class LengthPreset:
    """A lognormal length distribution (median, sigma, optional cap) and where its two statistics come from."""

    name: str
    median: float
    sigma: float
    cap: int | None
    statistics: str
    source: str

    @property
    def spec(self) -> str:
        """The `lognormal:MEDIAN:SIGMA[:MAX]` form `traces.synth.request_lengths` draws from."""
        tail = f":{self.cap}" if self.cap else ""
        return f"lognormal:{self.median:.4g}:{self.sigma:.4g}{tail}"


def expected_max_z(draws: int) -> float:
    """Expected largest of `draws` standard normals (Blom's approximation: 2.418 for 80 draws against 2.427)."""
    return NormalDist().inv_cdf((draws - 0.375) / (draws + 0.25))


def lognormal_from_mean_and_max(mean: float, maximum: float, draws: int) -> tuple[float, float]:
    """(median, sigma) of the lognormal with this mean whose largest of `draws` samples is `maximum` on the log
    scale (exp of the expected largest log-length): mu + sigma^2 / 2 = ln(mean) and mu + z sigma = ln(maximum),
    the smaller root in sigma. The cap at `maximum` then clips the few draws beyond it."""
    z = expected_max_z(draws)
    gap = math.log(maximum / mean)
    if not 0 < 2 * gap <= z * z:
        raise ValueError(f"no lognormal has mean {mean} and expected maximum {maximum} over {draws} draws")
    sigma = z - math.sqrt(z * z - 2 * gap)
    return math.exp(math.log(mean) - sigma * sigma / 2), sigma


def lognormal_from_mean_and_median(mean: float, median: float) -> tuple[float, float]:
    """(median, sigma) of the lognormal with this mean and median: sigma = sqrt(2 ln(mean / median))."""
    if not mean > median > 0:
        raise ValueError(f"a lognormal's mean exceeds its median: got mean {mean}, median {median}")
    return median, math.sqrt(2 * math.log(mean / median))


def lognormal_from_median_and_quantile(median: float, value: float, quantile: float) -> tuple[float, float]:
    """(median, sigma) of the lognormal with this median whose `quantile` is `value`: sigma = ln(value / median)
    / z(quantile)."""
    if not (0.5 < quantile < 1 and value > median > 0):
        raise ValueError(f"need an upper quantile above the median: got q{quantile} = {value}, median {median}")
    return median, math.log(value / median) / NormalDist().inv_cdf(quantile)


def _mtbench_prompt() -> LengthPreset:
    median, sigma = lognormal_from_mean_and_max(77, 418, 80)
    return LengthPreset(
        "mtbench-prompt", median, sigma, 418,
        "mean 77 tokens; longest of the 80 first-turn questions 418 tokens (the padding length)",
        "MoE-Lightning's artifact (caoshiyi/artifacts@6fef0774 benchmarks/mtbench/launch_server.sh): "
        "'# no-padding ... --avg-prompt-len 77' and '# padding ... --avg-prompt-len 418' for MT-Bench's first "
        "turns under Mixtral-8x7B (418 read as the longest prompt, the length every prompt is padded to); "
        "a vLLM benchmark README gives ~76 for the same 80 prompts with another tokenizer")


_SARATHI = ("Sarathi-Serve (OSDI'24, arXiv 2403.02310) Table 2, openchat_sharegpt4 (ShareGPT conversations, "
            "requests over 8192 tokens in all dropped), read through a transcription of the paper, not the PDF; "
            "capped at 8192 here (about 5% of prompts clip to it, where the source dropped such requests)")


def _sharegpt4(part: str, median: float, p90: float, cap: int | None) -> LengthPreset:
    median, sigma = lognormal_from_median_and_quantile(median, p90, 0.9)
    return LengthPreset(f"sharegpt4-{part}", median, sigma, cap,
                        f"{part} tokens: median {median:g}, 90th percentile {p90:g}", _SARATHI)


PRESETS: dict[str, LengthPreset] = {p.name: p for p in (
    _mtbench_prompt(),
    _sharegpt4("prompt", 1730, 5696, 8192),
    _sharegpt4("output", 415, 834, 8192),
)}


def length_preset(name: str, what: str = "length") -> LengthPreset:
    """The preset called `name`; an unknown name is a one-line error listing the known ones."""
    preset = PRESETS.get(name)
    if preset is None:
        raise TraceError(f"{what}: unknown length preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return preset
