"""Trace synthesis, numpy against numba's kernels (`traces/topk_kernels.py`): ns per drawn id, the bytes compared,
and what loading numba costs a fresh process (`traces.jit.LOAD_S`, which the savings per id must repay).

Each case synthesises one trace (prompts kept as counts, as a simulation asks) in a fresh interpreter per form, so
neither profits from the other's caches; `--repeats` takes the best of several. Three forms: all numpy
(COXMOE_JIT=off), compiled draws with numpy's prompt counting on the store thread (`draws`), and both compiled
(`numba`, the default where it pays): the last two apart give the prompt-count kernel's saving per prompt id
(`traces.jit.SAVED_NS_PROMPT_COUNT`).

    python benchmarks/trace_synthesis_speed.py [--repeats 2]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from experiments.cli.common import ScriptParser, positive_int, run_script

CASES = (  # (model, layers, experts, top-k, routing, requests, prompt, generated)
    ("mixtral-8x7b", 32, 8, 2, "table:mixtral-8x7b", 1024, 800, 256),
    ("qwen3-30b-a3b", 48, 128, 8, "uniform", 1024, 800, 256),
    ("qwen3-30b-a3b", 48, 128, 8, "zipf:1.0", 1024, 800, 256),
    ("deepseek-v2-lite", 26, 64, 6, "zipf:1.0", 1024, 800, 256),
    ("qwen3-30b-a3b", 48, 128, 8, "uniform", 4096, 800, 256),
)

RUN = """
import hashlib, json, time
t0 = time.perf_counter()
import numpy as np
from traces.synth import SynthConfig, generate_trace
model, layers, experts, k, routing, requests, prompt, gen = {case!r}
if {draws_only!r}:  # prompt counting stays numpy's (COXMOE_JIT=on compiles everything else)
    from traces import jit
    _asked = jit.worth_it
    jit.worth_it = lambda ids, saving, paid=False: saving != jit.SAVED_NS_PROMPT_COUNT and _asked(ids, saving, paid)
cfg = SynthConfig(model, layers, experts, k, routing, seed=0)
t1 = time.perf_counter()
tr = generate_trace(cfg, np.full(requests, prompt), np.full(requests, gen), prompt_counts=True)
t2 = time.perf_counter()
digest = hashlib.sha256(tr.experts.tobytes() + tr.prompt_counts.tobytes()).hexdigest()[:16]
print('RESULT ' + json.dumps({{'import_s': t1 - t0, 'draw_s': t2 - t1, 'digest': digest}}))
"""

LOAD = """
import numpy as np
from traces import synth
import time
t = time.perf_counter()
synth._sample_topk(np.random.default_rng(0), synth._InverseCdf(np.ones(8)), 64, 2, 8, np.dtype(np.uint8),
                   compiled=True)
print(time.perf_counter() - t)
"""


def run(case: tuple, mode: str) -> dict:
    """One synthesis in a fresh interpreter: mode `off` (numpy), `draws` (compiled draws only) or `on`."""
    env = {**os.environ, "COXMOE_JIT": "on" if mode == "draws" else mode, "COXMOE_TRACE_DIR": "off"}
    out = subprocess.run([sys.executable, "-c", RUN.format(case=case, draws_only=mode == "draws")], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=2, help="runs per form, best kept (default 2)")
    args = parser.parse_args()
    run(CASES[0], "on")  # compile the kernels into numba's disk cache first: a user's first run pays this once
    print(f"{'case':52s} {'numpy s':>8s} {'draws s':>8s} {'numba s':>8s} {'ns/id':>13s} {'prompt ns':>9s}  bytes")
    for case in CASES:
        model, layers, _, k, routing, requests, prompt, gen = case
        ids = requests * (prompt + gen - 1) * layers * k
        prompt_ids = requests * prompt * layers * k
        best = {}
        for mode in ("off", "draws", "on"):
            runs = [run(case, mode) for _ in range(args.repeats)]
            best[mode] = min(runs, key=lambda r: r["draw_s"])
        same = len({b["digest"] for b in best.values()}) == 1
        name = f"{model} {routing} B={requests} {prompt}/{gen} ({ids / 1e6:.0f} M ids)"
        off, draws, on = (best[m]["draw_s"] for m in ("off", "draws", "on"))
        print(f"{name:52s} {off:8.2f} {draws:8.2f} {on:8.2f} {off / ids * 1e9:5.1f} -> {on / ids * 1e9:4.1f} "
              f"{(draws - on) / prompt_ids * 1e9:9.2f}  {'same' if same else 'DIFFER'}")
    load = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, check=True).stdout.strip()
    print(f"numba import and cached kernels, once a process: {float(load):.2f} s")


if __name__ == "__main__":
    run_script(main, "trace_synthesis_speed")
