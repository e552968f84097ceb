"""Search time per policy for one grid point: the search (analytic ranking and simulated re-scoring) and the wall.

    python benchmarks/search_time.py [--model qwen3-30b-a3b] [--system rtx6000ada-8452y] [--prompt-len 800]
                                     [--gen-len 256] [--batch 1024]

The trace is synthesised once and shared. Columns: the search space's candidates and how many were simulated;
"search s", the search's own clock (`SearchReport.search_s`): the re-scoring simulations of the best-ranked
candidates (on `sim.search.RESCORE_DECODE_SAMPLE` = 4 sampled decode steps, fewer under a smaller --decode-sample),
then the winner rebuilt and simulated on --decode-sample steps (0: all); "total wall s" adds the analytic ranking
(building the search space) and the point's set-up. For ranking, plan builds and engine apart, use
`design_space_speed.py --breakdown`.
"""

from __future__ import annotations

import time

from experiments.cli.common import ScriptParser, nonneg_int, positive_int, run_script
from sim.api import resolve_model, resolve_routing, simulate
from sim.compare import COMPARED


def main() -> None:
    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--system", default="rtx6000ada-8452y")
    parser.add_argument("--batch", type=positive_int, default=1024)
    parser.add_argument("--prompt-len", type=positive_int, default=800)
    parser.add_argument("--gen-len", type=positive_int, default=256)
    parser.add_argument("--routing", default="zipf:1.0")
    parser.add_argument("--decode-sample", type=nonneg_int, default=16)
    args = parser.parse_args()
    model = resolve_model(args.model)
    t0 = time.perf_counter()
    _, trace, _ = resolve_routing(model, args.batch, args.prompt_len, args.gen_len, None, args.routing, 0)
    print(f"{args.model} on {args.system}, batch {args.batch}, prompt {args.prompt_len}, output {args.gen_len}, "
          f"routing {args.routing}: trace synthesis {time.perf_counter() - t0:.1f} s")
    print(f"{'policy':>15} {'candidates':>10} {'simulated':>9} {'search s':>9} {'total wall s':>12} {'tok/s':>9}")
    for policy in COMPARED:
        t1 = time.perf_counter()
        try:
            r = simulate(model, args.system, policy, trace=trace, decode_sample=args.decode_sample)
        except ValueError as exc:
            print(f"{policy:>15} does not run: {str(exc).split(':')[0]}")
            continue
        wall = time.perf_counter() - t1
        s = r.search or {"candidates": 1, "simulated": 0, "search_s": 0.0}
        print(f"{policy:>15} {s['candidates']:>10} {s['simulated']:>9} {s['search_s']:>9.2f} {wall:>12.2f} "
              f"{r.throughput_tok_s:>9.1f}")


if __name__ == "__main__":
    run_script(main, "search_time")
