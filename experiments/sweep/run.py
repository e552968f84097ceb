"""Run a sweep's pending points on a local process pool or a Ray cluster, writing each result the moment it
finishes."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from experiments.sweep import ENGINES
from experiments.sweep.spec import SweepPoint, changed_inputs, rebased
from experiments.sweep.store import ResultStore
from sim.config import SimConfig, default_workers
from sim.errors import SimInputError
from traces.disk_cache import TRACE_DIR_ENV, TRACE_DIR_GIB_ENV, default_trace_dir, disk_cache_from_env
from traces.limits import LIMIT_ENV

Outcome = tuple[dict[str, Any] | None, str | None, float]


@dataclass(frozen=True)
class SweepSummary:
    total: int
    skipped: int
    ok: int
    failed: int
    wall_s: float
    stale: int = 0  # points finished earlier by other code or library versions, simulated again


_DIGESTS: dict[tuple, str] = {}  # input file digests in this worker process, per (path, size, mtime)


def run_point(config: dict[str, Any], inputs: dict[str, str] | None = None, base: str | None = None) -> Outcome:
    """Simulate one resolved point: (metrics, None, wall) or (None, one-line error, wall). Never raises, so one
    bad point cannot stop a sweep. `inputs`: the digests the point was keyed by, checked against the files before
    they are read; `base`: the driver's folder, against which relative paths are read (a cluster's worker)."""
    t0 = time.perf_counter()
    try:
        from sim.api import simulate
        from sim.config import SimConfig

        if base is not None:
            config = rebased(config, base)
        if inputs:
            reason = changed_inputs(config, inputs, _DIGESTS)
            if reason is not None:
                return None, f"InputChanged: {reason}", time.perf_counter() - t0
        result = simulate(SimConfig.from_point(config))
        return result.to_dict(), None, time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - recorded as the point's failure
        return None, _one_line(exc), time.perf_counter() - t0


def trace_builds(points: Iterable[SweepPoint]) -> list[dict[str, Any]]:
    """One point's config per synthetic trace the points will read from the on-disk cache and that is not there
    yet, the largest trace first: a pool builds them in parallel before the points run, instead of two workers
    drawing the same trace at once or one worker drawing the biggest last."""
    from sim.api import trace_job

    jobs: dict[str, tuple[int, dict[str, Any]]] = {}
    for point in points:
        try:
            job = trace_job(SimConfig.from_point(point.config))
        except Exception:  # noqa: BLE001 - the point's own run reports it
            job = None
        if job is not None and job.key not in jobs:
            jobs[job.key] = (job.size, point.config)
    return [config for _, config in sorted(jobs.values(), key=lambda j: -j[0])]


def build_trace(config: dict[str, Any]) -> None:
    """Pool task: synthesise a point's trace into the on-disk cache (errors are left to the point's own run)."""
    from sim.api import build_trace as build

    with suppress(Exception):  # the point's own run reports it
        build(SimConfig.from_point(config))


def _one_line(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{at}"


MAX_WORKERS_PER_CPU = 4  # local sweep processes beyond this only add memory (each holds a simulation)


def _drive(points: Iterable[SweepPoint], store: ResultStore,
           execute: Callable[[list[SweepPoint]], Iterator[tuple[SweepPoint, Outcome]]],
           progress: bool, desc: str) -> SweepSummary:
    """Skip finished points, run the rest through `execute` (which yields outcomes as they complete), and commit
    each outcome to the store before taking the next."""
    points = list(points)
    done = store.finished()
    pending = [p for p in points if p.key not in done]
    stale = len(store.stale() & {p.key for p in pending})
    if stale and progress:
        print(f"{desc}: {stale} point(s) finished earlier by other code or library versions: simulating them again",
              file=sys.stderr, flush=True)
    ok = failed = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(pending), desc=desc, unit="pt", disable=None if progress else True)
    # Without a terminal (nohup, CI, a batch job) tqdm stays silent: log a line per tenth of the sweep instead.
    log_every = max(1, len(pending) // 10) if progress and bar.disable else 0
    outcomes = execute(pending)
    try:
        for point, (metrics, error, wall) in outcomes:
            store.record(point.key, point.config, metrics, error, wall)
            ok, failed = ok + (error is None), failed + (error is not None)
            bar.set_postfix(ok=ok, failed=failed, skipped=len(points) - len(pending))
            bar.update()
            done = ok + failed
            if log_every and (done % log_every == 0 or done == len(pending)):
                elapsed = time.perf_counter() - t0
                eta = elapsed / done * (len(pending) - done)
                print(f"{desc}: {done}/{len(pending)} done ({ok} ok, {failed} failed, "
                      f"{len(points) - len(pending)} skipped), {elapsed:.0f} s elapsed, about {eta:.0f} s left",
                      file=sys.stderr, flush=True)
    finally:
        bar.close()
        close = getattr(outcomes, "close", None)
        if close is not None:  # an interrupted sweep stops its workers here, not when the generator is collected
            close()
    return SweepSummary(len(points), len(points) - len(pending), ok, failed, time.perf_counter() - t0, stale)


PR_SET_PDEATHSIG = 1  # linux/prctl.h
WORKER_DIED = ("a sweep worker process died before this point finished (killed, or out of memory?); rerun to retry "
               "it, or run it alone with --workers 1 to see why")


def _stop_pool(pool: ProcessPoolExecutor, wait: bool) -> None:
    """Shut the pool down; unless `wait` (the sweep ended normally), cancel what has not started and terminate
    the workers, so an interrupted sweep exits at once (a second Ctrl-C during a waiting shutdown would leave
    idle workers that the interpreter's exit then waits for without end)."""
    if wait:
        pool.shutdown(wait=True)
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())  # CPython's pool keeps them here
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        with suppress(Exception):
            proc.terminate()
    for proc in processes:
        with suppress(Exception):
            proc.join(timeout=5)


