"""How much CoX-MoE's Fig. 7 speedups rest on the Xeon 8452Y's AMX rate, which no one has measured for its runtime.

The 8452Y preset prices CPU GEMMs at KTransformers' tuned AMX kernel (21.3 TFLOPS on one socket, 0.289 of peak);
the same source measured stock PyTorch/oneDNN at 5.4 (0.073), and CoX-MoE's runtime extends IPEX, whose kernels
are oneDNN's. This runs the Fig. 7 grid (experiments/specs/fig7.yaml) and the same grid with only that rate set
(`system_settings: {cpu.amx_efficiency: 0.073}` on every point, what `--set` does on the command line and
`coxmoe reproduce fig7 --set` runs), then writes, per grid point, every policy's throughput under both rates and
CoX-MoE's speedups.

    python experiments/amx_sensitivity.py --out docs/results [--work out/amx_sensitivity] [--workers 2]

Writes amx_sensitivity.csv and amx_sensitivity.md (the table and a summary) to --out and prints the summary.
The sweeps are resumable (--work keeps their results); a rerun with the same code reuses finished points.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from experiments.cli.common import positive_int
from experiments.reproduce.fig7 import spec as fig7_spec
from experiments.sweep.run import run_sweep
from experiments.sweep.spec import expand
from experiments.sweep.store import ResultStore, load_results
from experiments.tables import markdown_table
from sim.errors import SimInputError

STOCK_AMX = {"cpu.amx_efficiency": "0.073"}  # KTransformers' Fig. 3: stock PyTorch/oneDNN on one 8452Y socket
GRIDS = {"tuned": None, "stock": STOCK_AMX}
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


def compare(tuned: pd.DataFrame, stock: pd.DataFrame) -> pd.DataFrame:
    """Per grid point: each policy's throughput under both AMX rates and CoX-MoE's speedups."""
    sides = []
    for name, df in (("tuned", tuned), ("stock", stock)):
        wide = df.pivot_table(index=KEYS, columns="policy", values="throughput_tok_s", aggfunc="first")
        wide.columns = [f"{p}_{name}" for p in wide.columns]
        sides.append(wide)
    out = sides[0].join(sides[1], how="inner").reset_index()
    out["coxmoe_stock_over_tuned"] = out["coxmoe_stock"] / out["coxmoe_tuned"]
    for base in BASELINES:
        for name in ("tuned", "stock"):
            out[f"speedup_vs_{base}_{name}"] = out[f"coxmoe_{name}"] / out[f"{base}_{name}"]
    return out


def summary(table: pd.DataFrame) -> list[str]:
    """One line per model: CoX-MoE's throughput change and its speedup range under each rate."""
    lines = []
    for model, g in table.groupby("model", sort=False):
        r = g["coxmoe_stock_over_tuned"]
        parts = [f"{model}: CoX-MoE at {r.min():.2f}-{r.max():.2f}x its tuned-AMX throughput (median {r.median():.2f})"]
        for base in BASELINES:
            t, s = g[f"speedup_vs_{base}_tuned"], g[f"speedup_vs_{base}_stock"]
            parts.append(f"vs {base} {t.min():.2f}-{t.max():.2f}x (median {t.median():.2f}) -> "
                         f"{s.min():.2f}-{s.max():.2f}x (median {s.median():.2f})")
        lines.append("; ".join(parts))
    base_moved = max(float((table[f"{b}_stock"] / table[f"{b}_tuned"] - 1).abs().max()) for b in BASELINES)
    lines.append(f"baselines' throughput moved by at most {100 * base_moved:.2f}% (they run no GEMM on the CPU)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results", help="folder for amx_sensitivity.csv and .md")
    parser.add_argument("--work", default="out/amx_sensitivity", help="sweep results (resumable)")
    parser.add_argument("--workers", type=positive_int, default=2)
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    try:
        grids = {name: run_grid(settings, work / name, args.workers) for name, settings in GRIDS.items()}
    except SimInputError as exc:
        parser.exit(2, f"amx_sensitivity: error: {exc}\n")
    table = compare(grids["tuned"], grids["stock"])
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "amx_sensitivity.csv", index=False)
    lines = summary(table)
    cols = [*KEYS, "coxmoe_tuned", "coxmoe_stock", "coxmoe_stock_over_tuned",
            *[f"speedup_vs_{b}_{n}" for b in BASELINES for n in ("tuned", "stock")]]
    shown = table[cols].copy()
    for c in cols[len(KEYS):]:
        fmt = "{:.2f}" if "over" in c or "speedup" in c else "{:.0f}"
        shown[c] = shown[c].map(fmt.format)
    (out / "amx_sensitivity.md").write_text(
        "# CoX-MoE's speedups against the AMX rate\n\n"
        "`python experiments/amx_sensitivity.py`: the Fig. 7 grid with the 8452Y's AMX at KTransformers' tuned "
        "kernel (0.289 of peak, the preset) and at stock PyTorch/oneDNN (0.073); generated tokens/s.\n\n"
        + "\n".join(f"- {line}" for line in lines) + "\n\n" + markdown_table(shown) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
