"""Top-k synthesis: the two repeat checks (`traces/synth.py`) timed on one chunk, to place COMPARE_MAX_TOP_MASS.

    python benchmarks/topk_repeat_check.py [--chunks 4]

For each (experts, top-k, Zipf alpha): the top-k mass of the popularity, which check the synthesis picks, and
the best of two runs of each check over `--chunks` chunks of 65,536 rows (both draw the same ids, checked).
"""

from __future__ import annotations

import time

import numpy as np

from experiments.cli.common import ScriptParser, positive_int, run_script
from traces.synth import _compare_columns, _InverseCdf, _topk_chunk

SHAPES = ((64, 6), (128, 8), (160, 6), (256, 8))
ALPHAS = (0.8, 1.0, 1.5, 2.0, 3.0)


def timed(draw_ids: _InverseCdf, experts: int, k: int, chunks: int, by_columns: bool) -> tuple[float, bytes]:
    best, ids = float("inf"), b""
    for _ in range(2):
        rng = np.random.default_rng(1)
        t = time.perf_counter()
        out = [_topk_chunk(rng, draw_ids, 1 << 16, k, experts, np.dtype(np.uint8), by_columns) for _ in range(chunks)]
        best = min(best, time.perf_counter() - t)
        ids = np.concatenate(out).tobytes()
    return best, ids


def main() -> None:
    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=positive_int, default=4)
    args = parser.parse_args()
    print(f"{'experts':>7} {'k':>2} {'alpha':>5} {'top-k mass':>10} {'picked':>8} {'table s':>8} {'columns s':>9}")
    for experts, k in SHAPES:
        for alpha in ALPHAS:
            probs = 1.0 / np.arange(1, experts + 1) ** alpha
            probs /= probs.sum()
            draw_ids = _InverseCdf(probs)
            table, a = timed(draw_ids, experts, k, args.chunks, False)
            columns, b = timed(draw_ids, experts, k, args.chunks, True)
            assert a == b, "the two checks drew different ids"
            picked = "columns" if _compare_columns(probs, k) else "table"
            print(f"{experts:>7} {k:>2} {alpha:>5} {np.sort(probs)[-k:].sum():>10.2f} {picked:>8} {table:>8.3f} "
                  f"{columns:>9.3f}")


if __name__ == "__main__":
    run_script(main, "topk_repeat_check")
