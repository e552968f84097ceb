"""Table 3: the ablation from MoE-Lightning to CoX-MoE (coalesced experts with AMX co-execution, then attention
offload, then hot-expert preload), plus each CoX-MoE feature switched off alone. Qwen3-30B-A3B on the RTX 6000
Ada system, as in the paper, at B = 1024 and the motivation's prompt length 512; `sim.compare.ablation` defines
the steps. A step that does not fit in memory is shown as infeasible and the next is compared with the last that
ran."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.reproduce import ReproduceOptions, Reproduction
from experiments.reproduce.style import MODEL_LABELS, SYSTEM_LABELS, paper_style, save_csv, save_figure
from sim.compare import ablation, failure_note

MODEL, SYSTEM, ROUTING = "qwen3-30b-a3b", "rtx6000ada-8452y", "preset:qwen3-30b-a3b"
PAPER_STEP_SPEEDUP = {"+ coalesced experts with AMX co-execution": 1.51, "+ hot-expert preload (CoX-MoE)": 1.05}


def run(options: ReproduceOptions) -> pd.DataFrame:
    batch, prompt, gen, sample = (128, 512, 8, 2) if options.quick else (1024, 512, 32, 16)
    result = ablation(MODEL, options.system(SYSTEM), batch=batch, prompt_len=prompt, gen_len=gen, routing=ROUTING,
                      seed=options.seed, decode_sample=sample, progress=True)
    rows = []
    previous = None
    for i, step in enumerate(result["steps"]):
        tput = step["throughput_tok_s"] if step.get("feasible") else np.nan
        cumulative = i < 4  # the paper's steps build on each other; the rest switch one feature off
        rows.append({"step": step["step"], "kind": "paper step" if cumulative else "one feature off",
                     "options": ",".join(f"{k}={v}" for k, v in step["options"].items()) or "(defaults)",
                     "throughput_tok_s": tput, "speedup_over_moe_lightning": step["speedup_over_moe_lightning"],
                     "step_speedup": tput / previous if cumulative and previous and np.isfinite(tput) else np.nan,
                     "paper_step_speedup": PAPER_STEP_SPEEDUP.get(step["step"], np.nan),
                     "batch": batch, "prompt_len": prompt, "gen_len": gen, "model": MODEL,
                     "system": options.system(SYSTEM).name, "routing": ROUTING,
                     "note": "" if step.get("feasible") else f"does not fit: {failure_note(step['error'])}"})
        if cumulative and np.isfinite(tput):
            previous = tput  # an infeasible step is skipped: the next one is compared with the last that ran
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    with paper_style():
        fig, ax = plt.subplots(figsize=(5.6, 2.6))
        y = np.arange(len(table))
        colors = ["#2e86c1" if i == 0 else "#c0392b" if k == "paper step" else "#bdc3c7"
                  for i, k in enumerate(table["kind"])]
        speed = table["speedup_over_moe_lightning"].astype(float).fillna(0)
        ax.barh(y, speed, color=colors)
        for yi, v, tput, note in zip(y, speed, table["throughput_tok_s"].astype(float), table["note"], strict=True):
            # a step that did not run, or ran with no MoE-Lightning to compare with, is labelled right of x = 1
            label = (f"{v:.2f}x" if v else f"{tput:.1f} tok/s (MoE-Lightning does not fit)" if np.isfinite(tput)
                     else note or "infeasible")
            ax.annotate(label, (v or 1.0, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=6.5)
        ax.set_yticks(y, table["step"])
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.6)
        ax.grid(axis="x", linewidth=0.4, alpha=0.5)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("throughput over MoE-Lightning")
        ax.set_xlim(0, max(speed.max(), 1.0) * 1.15)
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="#c0392b", label="the paper's steps, cumulative"),
                           Patch(color="#bdc3c7", label="full CoX-MoE, one feature off")], loc="upper center",
                  bbox_to_anchor=(0.5, -0.22), ncol=2)
        r = table.iloc[0]
        ax.set_title(f"Ablation: {MODEL_LABELS.get(r['model'], r['model'])}, "
                     f"{SYSTEM_LABELS.get(r['system'], r['system'])}, B={r['batch']}, {r['prompt_len']}/{r['gen_len']}")
        fig.tight_layout()
        return save_figure(fig, out, "table3")


def _step_text(s: pd.Series) -> str:
    if not np.isfinite(s["throughput_tok_s"]):
        return f"infeasible, {s['note']}"
    if np.isfinite(s["step_speedup"]):
        return f"x{s['step_speedup']:.2f}"
    return f"{s['throughput_tok_s']:.1f} tok/s (no earlier step ran)"


def finding(table: pd.DataFrame) -> str:
    steps = table[table["kind"] == "paper step"]
    parts = [f"{s['step'].lstrip('+ ')} {_step_text(s)}" for _, s in steps.iloc[1:].iterrows()]
    base, full = steps.iloc[0], steps.iloc[-1]
    overall = float(full["speedup_over_moe_lightning"]) if full["speedup_over_moe_lightning"] is not None else np.nan
    if np.isfinite(overall):
        end = f"full CoX-MoE {overall:.2f}x over MoE-Lightning"
    elif not np.isfinite(base["throughput_tok_s"]):
        end = f"MoE-Lightning {base['note']}, so no speed-up over it"
    else:
        end = f"full CoX-MoE {full['note']}"
    return f"Simulated steps over the previous one: {'; '.join(parts)}; {end}."


def reproduce(options: ReproduceOptions) -> Reproduction:
    table = run(options)
    files = [save_csv(table, options.out, "table3"), *plot(table, options.out)]
    claim = ("From MoE-Lightning, coalesced experts with AMX co-execution give x1.51, attention offload to the CPU "
             "adds more, EAS at an 80% hit ratio adds x1.05 (Table 3, Qwen3-30B-A3B on the RTX 6000 Ada).")
    return Reproduction("table3", "Ablation (Table 3)", claim, finding(table), table, files)
