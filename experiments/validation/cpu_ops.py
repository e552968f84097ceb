"""CPU expert costs against a published MoE-kernel throughput curve, token count by token count.

Each point of `cpu_ops.yaml` (a routed expert's FFN over M tokens on one Xeon 8452Y socket, in TFLOPS) becomes the
simulator's own expert `Op` on the CPU experts' stream and is priced by `RooflineCostModel`: the preset's peak x
efficiency, its DRAM roof (Intel MLC) and its per-op overhead. Only points below each curve's plateau are held out
(the plateaus set the efficiencies); what they check is the roofline's shape between the DRAM-bound and the
compute-bound ends, where an expert on the CPU runs at 16-256 tokens in CoX-MoE's E_C.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import yaml

from experiments.validation.gpu_ops import held_out_summary
from sim.cost.roofline import RooflineCostModel
from sim.cost.work import OpWork
from sim.plan import Op, OpKind, Phase
from sim.specs import load_model
from sim.specs.catalog import component_preset, system_preset

CPU_OPS_FILE = Path(__file__).with_name("cpu_ops.yaml")
_HOST = "a100-80g-8452y"  # any preset machine: only its CPU is swapped and priced
PLATEAU = 0.95  # a point within this fraction of its curve's top, or past the top, lies on the plateau that set
# the efficiency (stock PyTorch's AMX curve tops at 256 tokens and sags a little after)


def _cost_model(cpu_name: str, isa: str, amx_efficiency: float | None, overlap: float = 1.0) -> RooflineCostModel:
    cpu = dataclasses.replace(component_preset("cpus", cpu_name), gemm_overlap=overlap)
    if isa == "avx512":
        cpu = dataclasses.replace(cpu, has_amx=False)
    elif amx_efficiency is not None:
        cpu = dataclasses.replace(cpu, amx_efficiency=float(amx_efficiency))
    base = system_preset(_HOST)
    return RooflineCostModel(dataclasses.replace(base, name=f"{cpu_name}-{isa}-ops", cpu=cpu))


def check(path: Path = CPU_OPS_FILE) -> pd.DataFrame:
    """One row per published point: measured and predicted seconds of one expert call, their ratio, the binding
    roof, and its role (held out, or on the plateau that set the efficiency)."""
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    model = load_model(data["model"])
    work = OpWork(model)
    rows = []
    for curve in data["curves"]:
        cm = _cost_model(data["cpu"], curve["isa"], curve.get("amx_efficiency"))
        summed = _cost_model(data["cpu"], curve["isa"], curve.get("amx_efficiency"), overlap=0.0)
        top = max(curve["tflops"].values())
        top_tokens = min(int(t) for t, v in curve["tflops"].items() if v == top)
        for tokens, tflops in sorted(curve["tflops"].items()):
            w = work.expert(int(tokens))
            op = Op(id=0, kind=OpKind.EXPERT, stream="cpu_experts", phase=Phase.DECODE, step=1, layer=0,
                    micro_batch=0, tokens=int(tokens), flops=w.flops, bytes=w.bytes)
            rows.append({"set": curve["id"], "kernel": curve["kernel"], "cpu": data["cpu"],
                         "tokens_per_expert": int(tokens), "measured_tflops": float(tflops),
                         "measured_s": w.flops / (float(tflops) * 1e12), "predicted_s": cm.op_time_ns(op) / 1e9,
                         "predicted_no_overlap_s": summed.op_time_ns(op) / 1e9,
                         "bound": cm.bound(op),
                         "role": "plateau (set the efficiency)" if tflops >= PLATEAU * top or int(tokens) >= top_tokens
                         else "held-out",
                         "status": data["status"], "source": data["source"]})
    table = pd.DataFrame(rows)
    ratio = table["measured_s"] / table["predicted_s"]  # simulated / measured rate: > 1, too fast
    table["predicted_tflops"] = table["measured_tflops"] * ratio
    table["ratio"] = ratio
    table["ratio_no_overlap"] = table["measured_s"] / table["predicted_no_overlap_s"]  # with cpu.gemm_overlap 0
    return table


def summary(table: pd.DataFrame) -> dict[str, dict]:
    """Median and worst |predicted / measured - 1| of the held-out points, per curve, and the same median and the
    range with `gemm_overlap` 0."""
    out = held_out_summary(table, "points", lambda row: f"{row['tokens_per_expert']} tokens/expert")
    for name, rows in table[table["role"] == "held-out"].groupby("set", sort=True):
        alt = rows["ratio_no_overlap"]
        out[name]["no_overlap_median_abs_error"] = float((alt - 1).abs().median())
        out[name]["no_overlap_range"] = f"{alt.min():.2f}-{alt.max():.2f}x"
    return out
