"""Wall time of a sweep with 1 and with N local workers, and the speedup (issue 6's fig7 benchmark).

    python benchmarks/sweep_speed.py [--spec experiments/specs/fig7.yaml] [--workers 1 2]

Each run starts from an empty results directory, so every point is simulated.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from experiments.sweep.run import run_local
from experiments.sweep.spec import load_spec
from experiments.sweep.store import ResultStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="experiments/specs/fig7.yaml")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    points = load_spec(args.spec)
    times = {}
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as out:
            store = ResultStore(out)
            t0 = time.perf_counter()
            summary = run_local(points, store, workers)
            times[workers] = time.perf_counter() - t0
            store.close()
        print(f"{len(points)} points, {workers} worker(s): {times[workers]:.1f} s "
              f"({summary.ok} ok, {summary.failed} failed)")
    base = times[min(times)]
    for workers, wall in sorted(times.items()):
        print(f"speedup with {workers} worker(s): {base / wall:.2f}x")


if __name__ == "__main__":
    main()
