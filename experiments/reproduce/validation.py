"""Predicted against published measurements: every validation point (experiments/validation/points) simulated
with its published knobs and with its policy's own search, then with framework factors learned on the declared
training subset per runtime and machine parts (reported on the held-out points, and leave-one-system-out)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from experiments.reproduce import ReproduceOptions, Reproduction
from experiments.reproduce.style import markers_for, palette, paper_style, save_csv, save_figure
from experiments.validation import cpu_ops, gpu_ops
from experiments.validation.fit import FitCase, fit_factors, predicted_total_s
from experiments.validation.phases import phase_finding, phase_fits
from experiments.validation.run import DECODE_SAMPLE, E2E_METRICS, measured_total_s, run_validation, spec_label
from experiments.validation.schema import ValidationPoint, load_points
from sim.cost.framework import FrameworkFactors
from sim.errors import SimInputError
from sim.plan import Plan

# Two complete points on two systems (one policy): the CI subset fits on the training one (L4) and reports the
# held-out one on the other part (T4) with the runtime's pooled factors.
QUICK_POINTS = ("mlh-moe-lightning-p-synth-s2", "mlh-moe-lightning-p-summ-s1")
MEASURED_CPU_KERNELS = frozenset({"moe-lightning"})  # its CPU attention constants come from its own microbenchmark
BAND = 0.2
# The published runtimes' markers; another policy gets the next unused filled marker (`markers_for`).
POLICY_MARKERS = {"flexgen": "s", "moe-lightning": "o", "zero-inference": "v", "fiddler": "^", "coxmoe": "D"}
# Printed and in the report; the CSV has every column.
DISPLAY = ("id", "mode", "system", "policy", "framework", "status", "role", "measured", "predicted", "ratio",
           "learned_ratio", "loso_ratio", "prefill_s", "decode_s", "error")


def _case(point: ValidationPoint, plan: Plan) -> FitCase:
    cpu_attention = (point.runtime not in MEASURED_CPU_KERNELS
                     and str(point.knobs.get("cpu_attention", "")).lower() == "on")
    return FitCase(point.id, spec_label(point.system), point.runtime, plan, measured_total_s(point), cpu_attention)


class _Memo:
    """Fits per distinct training set and predictions per (case, factors): the declared fit and a
    leave-one-system-out fold can be the same fit, and then predict the same cases."""

    def __init__(self) -> None:
        self.fits: dict[frozenset[str], FrameworkFactors] = {}
        self.totals: dict[tuple[str, FrameworkFactors], float] = {}

    def fit(self, cases: list[FitCase]) -> FrameworkFactors:
        key = frozenset(c.id for c in cases)
        if key not in self.fits:
            self.fits[key] = fit_factors(cases)
        return self.fits[key]

    def total_s(self, case: FitCase, factors: FrameworkFactors) -> float:
        key = (case.id, factors)
        if key not in self.totals:
            self.totals[key] = predicted_total_s(case, factors)
        return self.totals[key]


POOLED = "any"  # the factors' `parts` for a runtime's fit over all its training points


@dataclass(frozen=True)
class Fit:
    """Factors fitted for one (runtime, parts) key, and the systems of the cases they were fitted on."""

    factors: FrameworkFactors
    trained_on: tuple[str, ...]


def _fit_and_predict(train: list[FitCase], test: list[FitCase],
                     memo: _Memo) -> tuple[dict[tuple[str, str], Fit], dict[str, tuple[float, str]]]:
    """Factors fitted on `train` per (runtime, machine parts) and per runtime pooled over its parts, for the
    runtimes `test` has; and per `test` case whose runtime has a fit, its predicted/measured rate ratio and the
    parts whose factors gave it (its own where the runtime was trained on those parts, else `POOLED`). A case
    whose runtime has no training case gets no learned-factor prediction (its mechanisms-only ratio is its only
    one, reported there)."""
    fits: dict[tuple[str, str], Fit] = {}
    wanted = {c.runtime for c in test}
    for runtime in sorted({c.runtime for c in train} & wanted):
        mine = [c for c in train if c.runtime == runtime]
        groups = {POOLED: mine, **{p: [c for c in mine if c.parts == p] for p in sorted({c.parts for c in mine})}}
        for parts, cases in groups.items():
            fits[(runtime, parts)] = Fit(memo.fit(cases), tuple(sorted({c.system for c in cases})))
    ratios = {}
    for c in test:  # time ratio inverted: a rate's predicted/measured
        key = (c.runtime, c.parts) if (c.runtime, c.parts) in fits else (c.runtime, POOLED)
        if key in fits:
            ratios[c.id] = (c.measured_total_s / memo.total_s(c, fits[key].factors), key[1])
    return fits, ratios


def _rows(label: str, fits: dict[tuple[str, str], Fit]) -> list[dict]:
    return [{"fit": label, "trained_on": ", ".join(f.trained_on), "framework": runtime, "parts": parts,
             **vars(f.factors)} for (runtime, parts), f in fits.items()]


def run(options: ReproduceOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-run table (published and search modes, with learned-factor columns) and the factors fitted."""
    points = load_points()
    if options.points:  # a user's own points while adding them; --quick then only shortens the runs
        points = [p for p in points if any(fnmatch(p.id, pat) or fnmatch(p.group, pat) for pat in options.points)]
        if not points:
            raise SimInputError(f"--points {' '.join(options.points)}: no validation point's id or group matches")
    elif options.quick:
        points = [p for p in points if p.id in QUICK_POINTS]
    plans: dict[str, Plan] = {}
    table = run_validation(points, modes=("published",) if options.quick else ("published", "search"),
                           decode_sample=2 if options.quick else DECODE_SAMPLE, plans=plans, seed=options.seed)
    by_id = {p.id: p for p in points}
    # Factors are fitted to whole runs' times: a point measuring one phase's rate (KTransformers' prefill and decode
    # rates) has none, and keeps its mechanisms-only ratio in every view.
    cases = [_case(by_id[i], plan) for i, plan in plans.items()
             if by_id[i].status == "complete" and by_id[i].metric in E2E_METRICS]
    fits: list[dict] = []
    memo = _Memo()
    train = [c for c in cases if by_id[c.id].train]
    held = [c for c in cases if not by_id[c.id].train]
    with tqdm(total=1 + len({c.system for c in cases}), desc="fitting framework factors", disable=None) as bar:
        declared, learned = _fit_and_predict(train, cases, memo)
        fits += _rows("declared training subset", declared)
        bar.update()
        loso: dict[str, tuple[float, str]] = {}
        for system in sorted({c.system for c in cases}):
            left = [c for c in cases if c.system == system]
            parts = {c.parts for c in left}  # nothing built from the left-out machine's parts trains
            others = [c for c in cases if c.parts not in parts]
            fold, ratios = _fit_and_predict(others, left, memo)
            loso.update(ratios)
            fits += _rows(f"leave {system} out", fold)
            bar.update()
    published = table["mode"] == "published"
    for name, values in (("learned", learned), ("loso", loso)):
        table[f"{name}_ratio"] = np.where(published, table["id"].map({k: v[0] for k, v in values.items()}), np.nan)
        table[f"{name}_from"] = np.where(published, table["id"].map({k: v[1] for k, v in values.items()}), None)
    table["role"] = np.where(table["id"].isin([c.id for c in held]), "held-out",
                             np.where(table["id"].isin([c.id for c in train]), "train", ""))
    columns = ["fit", "trained_on", "framework", "parts", *(f.name for f in dataclasses.fields(FrameworkFactors))]
    return table, pd.DataFrame(fits, columns=columns)  # a header even when nothing was fitted


