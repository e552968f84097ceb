"""Wall time of a sweep with 1 and with N local workers, and the speedup (issue 6's fig7 benchmark).

    python benchmarks/sweep_speed.py [--spec experiments/specs/fig7.yaml] [--workers 1 2]

Each worker count runs in a fresh interpreter with an empty results directory and an empty on-disk trace cache,
so every point and every trace is built again: a run in this process would hand the next one its in-memory trace
cache (forked workers inherit it), and the first run's trace files would serve the second, which once printed a
7.5x speedup on 2 workers of 2 CPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments.cli.common import ScriptParser, positive_int

ROOT = Path(__file__).resolve().parents[1]

RUNNER = """
import json, sys, time
from experiments.sweep.run import run_local
from experiments.sweep.spec import load_spec
from experiments.sweep.store import ResultStore

spec, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
points = load_spec(spec)
store = ResultStore(out)
t0 = time.perf_counter()
summary = run_local(points, store, workers, progress=False)
wall = time.perf_counter() - t0
store.close()
print("RESULT " + json.dumps({"points": len(points), "wall_s": wall, "ok": summary.ok, "failed": summary.failed}))
"""


def run_once(spec: str, workers: int) -> dict:
    """One sweep from scratch in its own interpreter: its results, traces and caches are its own."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "COXMOE_TRACE_DIR": str(Path(tmp) / "traces")}
        done = subprocess.run([sys.executable, "-c", RUNNER, spec, str(Path(tmp) / "out"), str(workers)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if done.returncode or line is None:
        sys.exit(f"sweep_speed: the {workers}-worker run failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    ap = ScriptParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="experiments/specs/fig7.yaml")
    ap.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2], help="worker counts, each run once")
    args = ap.parse_args()
    counts = sorted(set(args.workers))
    times = {}
    for workers in counts:
        r = run_once(str(Path(args.spec).resolve()), workers)
        times[workers] = r["wall_s"]
        print(f"{r['points']} points, {workers} worker(s): {r['wall_s']:.1f} s ({r['ok']} ok, {r['failed']} failed)")
    base = counts[0]
    for workers in counts:
        print(f"speedup with {workers} worker(s) over {base}: {times[base] / times[workers]:.2f}x")


if __name__ == "__main__":
    main()
