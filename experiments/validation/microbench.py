"""Hardware constants derived from published per-op microbenchmarks (`microbench.yaml`), by least squares.

MoE-Lightning's Fig. 9 times three ops of one Mixtral decode layer on its S2 machine over micro-batch sizes and
context lengths. Each becomes one constant of the `gcp-l4-g2` presets: the KV copy the effective pinned
host-to-device bandwidth, the CPU GQA kernel the KV streaming rate and fixed cost of CPU attention, the MoE FFN
kernel (which reads every expert's weights) the L4's achievable memory bandwidth. `tests/test_validation.py`
checks that the presets hold these derived values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from sim.specs import load_model

MICROBENCH_FILE = Path(__file__).with_name("microbench.yaml")


@dataclass(frozen=True)
class LinearFit:
    """time = bytes / rate + fixed, and the worst relative error of that line over the measured values."""

    bytes_per_s: float
    fixed_s: float
    max_rel_error: float
    points: int


def _fit(nbytes: np.ndarray, seconds: np.ndarray) -> LinearFit:
    (slope, fixed), *_ = np.linalg.lstsq(np.c_[nbytes, np.ones_like(nbytes)], seconds, rcond=None)
    predicted = nbytes * slope + fixed
    return LinearFit(float(1 / slope), float(fixed), float(np.max(np.abs(predicted / seconds - 1))), int(seconds.size))


def load_microbench(path: Path = MICROBENCH_FILE) -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def derive(path: Path = MICROBENCH_FILE) -> dict[str, float | LinearFit]:
    """The constants the Fig. 9 values imply: KV copy and CPU attention line fits, and L4 HBM efficiency."""
    data = load_microbench(path)
    model = load_model(data["model"])
    kv_per_token = model.kv_bytes_per_token_layer
    out: dict[str, float | LinearFit] = {}
    for key in ("kv_transfer_s", "cpu_attention_s"):
        nbytes, seconds = [], []
        for micro_batch, row in data[key].items():
            for ctx, t in zip(data["ctx"], row, strict=True):
                nbytes.append(int(micro_batch) * ctx * kv_per_token)
                seconds.append(t)
        out[key] = _fit(np.asarray(nbytes, float), np.asarray(seconds, float))
    # The smallest micro-batch's FFN is the most purely weight-bound: every expert of the layer is read once.
    expert_bytes = model.num_experts * model.expert_bytes
    smallest = min(data["moe_ffn_s"], key=int)
    out["moe_ffn_hbm_bytes_per_s"] = expert_bytes / data["moe_ffn_s"][smallest]
    return out