def _errors(ratios: pd.Series) -> pd.Series:
    """|simulated / measured - 1|: the median |error| the issue and the docs report."""
    return (ratios.astype(float) - 1).abs()


def _off_by(ratios: pd.Series) -> pd.Series:
    """How many times off, either way (|log ratio|): 0.6x is further off than 1.5x. Ranks the worst point, which
    |ratio - 1| would rank too low when the simulator is slow."""
    return np.log(ratios.astype(float)).abs()


def summary(table: pd.DataFrame) -> dict[str, dict]:
    """Median |error| and the point furthest off, either way, per column, over complete published-knob points
    (incomplete ones apart)."""
    pub = table[(table["mode"] == "published") & table["predicted"].notna()]
    complete = pub[pub["status"] == "complete"]
    # Outside the declared training subsets (the leave-one-system-out folds do fit on these points when they predict
    # the other machine, so "no fit saw them" would not be true).
    unfitted = complete[complete["role"] != "train"].copy()
    unfitted["best_ratio"] = unfitted["learned_ratio"].fillna(unfitted["ratio"]) if "learned_ratio" in unfitted \
        else unfitted["ratio"]
    views = [("mechanisms only, all complete points", "ratio", complete),
             ("leave-one-system-out, points of fitted frameworks (each machine predicted from factors fitted on the "
              "others)", "loso_ratio", complete),
             ("complete points outside the declared training subsets (learned factors where the runtime has them, "
              "else mechanisms only)", "best_ratio", unfitted),
             ("learned factors, held-out points of fitted frameworks", "learned_ratio", pub[pub["role"] == "held-out"]),
             ("learned factors, training points", "learned_ratio", pub[pub["role"] == "train"]),
             ("mechanisms only, incomplete points", "ratio", pub[pub["status"] == "incomplete"])]
    groups = sorted(complete["group"].unique())
    if len(groups) > 1:  # each source apart: one model family and machine set each
        views += [(f"{g}: mechanisms only", "ratio", complete[complete["group"] == g]) for g in groups]
        views += [(f"{g}: learned factors, held-out", "learned_ratio",
                   pub[(pub["role"] == "held-out") & (pub["group"] == g)]) for g in groups]  # empty: no fit, skipped
    views += [(f"{g}: mechanisms only, incomplete points", "ratio", pub[pub["group"] == g])
              for g in sorted(set(pub["group"]) - set(groups))]  # sources with no complete point
    out = {}
    for label, col, rows in views:
        rows = rows[rows[col].notna()]
        if rows.empty:
            continue
        err = _errors(rows[col])
        worst = rows.loc[_off_by(rows[col]).idxmax()]
        out[label] = {"points": len(rows), "median_abs_error": float(err.median()),
                      "within_1.5x": int(((rows[col] <= 1.5) & (rows[col] >= 1 / 1.5)).sum()),
                      "worst": f"{worst['id']} ({float(worst[col]):.2f}x)"}
    return out


