"""The paper's VRAM motivation: with decode attention on the GPU the KV cache and other intermediate data crowd
out expert weights; with attention on the CPU (AMX) the freed VRAM holds resident experts. CoX-MoE's plan with
decode attention pinned to the GPU (`decode_placement=ggg`) or the CPU (`gcg`), prefill placement searched;
Qwen3-30B-A3B on the RTX 6000 Ada, prompt 512."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.reproduce import ReproduceOptions, Reproduction
from experiments.reproduce.style import paper_style, save_csv, save_figure
from sim.api import simulate
from sim.compare import failure_note
from sim.errors import CapacityError

MODEL, SYSTEM, ROUTING, PROMPT = "qwen3-30b-a3b", "rtx6000ada-8452y", "preset:qwen3-30b-a3b", 512
# Static GPU pools (`Plan.static_memory["gpu"]`) grouped as the paper groups them.
GROUPS = {"expert weights": ("resident_experts", "expert_fetch_buffers"),
          "non-expert weights": ("non_expert_weights",),
          "intermediate data": ("kv_cache", "hidden_states", "workspace")}
GROUP_COLORS = {"expert weights": "#c0392b", "non-expert weights": "#7f8c8d", "intermediate data": "#2e86c1",
                "free": "#ecf0f1"}


def run(options: ReproduceOptions) -> pd.DataFrame:
    batch, gen, sample = (128, 4, 2) if options.quick else (512, 32, 8)
    usable = options.system(SYSTEM).gpu_usable_bytes
    rows = []
    for attention in ("gpu", "cpu"):
        row = {"attention": attention, "system": options.system(SYSTEM).name, "batch": batch, "prompt_len": PROMPT,
               "gen_len": gen,
               "gpu_usable_gib": usable / 2**30}
        try:
            r = simulate(MODEL, SYSTEM, "coxmoe", system_settings=options.settings, batch=batch, prompt_len=PROMPT,
                         gen_len=gen, routing=ROUTING,
                         seed=options.seed, decode_sample=sample,
                         policy_options={"decode_placement": f"g{attention[0]}g"})
        except CapacityError as exc:
            rows.append({**row, "note": failure_note(str(exc))})  # a search's error names its policy first
            continue
        pools = r.static_memory.get("gpu", {})
        for group, names in GROUPS.items():
            row[f"{group}_gib"] = sum(pools.get(n, 0) for n in names) / 2**30
            row[f"{group}_share"] = sum(pools.get(n, 0) for n in names) / usable
        row.update({f"pool_{k}_gib": v / 2**30 for k, v in pools.items()})
        row.update(peak_gpu_gib=r.peak_gpu_bytes / 2**30, resident_experts_per_layer=r.knobs["resident_experts"],
                   total_s=r.total_s, prefill_s=r.prefill_s, decode_s=r.decode_s,
                   throughput_tok_s=r.throughput_tok_s, note="")
        rows.append(row)
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    fits = (table["note"] == "").to_numpy()
    ok = table.copy()
    for group in GROUPS:  # a placement that does not fit keeps its row, drawn empty and labelled
        ok[f"{group}_share"] = np.where(fits, ok.get(f"{group}_share", np.nan), 0.0)
    with paper_style():
        fig, ax = plt.subplots(figsize=(4.2, 2.4))
        labels = [f"attention on {r['attention'].upper()}\n" + (f"{r['total_s']:.1f} s end to end\n"
                                                                 f"{r['decode_s']:.1f} s decode" if fit else
                                                                 "does not fit")
                  for fit, (_, r) in zip(fits, ok.iterrows(), strict=True)]
        left = np.zeros(len(ok))
        for group in [*GROUPS, "free"]:
            share = np.where(fits, 1 - left, 0.0) if group == "free" else ok[f"{group}_share"].to_numpy()
            ax.barh(labels, share * 100, left=left * 100, color=GROUP_COLORS[group], label=group,
                    edgecolor="white", linewidth=0.5)
            for y, (lo, w) in enumerate(zip(left, share, strict=True)):
                if w > 0.09:
                    ax.text((lo + w / 2) * 100, y, f"{w:.1%}", ha="center", va="center", fontsize=6.5,
                            color="black" if group == "free" else "white")
            left = left + share
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"share of usable VRAM ({table['gpu_usable_gib'].iloc[0]:.0f} GiB), static allocations")
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        ax.grid(axis="x", linewidth=0.4, alpha=0.5)
        r = table.iloc[0]
        ax.set_title(f"Qwen3-30B-A3B, RTX 6000 Ada, B={r['batch']}, prompt {r['prompt_len']}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4)
        fig.tight_layout()
        return save_figure(fig, out, "vram")


def finding(table: pd.DataFrame) -> str:
    by = {r["attention"]: r for _, r in table.iterrows()}
    parts = []
    for a in ("gpu", "cpu"):
        r = by[a]
        if r["note"]:
            parts.append(f"attention on the {a.upper()}: does not fit ({r['note']})")
            continue
        parts.append(f"attention on the {a.upper()}: intermediate data {r['intermediate data_share']:.1%}, "
                     f"expert weights {r['expert weights_share']:.1%} of VRAM, {r['total_s']:.1f} s end to end "
                     f"({r['decode_s']:.1f} s decode)")
    if not by["gpu"]["note"] and not by["cpu"]["note"]:
        change = by["cpu"]["total_s"] / by["gpu"]["total_s"] - 1
        decode = by["cpu"]["decode_s"] / by["gpu"]["decode_s"] - 1
        parts.append(f"moving decode attention to the CPU changes total latency by {change:+.0%}, decode latency "
                     f"by {decode:+.0%}")
    return "Simulated: " + "; ".join(parts) + "."


def reproduce(options: ReproduceOptions) -> Reproduction:
    table = run(options)
    files = [save_csv(table, options.out, "vram"), *plot(table, options.out)]
    claim = ("With attention on the GPU, intermediate data takes 84.6% of VRAM and expert weights 11.5%; with "
             "attention on the CPU (AMX), expert weights get 58.5% of VRAM and total latency drops by 40%.")
    return Reproduction("vram", "VRAM breakdown, attention on GPU vs CPU (motivation)", claim, finding(table),
                        table, files)
