"""Expert hit ratio of EAS against random selection, uniform sampling and the global-frequency oracle, and the
simulated throughput of `coxmoe` with each resident set (issue 5, item 5).

Per model, one synthetic topic-mixture trace (B requests, prompt 97, output 32; 8 topics, topic shift 0.7;
Mixtral's measured popularity table as the base, Zipf(1.0) for DeepSeek-V2-Lite and Qwen3-30B-A3B). The hit ratio
is the share of all token-expert assignments (prefill and decode) whose expert is among the first quarter of the
map's ranking. EAS clusters the requests' feature vectors with k-means (8 clusters) and probes the prefill
routing of prototypes drawn in proportion to cluster size; "uniform" probes a plain random sample of the same
size; both are repeated over seeds (mean and std reported). Throughput: `coxmoe` with `hot_map` set to each
method's map (the policy still searches how many residents fit), decode sampled at 8 steps; and once more
with the EAS map plus online re-stratification (`restratify=ema:0.3:4`), which pays a PCIe copy per swap.

    python experiments/hit_ratio_study.py --out docs/results [--batch 1024] [--seeds 5]
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from experiments.cli.common import ScriptParser, nonneg_int, output_dir, positive_int, run_script
from experiments.tables import markdown_table
from sim.atomic_files import save_figure_file, write_atomic, write_atomic_text

MODELS = {"mixtral-8x7b": "table:mixtral-8x7b", "deepseek-v2-lite": "zipf:1.0", "qwen3-30b-a3b": "zipf:1.0"}
SAMPLES = (4, 8, 16, 32, 64, 128)
SYSTEM = "rtx6000ada-8452y"
PROMPT, OUTPUT, TOPICS, SHIFT, CLUSTERS = 97, 32, 8, 0.7, 8
RESTRATIFY = "ema:0.3:4"  # the dynamic alternative: EMA weight 0.3, E_R re-picked every 4 decode steps


def study_model(model: str, routing: str, batch: int, seeds: int, throughput_sample: int,
                decode_sample: int) -> tuple[list[dict], list[dict]]:
    """Hit-ratio rows (one per method, sample size, seed) and throughput rows (one per method) for a model."""
    from sim.api import simulate
    from sim.specs import load_model
    from traces import SynthConfig, generate_trace
    from traces.eas import eas_map, hit_ratio, oracle_map, random_map, save_map

    m = load_model(model)
    cfg = SynthConfig(m.name, m.num_moe_layers, m.num_experts, m.top_k, routing, seed=0, topics=TOPICS,
                      topic_shift=SHIFT)
    trace = generate_trace(cfg, np.full(batch, PROMPT), np.full(batch, OUTPUT))
    resident = max(1, m.num_experts // 4)
    hits: list[dict] = []
    maps = {"oracle": oracle_map(trace, resident), "random": random_map(trace, resident, seed=0)}
    hits.append({"model": model, "method": "oracle", "sample": batch, "seed": 0,
                 "hit_ratio": hit_ratio(trace, maps["oracle"])})
    for seed in range(seeds):
        hits.append({"model": model, "method": "random", "sample": 0, "seed": seed,
                     "hit_ratio": hit_ratio(trace, random_map(trace, resident, seed))})
        for sample in (s for s in SAMPLES if s <= batch):
            for method, feats, k in (("eas", trace.request_features, CLUSTERS), ("uniform", None, 1)):
                hot = eas_map(trace, feats, clusters=k, sample=sample, resident=resident, seed=seed)
                hits.append({"model": model, "method": method, "sample": sample, "seed": seed,
                             "hit_ratio": hit_ratio(trace, hot)})
                if seed == 0 and sample == throughput_sample:
                    maps[method] = hot
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [(method, hot, "off") for method, hot in maps.items()] + [("eas+" + RESTRATIFY, maps["eas"],
                                                                                 RESTRATIFY)]
        for method, hot, restratify in variants:
            path = save_map(hot, Path(tmp) / f"{method}.npz")
            r = simulate(m, SYSTEM, "coxmoe", trace=trace, policy_options={"hot_map": str(path),
                                                                           "restratify": restratify},
                         decode_sample=decode_sample)
            runs.append({"model": model, "method": method, "probe_sample": throughput_sample if method.startswith(
                         ("eas", "uniform")) else "", "hit_ratio_at_quarter": hit_ratio(trace, hot),
                         "resident_per_layer": r.knobs.get("resident_experts"),
                         "swapped_experts": r.knobs.get("restratify_swaps", 0),
                         "throughput_tok_s": r.generated_tokens / r.total_s})
    return hits, runs


def plot(hits: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(hits["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), sharey=False)
    for ax, model in zip(np.atleast_1d(axes), models, strict=True):
        d = hits[hits["model"] == model]
        for method, style in (("eas", "o-"), ("uniform", "s--")):
            g = d[d["method"] == method].groupby("sample")["hit_ratio"].agg(["mean", "std"])
            ax.errorbar(g.index, g["mean"], yerr=g["std"], fmt=style, capsize=3, label=method)
        for method, color in (("oracle", "k"), ("random", "tab:red")):
            ax.axhline(d[d["method"] == method]["hit_ratio"].mean(), color=color, ls=":", label=method)
        ax.set_xscale("log", base=2)
        ax.set_title(model)
        ax.set_xlabel("probed prototypes")
        ax.set_ylabel("expert hit ratio (top quarter resident)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    try:
        save_figure_file(fig, path, dpi=120)
    finally:
        plt.close(fig)


def main() -> None:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=output_dir, default="docs/results")
    ap.add_argument("--batch", type=positive_int, default=1024)
    ap.add_argument("--seeds", type=positive_int, default=5)
    ap.add_argument("--throughput-sample", type=positive_int, default=32,
                    help=f"probe size of the maps simulated, one of {', '.join(map(str, SAMPLES))}")
    ap.add_argument("--decode-sample", type=nonneg_int, default=0,
                    help="simulate this many evenly spaced decode steps, scaled to all (0, the default: every step; "
                         "a minute on a 2-vCPU VM)")
    args = ap.parse_args()
    args.out = Path(args.out)
    if args.throughput_sample not in SAMPLES:
        ap.error(f"--throughput-sample {args.throughput_sample}: one of the probe sizes {', '.join(map(str, SAMPLES))}")
    if args.batch < max(CLUSTERS, args.throughput_sample):
        ap.error(f"--batch {args.batch}: at least {max(CLUSTERS, args.throughput_sample)} requests (the "
                 f"{CLUSTERS} clusters and the {args.throughput_sample}-prompt probe come from the batch)")
    args.out.mkdir(parents=True, exist_ok=True)  # before the work: a folder that cannot be made fails now
    t0 = time.perf_counter()
    hits, runs = [], []
    for model, routing in tqdm(MODELS.items(), desc="models", unit="model"):
        h, r = study_model(model, routing, args.batch, args.seeds, args.throughput_sample, args.decode_sample)
        hits += h
        runs += r
    hit_df, run_df = pd.DataFrame(hits), pd.DataFrame(runs)
    write_atomic(args.out / "hit_ratio.csv", lambda tmp: hit_df.to_csv(tmp, index=False))
    write_atomic(args.out / "hit_ratio_throughput.csv", lambda tmp: run_df.to_csv(tmp, index=False))
    plot(hit_df, args.out / "hit_ratio.png")
    table = (hit_df[hit_df["method"].isin(["eas", "uniform"])].groupby(["model", "method", "sample"])["hit_ratio"]
             .agg(["mean", "std"]).round(3).reset_index())
    fixed = hit_df[hit_df["method"].isin(["oracle", "random"])].groupby(["model", "method"])["hit_ratio"].agg(
        ["mean", "std"]).round(3).reset_index()
    md = ["# Expert hit ratio: EAS vs uniform sampling, random and the oracle", "",
          f"Command: `python experiments/hit_ratio_study.py --batch {args.batch} --seeds {args.seeds} "
          f"--throughput-sample {args.throughput_sample} --decode-sample {args.decode_sample}`; "
          f"{time.perf_counter() - t0:.0f} s on {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}).",
          "",
          "## Hit ratio by probe size (mean, std over seeds)", "", markdown_table(table), "",
          "## Oracle and random", "", markdown_table(fixed), "",
          f"## Simulated coxmoe throughput on {SYSTEM} with each map", "", markdown_table(run_df)]
    write_atomic_text(args.out / "hit_ratio.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    run_script(main, "hit_ratio_study")
