"""Trace format v1 speed: synthesise, save, load (with full validation) and summarise a million-token trace.

    python benchmarks/trace_io.py [--model mixtral-8x7b] [--requests 1024] [--prompt-len 800] [--gen-len 256]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.cli.common import ScriptParser, positive_int, run_script
from sim.specs import load_model
from traces import SynthConfig, generate_trace, load_trace, save_trace, trace_stats


def main() -> None:
    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--requests", type=positive_int, default=1024)
    parser.add_argument("--prompt-len", type=positive_int, default=800)
    parser.add_argument("--gen-len", type=positive_int, default=256)
    parser.add_argument("--routing", help="any --routing form (default: Mixtral's published table for Mixtral, "
                        "zipf:1.0 for other models, which that table does not fit)")
    args = parser.parse_args()
    m = load_model(args.model)
    routing = args.routing or ("table:mixtral-8x7b" if m.name == "mixtral-8x7b" else "zipf:1.0")
    cfg = SynthConfig(m.name, m.num_moe_layers, m.num_experts, m.top_k, routing, 0.2, 0)
    t0 = time.perf_counter()
    trace = generate_trace(cfg, np.full(args.requests, args.prompt_len), np.full(args.requests, args.gen_len))
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_trace(trace, Path(tmp) / "t.npz")
        t2 = time.perf_counter()
        back = load_trace(path)
        loaded = time.perf_counter()
        size = path.stat().st_size
    t3 = time.perf_counter()  # the stats' clock starts after the temporary folder is removed
    stats = trace_stats(back)
    t4 = time.perf_counter()
    print(f"{m.name}: {trace.num_tokens} routed tokens x {m.num_moe_layers} layers x top-{m.top_k} "
          f"({trace.experts.nbytes / 1e6:.0f} MB of ids, file {size / 1e6:.0f} MB), routing {routing}")
    print(f"synthesise {t1 - t0:.2f} s, save {t2 - t1:.2f} s, load + validate {loaded - t2:.2f} s, "
          f"stats {t4 - t3:.2f} s (LRU over {stats.lru_tokens} tokens)")


if __name__ == "__main__":
    run_script(main, "trace_io")
