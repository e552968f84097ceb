"""How much CoX-MoE's Fig. 7 speedups rest on the Xeon 8452Y's CPU GEMM pricing, which no one has measured for
its runtime.

The 8452Y preset prices CPU GEMMs at KTransformers' tuned AMX kernel (21.3 TFLOPS on one socket, 0.289 of peak)
with the roofline's max() of compute and weight-streaming time; the same source measured stock PyTorch/oneDNN at
5.4 (0.073), and its published kernel curves run 1.4x slower than that max() at 64-128 tokens per expert, closer
to the two times added (`experiments/validation/cpu_ops.py`). This runs the Fig. 7 grid
(experiments/specs/fig7.yaml) as preset ("tuned") and with system settings on every point (what `--set` does on
the command line and `coxmoe reproduce fig7 --set` runs): "stock" (`cpu.amx_efficiency: 0.073`), "no-overlap"
(`cpu.gemm_overlap: 0`) and both; then writes, per grid point, every policy's throughput in each variant and
CoX-MoE's speedups.

    python experiments/amx_sensitivity.py --out docs/results [--work out/amx_sensitivity] [--workers 2]

Writes amx_sensitivity.csv and amx_sensitivity.md (the table and a summary) to --out and prints the summary.
The sweeps are resumable (--work keeps their results); a rerun with the same code reuses finished points.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.cli.common import ScriptParser, output_dir, positive_int
from experiments.reproduce.fig7 import spec as fig7_spec
from experiments.sweep.run import run_sweep
from experiments.sweep.spec import expand
from experiments.sweep.store import ResultStore, load_results
from experiments.tables import markdown_table
from sim.atomic_files import write_atomic, write_atomic_text
from sim.errors import SimInputError

STOCK_AMX = {"cpu.amx_efficiency": "0.073"}  # KTransformers' Fig. 3: stock PyTorch/oneDNN on one 8452Y socket
NO_OVERLAP = {"cpu.gemm_overlap": "0"}  # a CPU GEMM streams its weights, then computes (docs/cost-model.md)
GRIDS = {"tuned": None, "stock": STOCK_AMX, "no-overlap": NO_OVERLAP, "stock-no-overlap": {**STOCK_AMX, **NO_OVERLAP}}
KEYS = ["model", "system", "prompt_len", "gen_len"]
BASELINES = ("moe-lightning", "flexgen")


def run_grid(settings: dict[str, str] | None, work: Path, workers: int) -> pd.DataFrame:
    """The Fig. 7 grid's results with `settings` on every point (resumable), one row per point (a reused folder's
    other points left out)."""
    points = expand(fig7_spec(False, settings))
    store = ResultStore(work)
    try:
        run_sweep(points, store, "local", workers)
    finally:
        store.close()
    df = load_results(work)
    return df[(df["status"] == "ok") & df["key"].isin({p.key for p in points})].copy()


def compare(tuned: pd.DataFrame, *others: tuple[str, pd.DataFrame]) -> pd.DataFrame:
    """Per grid point: each policy's throughput as preset ("tuned") and in each other variant, CoX-MoE's
    throughput in each variant over the preset's, and its speedups over the baselines in every variant."""
    sides = []
    names = ["tuned", *[name for name, _ in others]]
    for name, df in (("tuned", tuned), *others):
        wide = df.pivot_table(index=KEYS, columns="policy", values="throughput_tok_s", aggfunc="first")
        wide.columns = [f"{p}_{name}" for p in wide.columns]
        sides.append(wide)
    out = sides[0]
    for side in sides[1:]:
        out = out.join(side, how="inner")
    out = out.reset_index()
    for name in names[1:]:
        out[f"coxmoe_{name}_over_tuned"] = out[f"coxmoe_{name}"] / out["coxmoe_tuned"]
    for base in BASELINES:
        for name in names:
            out[f"speedup_vs_{base}_{name}"] = out[f"coxmoe_{name}"] / out[f"{base}_{name}"]
    return out


def variants(table: pd.DataFrame) -> list[str]:
    """The variants a comparison holds besides the preset, in column order."""
    return [c.removeprefix("coxmoe_").removesuffix("_over_tuned") for c in table.columns
            if c.startswith("coxmoe_") and c.endswith("_over_tuned")]


def summary(table: pd.DataFrame) -> list[str]:
    """One line per model and variant: CoX-MoE's throughput change and its speedup range, preset -> variant."""
    lines = []
    for model, g in table.groupby("model", sort=False):
        for name in variants(table):
            r = g[f"coxmoe_{name}_over_tuned"]
            parts = [f"{model}, {name}: CoX-MoE at {r.min():.2f}-{r.max():.2f}x its preset throughput "
                     f"(median {r.median():.2f})"]
            for base in BASELINES:
                t, s = g[f"speedup_vs_{base}_tuned"], g[f"speedup_vs_{base}_{name}"]
                parts.append(f"vs {base} {t.min():.2f}-{t.max():.2f}x (median {t.median():.2f}) -> "
                             f"{s.min():.2f}-{s.max():.2f}x (median {s.median():.2f})")
            lines.append("; ".join(parts))
    moved = {b: max(float((table[f"{b}_{v}"] / table[f"{b}_tuned"] - 1).abs().max()) for v in variants(table))
             for b in BASELINES}
    lines.append("baselines' throughput moved by at most " +
                 ", ".join(f"{100 * m:.2f}% ({b})" for b, m in moved.items()) +
                 " (their CPU work is attention: a GEMM only in DeepSeek's MLA up-projection, which "
                 "MoE-Lightning's CPU attention applies; a search may also pick another configuration)")
    return lines


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=output_dir, default="docs/results",
                        help="folder for amx_sensitivity.csv and .md")
    parser.add_argument("--work", type=output_dir, default="out/amx_sensitivity", help="sweep results (resumable)")
    parser.add_argument("--workers", type=positive_int, default=2)
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)  # before four grids of work, not after them
        grids = {name: run_grid(settings, work / name, args.workers) for name, settings in GRIDS.items()}
    except (SimInputError, OSError) as exc:  # OSError: a results folder that cannot be written (read-only, full)
        parser.exit(2, f"amx_sensitivity: error: {exc}\n")
    table = compare(grids["tuned"], *[(name, df) for name, df in grids.items() if name != "tuned"])
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "amx_sensitivity.csv", lambda tmp: table.to_csv(tmp, index=False))
    lines = summary(table)
    names = variants(table)
    cols = [*KEYS, "coxmoe_tuned", *[f"coxmoe_{n}_over_tuned" for n in names],
            *[f"speedup_vs_moe-lightning_{n}" for n in ("tuned", *names)]]
    shown = table[cols].copy()
    for c in cols[len(KEYS):]:
        fmt = "{:.2f}" if "over" in c or "speedup" in c else "{:.0f}"
        shown[c] = shown[c].map(fmt.format)
    settings = "; ".join(f"{name}: " + ", ".join(f"`{k}={v}`" for k, v in (GRIDS[name] or {}).items())
                         for name in names)
    write_atomic_text(out / "amx_sensitivity.md",
        "# CoX-MoE's speedups against the CPU GEMM pricing\n\n"
        "`python experiments/amx_sensitivity.py`: the Fig. 7 grid as preset (the 8452Y's AMX at KTransformers' "
        "tuned kernel, 0.289 of peak, under the roofline's max() of compute and weight streaming) and with "
        f"system settings on every point ({settings}); generated tokens/s, and CoX-MoE's speedup over "
        "MoE-Lightning in each (FlexGen's in the CSV).\n\n"
        + "\n".join(f"- {line}" for line in lines) + "\n\n" + markdown_table(shown) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
