"""Fig. 7: throughput of FlexGen, MoE-Lightning and CoX-MoE at B = 1024 over 3 models x 3 systems x 4
(prompt, output) settings, with CoX-MoE's speedups. Runs `experiments/specs/fig7.yaml` through the resumable
sweep runner, so a rerun (or `reproduce all`) reuses every finished point."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from experiments.reproduce import ReproduceOptions, Reproduction
from experiments.reproduce.style import (
    MODEL_LABELS,
    POLICY_COLORS,
    POLICY_LABELS,
    SYSTEM_LABELS,
    paper_style,
    save_csv,
    save_figure,
)
from experiments.sweep.run import run_sweep
from experiments.sweep.spec import expand
from experiments.sweep.store import ResultStore, load_results

SPEC = Path(__file__).resolve().parents[1] / "specs" / "fig7.yaml"
POLICIES = ("flexgen", "moe-lightning", "coxmoe")
CLAIMS = {"moe-lightning": (1.7, 2.4), "flexgen": (3.4, 7.1)}


def spec(quick: bool, settings: dict[str, str] | None = None, seed: int = 0) -> dict:
    """The shipped spec; quick keeps every model and policy but one system, two workloads and B = 128; `settings`
    (`--set` numbers) go on every point, which gives them their own sweep keys, and so does a `seed` other than
    the spec's (`--seed`: the routing traces' draws)."""
    raw = yaml.safe_load(SPEC.read_text())
    if seed:
        raw["fixed"] = {**raw["fixed"], "seed": seed}
    if quick:
        raw["fixed"] = {**raw["fixed"], "batch": 128, "decode_sample": 4}
        raw["axes"]["system"] = raw["axes"]["system"][:1]
        raw["axes"]["workload"] = [w for w in raw["axes"]["workload"] if w["gen_len"] == 32]
    if settings:
        raw["fixed"] = {**raw["fixed"], "system_settings": dict(settings)}
    return raw


def run_grid(options: ReproduceOptions) -> tuple[pd.DataFrame, str]:
    """The grid's rows from the sweep store (running the points not finished yet) and a note on how they ran."""
    points = expand(spec(options.quick, options.settings, options.seed))
    sweep_dir = options.out / "fig7_sweep"
    store = ResultStore(sweep_dir)
    try:
        summary = run_sweep(points, store, options.engine, options.workers, options.ray_address)
    finally:
        store.close()
    df = load_results(sweep_dir)
    df = df[df["key"].isin({p.key for p in points})]
    note = (f"{summary.total} simulations, {df['wall_s'].sum():.0f} s of simulation time in all (sum of the "
            f"points' wall times); this run simulated {summary.ok + summary.failed} and reused {summary.skipped} "
            f"finished ones from {sweep_dir}")
    return df, note


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, system, prompt, output): each policy's tok/s and CoX-MoE's speedups over both."""
    ok = df[df["status"] == "ok"]
    index = ["model", "system", "prompt_len", "gen_len"]
    table = ok.pivot_table(index=index, columns="policy", values="throughput_tok_s").reset_index()
    grid = df[index].drop_duplicates()
    table = grid.merge(table, on=index, how="left")
    for p in POLICIES:
        if p not in table:
            table[p] = np.nan
    for base in CLAIMS:
        table[f"speedup_vs_{base}"] = table["coxmoe"] / table[base]
    order = {m: i for i, m in enumerate(MODEL_LABELS)} | {s: i for i, s in enumerate(SYSTEM_LABELS)}
    table = table.sort_values(index, key=lambda c: c.map(order) if c.name in ("model", "system") else c)
    return table[[*index, *POLICIES, *(f"speedup_vs_{b}" for b in CLAIMS)]].reset_index(drop=True)


def plot(table: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(table["model"]))
    systems = list(dict.fromkeys(table["system"]))
    with paper_style():
        fig, axes = plt.subplots(len(models), len(systems), figsize=(2.5 * len(systems) + 0.6, 2.0 * len(models)),
                                 squeeze=False)
        width = 0.8 / len(POLICIES)
        for (i, model), (j, system) in ((a, b) for a in enumerate(models) for b in enumerate(systems)):
            ax = axes[i, j]
            rows = table[(table["model"] == model) & (table["system"] == system)]
            x = np.arange(len(rows))
            for k, policy in enumerate(POLICIES):
                ax.bar(x + (k - 1) * width, rows[policy].fillna(0), width, color=POLICY_COLORS[policy],
                       label=POLICY_LABELS[policy])
                missing = rows[policy].isna().to_numpy()
                if missing.any():  # a run that did not fit is marked, not drawn as a zero-height bar
                    ax.scatter(x[missing] + (k - 1) * width, np.zeros(missing.sum()), marker="x", s=12,
                               color=POLICY_COLORS[policy], clip_on=False, zorder=3)
            for xi, (_, r) in zip(x, rows.iterrows(), strict=True):
                if np.isfinite(r["coxmoe"]):
                    ax.annotate("\n".join(_speedup_label(r[f"speedup_vs_{b}"]) for b in CLAIMS),
                                (xi + width, r["coxmoe"]), ha="center", va="bottom", fontsize=5.5)
            ax.set_xticks(x, [f"{p}/{g}" for p, g in zip(rows["prompt_len"], rows["gen_len"], strict=True)])
            ax.set_ylim(0, np.nanmax(rows[list(POLICIES)].to_numpy(dtype=float), initial=1.0) * 1.35)
            if i == 0:
                ax.set_title(SYSTEM_LABELS.get(system, system))
            if j == 0:
                ax.set_ylabel(f"{MODEL_LABELS.get(model, model)}\ntokens/s")
            if i == len(models) - 1:
                ax.set_xlabel("prompt / output tokens")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=len(POLICIES), bbox_to_anchor=(0.5, 1.02))
        fig.text(0.5, -0.01, "numbers above CoX-MoE: speedup over MoE-Lightning (top) and FlexGen (bottom); "
                 "x at the base / -: did not fit or failed",
                 ha="center", fontsize=6.5)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        return save_figure(fig, out, "fig7")


def _speedup_label(value: float) -> str:
    """One decimal, two near parity (0.96x printed as 1.0x read as a tie where CoX-MoE is slower)."""
    if not np.isfinite(value):
        return "-"
    return f"{value:.2f}x" if value < 1.05 else f"{value:.1f}x"


def finding(table: pd.DataFrame) -> str:
    parts = []
    for base, (lo, hi) in CLAIMS.items():
        s = table[f"speedup_vs_{base}"].dropna()
        if s.empty:
            parts.append(f"over {POLICY_LABELS[base]}: no feasible point")
            continue
        inside = ((s >= lo) & (s <= hi)).sum()
        parts.append(f"over {POLICY_LABELS[base]} {s.min():.2f}x to {s.max():.2f}x, median {s.median():.2f}x "
                     f"({inside} of {len(s)} points inside the claimed {lo}-{hi}x)")
    missing = int(table[list(POLICIES)].isna().to_numpy().sum())
    tail = f"; {missing} policy runs infeasible or failed (blank in the CSV)" if missing else ""
    return "Simulated CoX-MoE speedup " + "; ".join(parts) + tail + "."


def reproduce(options: ReproduceOptions) -> Reproduction:
    rows, note = run_grid(options)
    table = summarize(rows)
    if options.system_settings:  # the machines' changed numbers, beside their preset names
        table.insert(2, "system_settings", ",".join(f"{k}={v}" for k, v in options.system_settings))
    files = [save_csv(table, options.out, "fig7"), *plot(table, options.out)]
    claim = ("CoX-MoE is 1.7-2.4x faster than MoE-Lightning and 3.4-7.1x faster than FlexGen at B = 1024 "
             "(Fig. 7, three models on three systems, prompt 97/800, output 32/256).")
    return Reproduction("fig7", "Throughput against the baselines (Fig. 7)", claim, finding(table), table, files,
                        note=note)
