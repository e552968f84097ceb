"""Error of `--decode-sample N` against simulating every decode step, on a few grid points.

    python benchmarks/decode_sample_error.py [--sample 16]

For each point and policy: throughput with all decode steps, with N sampled steps, the relative error, and
the wall time of both. The policies search in both runs (their re-scoring always samples 4 steps), so the
same configuration is compared.
"""

from __future__ import annotations

import time

from experiments.cli.common import ScriptParser, positive_int, run_script
from sim.api import resolve_model, resolve_routing, simulate

POINTS = (("mixtral-8x7b", "a100-80g-8452y", 97, 256, "table:mixtral-8x7b"),
          ("deepseek-v2-lite", "h100-80g-8452y", 800, 256, "zipf:1.0"),
          ("qwen3-30b-a3b", "rtx6000ada-8452y", 97, 256, "zipf:1.0"))
POLICIES = ("coxmoe", "moe-lightning", "flexgen")


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=positive_int, default=16)
    args = parser.parse_args()
    print(f"{'model':>17} {'system':>17} {'p/g':>8} {'policy':>14} {'all steps':>10} {'sampled':>10} {'error':>7} "
          f"{'wall all':>9} {'wall smp':>9}")
    for model, system, prompt, gen, routing in POINTS:
        m = resolve_model(model)
        _, trace, _ = resolve_routing(m, 1024, prompt, gen, None, routing, 0)
        for policy in POLICIES:
            opts = {"cpu_attention": "on", "kv_gpu_percent": "0"} if policy == "flexgen" else {}
            t0 = time.perf_counter()
            full = simulate(m, system, policy, trace=trace, policy_options=opts)
            t1 = time.perf_counter()
            smp = simulate(m, system, policy, trace=trace, policy_options=opts, decode_sample=args.sample)
            t2 = time.perf_counter()
            err = smp.throughput_tok_s / full.throughput_tok_s - 1
            print(f"{model:>17} {system:>17} {prompt:>4}/{gen:<3} {policy:>14} {full.throughput_tok_s:>10.1f} "
                  f"{smp.throughput_tok_s:>10.1f} {err:>+7.2%} {t1 - t0:>9.1f} {t2 - t1:>9.1f}")


if __name__ == "__main__":
    run_script(main, "decode_sample_error")