def plot(table: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, NullFormatter

    pub = table[(table["mode"] == "published") & table["predicted"].notna()]
    colors = palette(sorted(pub["system"].unique()))
    markers = markers_for(sorted(pub["policy"].unique()), POLICY_MARKERS)
    panels = (("mechanisms only (incomplete points open)", "ratio"),
              ("learned factors: train filled, held-out open", "learned_ratio"))
    with paper_style():
        fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.3))
        drawn = pub[(pub["measured"] > 0) & (pub["predicted"] > 0)]
        if drawn.empty:
            for ax in axes:
                ax.text(0.5, 0.5, "no point with a positive simulated\nand measured value", ha="center",
                        va="center", transform=ax.transAxes)
            fig.tight_layout()
            return save_figure(fig, out, "validation")
        # every drawn point inside: measured values and both panels' predictions (measured x ratio)
        values = [drawn["measured"]] + [drawn["measured"] * drawn[c] for _, c in panels if c in drawn]
        shown = pd.concat(values).astype(float)
        shown = shown[np.isfinite(shown) & (shown > 0)]
        lo, hi = shown.min() / 2, shown.max() * 2
        for ax, (title, col) in zip(axes, panels, strict=True):
            grid = np.geomspace(lo, hi, 50)
            ax.fill_between(grid, grid * (1 - BAND), grid * (1 + BAND), color="0.9", lw=0, label="+-20%")
            ax.plot(grid, grid, color="k", lw=0.6)
            unseen = 0  # a simulated value of 0 (or a measured one) has no place on log axes: counted, said
            for _, r in pub.iterrows():
                if not np.isfinite(r[col]):
                    continue
                pred = r["measured"] * r[col]
                if not (pred > 0 and r["measured"] > 0):
                    unseen += 1
                    continue
                hollow = col == "learned_ratio" and r["role"] == "held-out" or r["status"] != "complete"
                c = colors[r["system"]]
                ax.scatter(r["measured"], pred, marker=markers[r["policy"]], s=22,
                           facecolors="none" if hollow else c, edgecolors=c, linewidths=0.8)
            if unseen:
                ax.text(0.98, 0.02, f"{unseen} point(s) at 0 not drawn", ha="right", va="bottom", fontsize=6,
                        transform=ax.transAxes)
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_xlabel("measured (published) tokens/s")
            ax.set_title(title)
        axes[0].set_ylabel("simulated tokens/s")
        handles = [axes[1].scatter([], [], color=c, marker="o", s=18, label=system)
                   for system, c in colors.items()]
        handles += [axes[1].scatter([], [], color="0.4", marker=m, s=18, label=policy)
                    for policy, m in markers.items()]
        handles.append(Patch(color="0.9", label=f"within +-{BAND:.0%} of y = x"))
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=6)
        fig.tight_layout()
        return save_figure(fig, out, "validation")


