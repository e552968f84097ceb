"""GPU op costs against published per-op timings, shape by shape.

Every measured kernel is turned into the simulator's own `Op` and priced by `RooflineCostModel` on the GPU preset
it ran on, so this checks exactly what a simulation uses: datasheet peak x measured efficiency, the HBM roof and the
per-kernel overhead. Two sources: GEMM sweeps (`gpu_ops.yaml`: LLMCompass's A100 matmuls, M from 64 to 32768 and
N = K from 64 to 32768) and MoE-Lightning's Mixtral MoE FFN kernel on the L4 over micro-batch sizes
(`microbench.yaml`; its smallest micro-batch set the L4's HBM efficiency, so only the others are held out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import yaml

from experiments.validation.microbench import MICROBENCH_FILE, load_microbench
from sim.cost.roofline import RooflineCostModel
from sim.cost.work import OpWork, Work
from sim.plan import Op, OpKind, Phase
from sim.specs import SystemSpec, load_model
from sim.specs.catalog import component_preset, system_preset

GPU_OPS_FILE = Path(__file__).with_name("gpu_ops.yaml")
_HOST = "a100-80g-8452y"  # any preset machine: only its GPU is swapped and priced


def _cost_model(gpu: str) -> RooflineCostModel:
    base: SystemSpec = system_preset(_HOST)
    return RooflineCostModel(dataclasses.replace(base, name=f"{gpu}-ops", gpu=component_preset("gpus", gpu)))


def _gpu_op(kind: OpKind, tokens: int, work: Work) -> Op:
    return Op(id=0, kind=kind, stream="gpu", phase=Phase.PREFILL, step=0, layer=0, micro_batch=0, tokens=tokens,
              flops=work.flops, bytes=work.bytes)


def _gemm_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    rows = []
    for s in data["gemm_sets"]:
        cm = _cost_model(s["gpu"])
        size = int(s["bytes_per_element"])
        for m, n, k, seconds in s["gemms"]:
            op = _gpu_op(OpKind.DENSE_FFN, m, Work(2 * m * n * k, size * (m * k + k * n + m * n)))
            rows.append({"set": s["id"], "gpu": s["gpu"], "op": "gemm", "shape": f"M={m} N={n} K={k}",
                         "measured_s": float(seconds), "predicted_s": cm.op_time_ns(op) / 1e9,
                         "bound": cm.bound(op), "role": "held-out", "source": " ".join(s["source"].split())})
    return rows


def _moe_ffn_rows(path: Path) -> list[dict]:
    """The fused MoE FFN of one Mixtral layer: every expert's tokens of one micro-batch, routed evenly, priced as
    the expert ops a plan runs one after another on the GPU, in one fused call as MoE-Lightning runs them (no
    per-kernel cost per expert: `Plan.expert_kernels`)."""
    data = load_microbench(path)
    model = load_model(data["model"])
    work = OpWork(model)
    cm = _cost_model(system_preset(data["system"]).gpu.name)
    cm.use_model(model)
    cm.use_expert_kernels("fused")
    smallest = min(data["moe_ffn_s"], key=int)
    rows = []
    for micro_batch, seconds in sorted(data["moe_ffn_s"].items(), key=lambda kv: int(kv[0])):
        tokens = int(micro_batch) * model.top_k // model.num_experts
        op = _gpu_op(OpKind.EXPERT, tokens, work.expert(tokens))
        rows.append({"set": "moe-lightning-fig9-l4-ffn", "gpu": cm.topology.streams["gpu"].spec.name,
                     "op": "moe_ffn", "shape": f"micro-batch {micro_batch}, {tokens} tokens x {model.num_experts} "
                     "experts", "measured_s": float(seconds),
                     "predicted_s": model.num_experts * cm.op_time_ns(op) / 1e9, "bound": cm.bound(op),
                     "role": "set hbm_efficiency" if micro_batch == smallest else "held-out",
                     "source": data["source"]})
    return rows


def check(gemm_path: Path = GPU_OPS_FILE, microbench_path: Path = MICROBENCH_FILE) -> pd.DataFrame:
    """One row per measured kernel: measured and predicted seconds, their ratio, the binding roof, its role."""
    table = pd.DataFrame(_gemm_rows(gemm_path) + _moe_ffn_rows(microbench_path))
    table["ratio"] = table["predicted_s"] / table["measured_s"]
    return table


def held_out_summary(table: pd.DataFrame, count: str, describe: Callable[[pd.Series], str]) -> dict[str, dict]:
    """Per set, over its held-out rows: how many (under the key `count`), the median |ratio - 1| and the worst row
    (`describe(row)` and its ratio). Shared by the GPU and the CPU kernel checks."""
    out = {}
    for name, rows in table[table["role"] == "held-out"].groupby("set", sort=True):
        err = (rows["ratio"] - 1).abs()
        worst = rows.loc[err.idxmax()]
        out[name] = {count: len(rows), "median_abs_error": float(err.median()),
                     "worst": f"{describe(worst)} ({worst['ratio']:.2f}x)"}
    return out


def summary(table: pd.DataFrame) -> dict[str, dict]:
    """Median and worst |predicted / measured - 1| of the held-out kernels, per set."""
    return held_out_summary(table, "kernels", lambda row: row["shape"])
