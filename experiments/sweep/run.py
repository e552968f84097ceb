"""Run a sweep's pending points on a local process pool, writing each result the moment it finishes."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from experiments.sweep.spec import SweepPoint
from experiments.sweep.store import ResultStore


@dataclass(frozen=True)
class SweepSummary:
    total: int
    skipped: int
    ok: int
    failed: int
    wall_s: float


def run_point(config: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None, float]:
    """Simulate one resolved point: (metrics, None, wall) or (None, one-line error, wall). Never raises, so one
    bad point cannot stop a sweep."""
    t0 = time.perf_counter()
    try:
        from sim.api import simulate

        result = simulate(**config)
        return result.to_dict(), None, time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - recorded as the point's failure
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{at}", \
            time.perf_counter() - t0


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_local(points: Iterable[SweepPoint], store: ResultStore, workers: int, progress: bool = True) -> SweepSummary:
    """Run the points not yet finished in `store`; workers=1 runs them in this process, in order."""
    points = list(points)
    done = store.finished()
    pending = [p for p in points if p.key not in done]
    ok = failed = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(pending), desc="sweep", unit="pt", disable=None if progress else True)

    def finish(point: SweepPoint, outcome: tuple[dict[str, Any] | None, str | None, float]) -> None:
        nonlocal ok, failed
        metrics, error, wall = outcome
        store.record(point.key, point.config, metrics, error, wall)
        ok, failed = ok + (error is None), failed + (error is not None)
        bar.set_postfix(ok=ok, failed=failed, skipped=len(points) - len(pending))
        bar.update()

    try:
        if workers <= 1:
            for point in pending:
                finish(point, run_point(point.config))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(run_point, p.config): p for p in pending}
                for fut in as_completed(futures):
                    finish(futures[fut], fut.result())
    finally:
        bar.close()
    return SweepSummary(len(points), len(points) - len(pending), ok, failed, time.perf_counter() - t0)
