"""Beyond the paper (issue 14): CoX-MoE's neighbours side by side with it, at three expert precisions.

Every design runs its own search on the same model, machine and routing: CoX-MoE, CoX-MoE with one expert's
tokens split between GPU and CPU (`split_tokens`), MoE-Gen (module-based batching, every expert on the GPU),
TriMoE (hot / warm / cold experts on GPU / AMX CPU / DIMM-NDP) and MoE-Lightning as the baseline, each with
routed experts at the model's dtype, INT8 and INT4 (`--expert-precision`). The machine is the paper's A100 +
Xeon 8452Y with eight near-memory DIMMs (`a100-80g-8452y-ndp8`), so TriMoE has its third tier and the other
designs simply leave it idle. The finding names the winner per model and says why from the time breakdown.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from experiments.reproduce import ReproduceOptions, Reproduction
from experiments.reproduce.style import MODEL_LABELS, POLICY_COLORS, paper_style, save_csv, save_figure
from sim.api import simulate
from sim.errors import CapacityError, NoFeasibleConfig

SYSTEM = "a100-80g-8452y-ndp8"
MODELS = {"mixtral-8x7b": "table:mixtral-8x7b", "deepseek-v2-lite": "preset:deepseek-v2-lite",
          "qwen3-30b-a3b": "preset:qwen3-30b-a3b"}
# design -> (policy, options)
DESIGNS = {"coxmoe": ("coxmoe", {}), "coxmoe split": ("coxmoe", {"split_tokens": "on"}),
           "moe-gen": ("moe-gen", {}), "trimoe": ("trimoe", {}), "moe-lightning": ("moe-lightning", {})}
PRECISIONS = ("native", "int8", "int4")
BUSY = ("gpu", "cpu", "cpu_experts", "h2d", "ndp")


def run(options: ReproduceOptions) -> pd.DataFrame:
    if options.quick:
        models, designs, (batch, prompt, gen, sample) = ["mixtral-8x7b"], ["coxmoe", "moe-gen"], (64, 32, 4, 2)
    else:
        models, designs, (batch, prompt, gen, sample) = list(MODELS), list(DESIGNS), (1024, 512, 64, 8)
    jobs = [(m, d, p) for m in models for d in designs for p in PRECISIONS]
    rows = []
    for model, design, precision in tqdm(jobs, desc="beyond", unit="run", disable=None):
        policy, opts = DESIGNS[design]
        row = {"model": model, "design": design, "policy": policy, "precision": precision, "batch": batch,
               "prompt_len": prompt, "gen_len": gen, "system": options.system(SYSTEM).name}
        try:
            r = simulate(model, SYSTEM, policy, batch=batch, prompt_len=prompt, gen_len=gen, routing=MODELS[model],
                         seed=options.seed, decode_sample=sample, policy_options=opts, expert_precision=precision,
                         system_settings=options.settings)
        except (CapacityError, NoFeasibleConfig) as exc:
            rows.append({**row, "throughput_tok_s": np.nan, "note": str(exc).split(";")[0]})
            continue
        busy = {f"busy_{k}_s": r.busy_s.get(k, 0.0) for k in BUSY}
        rows.append({**row, "throughput_tok_s": r.throughput_tok_s, "prefill_s": r.prefill_s,
                     "decode_s": r.decode_s, "total_s": r.total_s, **busy,
                     "resident_experts": r.knobs.get("resident_experts"), "peak_gpu_gib": r.peak_gpu_bytes / 2**30,
                     "note": ""})
    table = pd.DataFrame(rows)
    base = table[(table["design"] == "coxmoe") & (table["precision"] == "native")].set_index("model")
    table["vs_coxmoe_native"] = table["throughput_tok_s"] / table["model"].map(base["throughput_tok_s"])
    return table


def plot(table: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    models = list(dict.fromkeys(table["model"]))
    designs = list(dict.fromkeys(table["design"]))
    hatches = {"native": "", "int8": "//", "int4": ".."}
    with paper_style():
        fig, axes = plt.subplots(1, len(models), figsize=(2.5 * len(models) + 0.8, 2.6), squeeze=False)
        width = 0.8 / len(PRECISIONS)
        for k, (ax, model) in enumerate(zip(axes[0], models, strict=True)):
            sub = table[table["model"] == model]
            # ratios to CoX-MoE native where it ran; its throughput in tok/s where it did not (no ratio to draw)
            ratio = bool(np.isfinite(sub["vs_coxmoe_native"].astype(float)).any())
            column = "vs_coxmoe_native" if ratio else "throughput_tok_s"
            for i, design in enumerate(designs):
                for j, precision in enumerate(PRECISIONS):
                    v = sub[(sub["design"] == design) & (sub["precision"] == precision)][column]
                    if not len(v):
                        continue
                    color = POLICY_COLORS[DESIGNS[design][0]]
                    if not np.isfinite(v.iloc[0]):  # did not fit: marked, not a bar
                        ax.scatter(i + (j - 1) * width, 0, marker="x", s=12, color=color, clip_on=False, zorder=3)
                        continue
                    ax.bar(i + (j - 1) * width, float(v.iloc[0]), width, color=color, hatch=hatches[precision],
                           edgecolor="white", linewidth=0.4, alpha=0.65 if design == "coxmoe split" else 1.0)
            if ratio:
                ax.axhline(1.0, color="k", lw=0.5)
            else:
                ax.text(0.5, 0.97, "CoX-MoE at native precision\ndid not fit: tok/s, no ratio", ha="center",
                        va="top", fontsize=6, transform=ax.transAxes)
            if k == 0 or not ratio:
                ax.set_ylabel("throughput / CoX-MoE at native precision" if ratio else "throughput (tok/s)")
            ax.set_xticks(range(len(designs)), designs, rotation=35, ha="right")
            ax.set_title(MODEL_LABELS.get(model, model))
        handles = [Patch(facecolor="0.55", edgecolor="white", hatch=hatch, label=f"{precision} experts")
                   for precision, hatch in hatches.items()]
        fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=7, bbox_to_anchor=(0.5, 1.02))
        if not np.isfinite(table["throughput_tok_s"].astype(float)).all():
            fig.text(0.5, -0.02, "x at the base: did not fit", ha="center", fontsize=6.5)
        fig.tight_layout(rect=(0, 0, 1, 0.92))
        return save_figure(fig, out, "beyond")


def _bottleneck(r: pd.Series) -> str:
    busy = {k: float(r.get(f"busy_{k}_s", 0.0) or 0.0) for k in BUSY}
    name, seconds = max(busy.items(), key=lambda kv: kv[1])
    return f"{name} busy {seconds / r['total_s']:.0%}"


def finding(table: pd.DataFrame) -> str:
    parts = []
    for model, sub in table.groupby("model", sort=False):
        ok = sub[np.isfinite(sub["throughput_tok_s"])]
        if ok.empty:
            continue
        best = ok.loc[ok["throughput_tok_s"].idxmax()]
        native = ok[ok["precision"] == "native"]
        best_native = native.loc[native["throughput_tok_s"].idxmax()] if len(native) else best
        versus = (f"{best['vs_coxmoe_native']:.2f}x CoX-MoE native" if np.isfinite(best["vs_coxmoe_native"])
                  else "CoX-MoE native did not fit")
        parts.append(f"{model}: fastest {best['design']} at {best['precision']} ({best['throughput_tok_s']:.0f} "
                     f"tok/s, {versus}; {_bottleneck(best)}); at native "
                     f"precision {best_native['design']} ({best_native['throughput_tok_s']:.0f} tok/s; "
                     f"{_bottleneck(best_native)})")
    failed = table[~np.isfinite(table["throughput_tok_s"])]
    tail = f"; {len(failed)} runs did not fit" if len(failed) else ""
    first = table.iloc[0]
    head = f"Simulated, batch {first['batch']}, {first['prompt_len']}/{first['gen_len']}: "
    return head + "; ".join(parts) + tail + "."


def reproduce(options: ReproduceOptions) -> Reproduction:
    table = run(options)
    files = [save_csv(table, options.out, "beyond"), *plot(table, options.out)]
    claim = ("No paper figure: CoX-MoE's neighbours (split experts, MoE-Gen's module batching, TriMoE's near-memory "
             "tier) and quantized experts on the same model, machine and routing, each with its own search.")
    return Reproduction("beyond", "Beyond the paper: designs x expert precision", claim, finding(table), table,
                        files)