def _die_with_parent() -> None:
    """Pool-worker initializer: on Linux, ask the kernel to SIGTERM this worker when its parent dies, so a sweep
    killed with SIGKILL leaves no workers running its points (elsewhere a worker ends at its next task)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # no prctl: the worker exits when the pool's pipe closes
            pass
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def run_local(points: Iterable[SweepPoint], store: ResultStore, workers: int, progress: bool = True) -> SweepSummary:
    """Run the points not yet finished in `store`; workers=1 runs them in this process, in order."""

    def execute(pending: list[SweepPoint]) -> Iterator[tuple[SweepPoint, Outcome]]:
        if workers <= 1:
            for point in pending:
                yield point, run_point(point.config, point.inputs)
            return
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent)
        finished = False
        try:
            builds = trace_builds(pending)  # each synthetic trace once, largest first, before the points
            if builds and progress:
                print(f"sweep: drawing {len(builds)} synthetic trace(s) first, one per workload", file=sys.stderr,
                      flush=True)
            for config in builds:
                pool.submit(build_trace, config)
            futures = {pool.submit(run_point, p.config, p.inputs): p for p in pending}
            told = False
            for fut in as_completed(futures):
                try:
                    outcome = fut.result()
                except BrokenProcessPool:  # a worker was killed (out of memory?): every unfinished point fails
                    if not told:
                        told = True
                        print(f"sweep: {WORKER_DIED}; the unfinished points are recorded as failed", file=sys.stderr,
                              flush=True)
                    outcome = None, WORKER_DIED, 0.0
                yield futures[fut], outcome
            finished = True
        finally:  # interrupted (Ctrl-C) or abandoned: stop the workers now, not after the points they run
            _stop_pool(pool, wait=finished)

    return _drive(points, store, execute, progress, "sweep")


def run_sweep(points: Iterable[SweepPoint], store: ResultStore, engine: str = "local", workers: int | None = None,
              address_flag: str | None = None, progress: bool = True) -> SweepSummary:
    """Run the pending points on `engine` (one of ENGINES): a local pool of `workers` processes (default: the
    CPUs this process may use), or Ray at `address_flag`, else $RAY_ADDRESS, else a local Ray instance."""
    check_request(engine, workers, address_flag)
    cpus = default_workers()
    # Workers share synthesised traces through the sweep directory (and a rerun finds them there).
    with default_trace_dir(store.path.parent / "traces"):
        disk_cache_from_env()  # a bad setting is one error here, not a failure in every worker
        if engine == "ray":
            return run_ray(points, store, workers, ray_address(address_flag), progress)
        return run_local(points, store, workers or cpus, progress)


def check_request(engine: str, workers: int | None, address_flag: str | None) -> None:
    """What a sweep run is refused for before anything is written (`cmd_sweep` calls it before it makes the
    results store): an unknown engine; --ray-address without the Ray engine; more workers than the local cap (a
    local pool, or a local Ray instance: 64 had started 60 Ray processes on 2 CPUs); and a bad size setting every
    worker would read from the environment ($COXMOE_MAX_GIB, $COXMOE_TRACE_CACHE_MIB, $COXMOE_TRACE_DIR_GIB),
    which had failed every point."""
    from sim.api import TRACE_CACHE
    from traces.limits import env_size_bytes, memory_limit_bytes

    if engine not in ENGINES:
        raise SimInputError(f"unknown sweep engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "local" and address_flag:
        raise SimInputError("--ray-address joins a Ray cluster: it needs --engine ray")
    cpus = default_workers()
    local = engine == "local" or ray_address(address_flag) is None  # a local pool or a local Ray instance
    if local and workers is not None and workers > MAX_WORKERS_PER_CPU * cpus:
        raise SimInputError(f"--workers {workers}: this machine has {cpus} CPUs for sweeps; at most "
                            f"{MAX_WORKERS_PER_CPU * cpus} local workers (each simulation takes up to a few GB)")
    memory_limit_bytes()
    _ = TRACE_CACHE.max_bytes
    env_size_bytes(TRACE_DIR_GIB_ENV, 1, 2**30, "GiB")
    if engine == "ray" and ray_address(address_flag) is not None:
        check_ray_address(ray_address(address_flag))


RAY_CONNECT_TIMEOUT_S = 3.0
RAY_WAIT_BATCH = 256  # results taken per ray.wait call (it returns sooner when its 1 s timeout passes)


def check_ray_address(address: str) -> None:
    """Refuse, before the store is made, a cluster address that is not HOST:PORT (or ray://HOST:PORT, `auto`,
    `local`) or where nothing accepts a connection: Ray itself retried an unreachable one for minutes, and a
    malformed one was a traceback."""
    import re
    import socket

    if address in ("auto", "local"):
        return
    m = re.fullmatch(r"(?:ray://)?(\[[0-9a-fA-F:]+\]|[^:/\s\[\]]+):(\d{1,5})", address)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise SimInputError(f"--ray-address {address!r}: not HOST:PORT (or ray://HOST:PORT, auto, local)")
    host, port = m.group(1).strip("[]"), int(m.group(2))
    try:
        socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise SimInputError(f"--ray-address {address}: nothing accepts a connection there within "
                            f"{RAY_CONNECT_TIMEOUT_S:.0f} s ({exc.strerror or type(exc).__name__})") from None


def ray_address(flag: str | None) -> str | None:
    """The cluster to join: the --ray-address flag, else RAY_ADDRESS, else None (start a local Ray instance)."""
    return flag or os.environ.get("RAY_ADDRESS") or None


def run_ray(points: Iterable[SweepPoint], store: ResultStore, workers: int | None = None,
            address: str | None = None, progress: bool = True) -> SweepSummary:
    """Run the pending points as Ray tasks: join the cluster at `address`, or start a local instance with
    `workers` CPUs. Results come back to this process, which alone writes the store, so a dead worker or a lost
    node costs only its unfinished points (recorded as failed, retried by the next run)."""
    try:
        import ray
    except ImportError:
        raise SimInputError("--engine ray needs Ray: pip install 'cox-moe[ray]'") from None
    import experiments
    import sim
    import traces

    started_here = not ray.is_initialized()
    # The memory limit (--max-gib) and the trace cache travel as environment variables, to remote workers too.
    env_vars = {name: os.environ[name] for name in (LIMIT_ENV, TRACE_DIR_ENV, TRACE_DIR_GIB_ENV)
                if os.environ.get(name)}
    if started_here:
        if address:
            # Ship this checkout's packages so the cluster's workers run the same code as the driver.
            try:
                ray.init(address=address, log_to_driver=False,
                         runtime_env={"py_modules": [sim, traces, experiments], "env_vars": env_vars})
            except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
                raise SimInputError(f"--ray-address {address}: cannot join the cluster ({_one_line(exc)})") from None
        else:
            ray.init(num_cpus=workers or default_workers(), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env_vars})
    remote_point = ray.remote(num_cpus=1, max_retries=1)(run_point)
    # A local instance's workers share this machine's trace directory: draw each trace once, first (as the local
    # pool does). A cluster's nodes may not share it, so there each point draws or reads its own.
    remote_build = ray.remote(num_cpus=1, max_retries=0)(build_trace) if started_here and not address else None

    def execute(pending: list[SweepPoint]) -> Iterator[tuple[SweepPoint, Outcome]]:
        if remote_build is not None:
            for config in trace_builds(pending):
                remote_build.remote(config)
        base = str(Path.cwd()) if address else None  # a cluster's workers start elsewhere
        refs = {remote_point.remote(p.config, p.inputs, base): p for p in pending}
        waiting = list(refs)
        while waiting:
            # many results per call: one at a time scanned every pending ref each time (quadratic in the sweep)
            ready, waiting = ray.wait(waiting, num_returns=min(len(waiting), RAY_WAIT_BATCH), timeout=1.0)
            for ref in ready:
                try:
                    outcome = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a worker or node died: the point failed, the sweep goes on
                    outcome = (None, f"ray: {_one_line(exc)}", 0.0)
                yield refs[ref], outcome

    try:
        return _drive(points, store, execute, progress, "sweep[ray]")
    finally:
        if started_here:
            ray.shutdown()