def plot_kernels(gpu: pd.DataFrame, cpu: pd.DataFrame, out: Path) -> list[Path]:
    """The single-kernel checks drawn on one convention, simulated / measured rate (> 1: simulated too fast): GPU
    kernels against their measured time, CPU expert kernels against tokens per expert, as preset (solid) and with
    `cpu.gemm_overlap` 0 (dashed); points that set a constant are hollow. The GPU panel is the inverse of
    validation_gpu_ops.csv's `ratio` (predicted / measured seconds, as the report quotes it); the CPU panel is
    validation_cpu_ops.csv's `ratio` itself."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    with paper_style():
        fig, (left, right) = plt.subplots(1, 2, figsize=(7.0, 3.0))
        for ax in (left, right):
            ax.axhspan(1 - BAND, 1 + BAND, color="0.9", lw=0)
            ax.axhline(1.0, color="k", lw=0.6)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(FixedLocator([0.5, 0.67, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0]))
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())
        gpu_colors = palette(sorted(gpu["set"].unique()))
        for name, rows in gpu.groupby("set", sort=True):
            c = gpu_colors[name]
            rows = rows.sort_values("measured_s")
            held = rows["role"] == "held-out"
            speed = rows["measured_s"] / rows["predicted_s"]
            left.scatter(rows.loc[held, "measured_s"] * 1e3, speed[held], color=c, s=14, label=name)
            left.scatter(rows.loc[~held, "measured_s"] * 1e3, speed[~held], facecolors="none", edgecolors=c, s=14)
        left.set_xlabel("measured kernel time (ms)")
        left.set_ylabel("simulated / measured rate\n(1 / the CSV's predicted / measured s)")
        left.set_title("GPU kernels")
        left.legend(loc="lower right", fontsize=6)
        cpu_colors = palette(sorted(cpu["set"].unique()))
        for name, rows in cpu.groupby("set", sort=True):
            c = cpu_colors[name]
            rows = rows.sort_values("tokens_per_expert")
            right.plot(rows["tokens_per_expert"], rows["ratio"], color=c, lw=0.9, label=name)
            right.plot(rows["tokens_per_expert"], rows["ratio_no_overlap"], color=c, lw=0.9, ls="--")
            plateau = rows["role"] != "held-out"
            right.scatter(rows.loc[~plateau, "tokens_per_expert"], rows.loc[~plateau, "ratio"], color=c, s=10)
            right.scatter(rows.loc[plateau, "tokens_per_expert"], rows.loc[plateau, "ratio"], facecolors="none",
                          edgecolors=c, s=10)
        right.plot([], [], color="0.4", lw=0.9, ls="--", label="cpu.gemm_overlap 0")
        right.set_xlabel("tokens per expert")
        right.set_title("CPU expert kernels (8452Y socket)")
        right.legend(loc="upper right", fontsize=6)
        fig.tight_layout()
        return save_figure(fig, out, "validation_kernels")


def finding(stats: dict[str, dict]) -> str:
    if not stats:
        return "no point simulated (the points chosen are unsupported or failed: see the table's error column)."
    parts = [f"{label}: median absolute error {s['median_abs_error']:.0%} over {s['points']} "
             f"point{'s' if s['points'] != 1 else ''}, "
             f"{s['within_1.5x']} within 1.5x, worst {s['worst']}" for label, s in stats.items()]
    return "; ".join(parts) + "."


def gpu_ops_finding(stats: dict[str, dict]) -> str:
    parts = [f"{name}: median absolute error {s['median_abs_error']:.0%} over {s['kernels']} held-out kernels, "
             f"worst {s['worst']}" for name, s in stats.items()]
    return ("Single GPU kernels priced by the cost model against published timings (validation_gpu_ops.csv; "
            "predicted / measured seconds, < 1: simulated too fast): ") + \
        "; ".join(parts) + "."


def cpu_ops_finding(stats: dict[str, dict]) -> str:
    parts = [f"{name}: median absolute error {s['median_abs_error']:.0%} over {s['points']} held-out points, "
             f"worst {s['worst']} (with cpu.gemm_overlap 0, compute and streaming added: "
             f"{s['no_overlap_median_abs_error']:.0%}, {s['no_overlap_range']})" for name, s in stats.items()]
    return ("CPU expert kernels (one 8452Y socket, DeepSeek-V3's expert, 1-1024 tokens per expert) priced against "
            "KTransformers' published throughput curves (validation_cpu_ops.csv; incomplete: the chart's CPU is "
            "not named, its plateaus match the 8452Y's; simulated / measured TFLOPS, > 1: simulated too fast): "
            + "; ".join(parts) + ".")


def reproduce(options: ReproduceOptions) -> Reproduction:
    table, fits = run(options)
    stats = summary(table)
    ops = gpu_ops.check()
    cpu = cpu_ops.check()
    phases = phase_fits(table)
    files = [save_csv(table, options.out, "validation"), save_csv(fits, options.out, "validation_factors"),
             save_csv(ops, options.out, "validation_gpu_ops"), save_csv(cpu, options.out, "validation_cpu_ops"),
             save_csv(phases, options.out, "validation_phases"),
             *plot(table, options.out), *plot_kernels(ops, cpu, options.out)]
    claim = ("No paper figure: published measurements of offloading systems (shared/reference/validation.md), "
             "each simulated with its authors' knobs; the goal is every complete point within 1.5x and a median "
             "absolute error <= 20-25% on points not used for fitting (leave-one-system-out is the strictest reading).")
    note = ("Learned factors per runtime and machine parts (validation_factors.csv) are fitted on the points marked "
            "train only; the held-out and leave-one-system-out columns are the honest errors.")
    shown = table[[c for c in DISPLAY if c in table]].sort_values("status", kind="stable")  # complete points first
    return Reproduction("validation", "Simulator against published measurements", claim,
                        " ".join(filter(None, (finding(stats), gpu_ops_finding(gpu_ops.summary(ops)),
                                               cpu_ops_finding(cpu_ops.summary(cpu)), phase_finding(phases)))),
                        shown, files, note=note)
