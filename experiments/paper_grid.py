"""The CoX-MoE paper's main grid (Fig. 7) in simulation: throughput of every policy and CoX-MoE's speedups.

Models mixtral-8x7b, deepseek-v2-lite, qwen3-30b-a3b; systems rtx6000ada-8452y, a100-80g-8452y,
h100-80g-8452y; batch 1024; (prompt, output) in (97, 32), (97, 256), (800, 32), (800, 256). Each policy runs
its own search; both baselines run decode attention on the CPU, as the paper ran them (MoE-Lightning always
does; FlexGen with cpu_attention=on and its whole KV cache in DRAM, kv_gpu_percent=0). Routing: Mixtral's
measured per-layer popularity table; Zipf(1.0) with a per-layer permutation for the others (no public table
ships with them yet). Decode time comes from 16 evenly spaced decode steps scaled to all (`--decode-sample`;
docs/results.md reports its error against full runs).

    python experiments/paper_grid.py --out docs/results [--workers 2] [--decode-sample 16]

Writes paper_grid.csv (every number) and paper_grid.md (the table), and prints the table.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from experiments.cli.common import ScriptParser, nonneg_int, output_dir, positive_int, run_script, seed_int
from sim.atomic_files import write_atomic, write_atomic_text

MODELS = {"mixtral-8x7b": "table:mixtral-8x7b", "deepseek-v2-lite": "zipf:1.0", "qwen3-30b-a3b": "zipf:1.0"}
SYSTEMS = ("rtx6000ada-8452y", "a100-80g-8452y", "h100-80g-8452y")
WORKLOADS = ((97, 32), (97, 256), (800, 32), (800, 256))
POLICIES = ("coxmoe", "moe-lightning", "flexgen", "fiddler", "gpu-only")
BATCH = 1024
CLAIMS = {"moe-lightning": (1.7, 2.4), "flexgen": (3.4, 7.1)}


def make_traces(out: Path, seed: int) -> dict[tuple[str, int, int], Path]:
    """One routing trace per (model, prompt, output), shared by every system and policy."""
    from sim.specs import load_model
    from traces import SynthConfig, generate_trace, save_trace

    paths = {}
    for (name, routing), (prompt, gen) in tqdm(list(itertools.product(MODELS.items(), WORKLOADS)), desc="traces"):
        path = out / f"{name}_p{prompt}_g{gen}_s{seed}.npz"
        if not path.exists():
            m = load_model(name)
            cfg = SynthConfig(name, m.num_moe_layers, m.num_experts, m.top_k, routing, 0.0, seed)
            save_trace(generate_trace(cfg, np.full(BATCH, prompt), np.full(BATCH, gen)), path)
        paths[(name, prompt, gen)] = path
    return paths


def run_point(model: str, system: str, prompt: int, gen: int, trace: str, seed: int, decode_sample: int) -> list[dict]:
    from sim.compare import compare

    t0 = time.perf_counter()
    result = compare(model, system, trace=trace, seed=seed, decode_sample=decode_sample, policies=POLICIES,
                     options={"flexgen": {"cpu_attention": "on", "kv_gpu_percent": "0"}},
                     workers=1)  # the grid's own --workers run points side by side
    rows = []
    for policy, r in result["policies"].items():
        row = {"model": model, "system": system, "prompt": prompt, "gen": gen, "policy": policy,
               "feasible": r["feasible"]}
        if r["feasible"]:
            row.update(throughput_tok_s=r["throughput_tok_s"], total_s=r["total_s"], prefill_s=r["prefill_s"],
                       decode_s=r["decode_s"], peak_vram_gib=r["peak_gpu_bytes"] / 2**30,
                       analytic_total_s=r.get("analytic_total_s"),
                       search_s=(r.get("search") or {}).get("search_s"),
                       **{f"busy_{k}": v for k, v in r["busy_fraction"].items()},
                       knobs=str({k: v for k, v in r["knobs"].items() if not k.endswith("per_layer")}))
        else:
            row["error"] = r["error"]
        row["point_wall_s"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per grid point: throughput per policy and CoX-MoE's speedups over the two baselines."""
    tput = df.pivot_table(index=["model", "system", "prompt", "gen"], columns="policy", values="throughput_tok_s")
    out = tput.reset_index()
    for base in CLAIMS:
        out[f"speedup_vs_{base}"] = out["coxmoe"] / out[base]
    return out


def markdown(summary: pd.DataFrame) -> str:
    cols = ["model", "system", "prompt", "gen", "coxmoe", "moe-lightning", "flexgen", "fiddler", "gpu-only",
            "speedup_vs_moe-lightning", "speedup_vs_flexgen"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in summary.iterrows():
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                cells.append("n/a" if np.isnan(v) else (f"{v:.2f}x" if c.startswith("speedup") else f"{v:.0f}"))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    for base, (lo, hi) in CLAIMS.items():
        s = summary[f"speedup_vs_{base}"].dropna()
        lines.append(f"\nCoX-MoE over {base}: simulated {s.min():.2f}x to {s.max():.2f}x (median {s.median():.2f}x) "
                     f"over {len(s)} points; the paper claims {lo}x to {hi}x.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=output_dir, default="docs/results",
                        help="folder for paper_grid.csv and paper_grid.md")
    parser.add_argument("--traces", type=output_dir, default="out/traces", help="cache folder for the routing traces")
    parser.add_argument("--workers", type=positive_int, default=2)
    parser.add_argument("--decode-sample", type=nonneg_int, default=16, help="decode steps simulated (0: all)")
    parser.add_argument("--seed", type=seed_int, default=0)
    args = parser.parse_args()
    out, cache = Path(args.out), Path(args.traces)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    traces = make_traces(cache, args.seed)
    points = [(m, s, p, g) for m in MODELS for s in SYSTEMS for p, g in WORKLOADS]
    rows: list[dict] = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_point, m, s, p, g, str(traces[(m, p, g)]), args.seed, args.decode_sample)
                   for m, s, p, g in points]
        for f in tqdm(as_completed(futures), total=len(futures), desc="grid points"):
            rows.extend(f.result())
    df = pd.DataFrame(rows).sort_values(["model", "system", "prompt", "gen", "policy"])
    write_atomic(out / "paper_grid.csv", lambda tmp: df.to_csv(tmp, index=False))
    summary = summarize(df)
    text = markdown(summary)
    write_atomic_text(out / "paper_grid.md",
        f"Made by `python experiments/paper_grid.py --out {args.out} --workers {args.workers} "
        f"--decode-sample {args.decode_sample} --seed {args.seed}` in {time.perf_counter() - t0:.0f} s. "
        "Throughput in generated tokens/s.\n\n" + text)
    print(text)


if __name__ == "__main__":
    run_script(main, "paper_grid")
