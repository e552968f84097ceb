"""How close each synthesis preset lands on the published routing statistics it targets.

Per preset: one trace (requests x (prompt 97 + output 128), seed 0) measured with `trace_stats` (the same code as
`coxmoe trace stats`): first-choice repeat rate (layer 0, middle layers, mean), hottest expert's share of
selections (median over layers), share of experts covering 90% of selections (median), LRU hit rate of caches
of 2/3/4 experts per layer for top-2 models, 2k/4k for top-k (mean over layers).

    python experiments/synth_presets_table.py --out docs/results [--requests 128]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.cli.common import ScriptParser, output_dir, positive_int, run_script
from experiments.tables import markdown_table
from sim.atomic_files import write_atomic, write_atomic_text


def measure(name: str, requests: int, seed: int = 0) -> list[dict]:
    """Rows of (preset, statistic, target, measured) for one preset."""
    from sim.specs import load_model
    from traces import generate_trace, trace_stats
    from traces.synth_presets import coverage_share, synth_preset

    preset, m = synth_preset(name), load_model(name)
    cfg = preset.config(m.num_moe_layers, m.num_experts, m.top_k, seed=seed)
    trace = generate_trace(cfg, np.full(requests, 97), np.full(requests, 128))
    st = trace_stats(trace, lru_max_tokens=40_000)
    same, pop = np.asarray(st.same_top1_rate), np.asarray(st.popularity)
    lru = np.asarray(st.lru_hit_rate).mean(axis=0)
    L = m.num_moe_layers
    measured = {"same_top1_layer0": same[0], "same_top1_middle": same[L // 4: 3 * L // 4].mean(),
                "same_top1_mean": same.mean(), "hottest_share": float(np.median(pop.max(axis=1))),
                "coverage90_share": float(np.median([coverage_share(row, 0.9) for row in pop]))}
    for c in (2, 3, 4) if m.top_k == 2 else (2 * m.top_k, 4 * m.top_k):  # caches smaller than top-k never hit
        measured[f"lru_hit_c{c}"] = lru[c - 1]
    return [{"preset": name, "routing": cfg.routing, "statistic": k, "target": preset.targets.get(k, np.nan),
             "measured": float(v)} for k, v in measured.items()]


def main() -> None:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=output_dir, default="docs/results")
    ap.add_argument("--requests", type=positive_int, default=128)
    args = ap.parse_args()
    args.out = Path(args.out)
    from traces.synth_presets import PRESETS

    df = pd.DataFrame([row for name in PRESETS for row in measure(name, args.requests)])
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "synth_presets.csv", lambda tmp: df.to_csv(tmp, index=False))
    text = (f"# Synthesis presets against published statistics\n\nCommand: `python experiments/synth_presets_table.py"
            f" --requests {args.requests}` (seed 0; blank target: not published for that model)\n\n"
            + markdown_table(df) + "\n")
    write_atomic_text(args.out / "synth_presets.md", text)
    print(text)


if __name__ == "__main__":
    run_script(main, "synth_presets_table")
