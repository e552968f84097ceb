"""Predicted against measured on the same plan and trace: the executor runs it, the simulator (with this
machine's profile) predicts it, `sim.metrics.compare_records` scores it per op class and end to end."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from executor.profile import TOKEN_GRID, covering, machine_differences, profile, recorded_fingerprint, recorded_readings
from executor.run import ExecutionResult, execute_plan
from executor.speed_probe import drift, mean_reading, speed_probe, spread
from executor.weights import ModelWeights
from sim.atomic_files import save_figure_file
from sim.cost.profile import ProfileCostModel
from sim.engine import EngineRecord, run_plan
from sim.errors import SimInputError
from sim.metrics import GPU_ON_CPU, UNTIMED_COPY, class_of, compare_records
from sim.plan import Plan
from sim.specs import ModelSpec
from sim.topology import UnitKind, topology_of
from traces import RoutingTrace


def median_record(records: list[EngineRecord], plan: Plan) -> EngineRecord:
    """Per-op median duration over repeated runs, each op started at its median start or, if later, when its
    stream's previous op and its dependencies end (medians taken apart can break both orders: an op starting
    before its dependency ended): robust to a noisy machine, and a schedule the plan allows."""
    median_start = np.median(np.stack([r.start_ns for r in records]), axis=0).astype(np.int64)
    dur = np.median(np.stack([r.end_ns - r.start_ns for r in records]), axis=0).astype(np.int64)
    start, end = np.empty_like(median_start), np.empty_like(median_start)
    stream_end: dict[str, int] = {}
    for i, op in enumerate(plan.ops):  # deps name earlier ops; a stream runs its ops in plan order
        begin = max(int(median_start[i]), stream_end.get(op.stream, 0), *(int(end[d]) for d in op.deps))
        start[i], end[i] = begin, begin + int(dur[i])
        stream_end[op.stream] = int(end[i])
    busy = {k: int(np.median([r.busy_ns[k] for r in records])) for k in records[0].busy_ns}
    return EngineRecord(start, end, busy, records[0].peak_bytes, 0)


def validate_plan(plan: Plan, weights: ModelWeights, trace: RoutingTrace, profile_dir: str | Path,
                  use_cuda: bool | None = None, warmup: int = 1, repeats: int = 3,
                  probe: bool = True) -> dict[str, Any]:
    """Measure (median of `repeats` runs after `warmup`), predict, compare. The result also carries per-op
    durations for plotting, how the profile's machine differs from this one (empty when it is this one), and
    (`probe`) the machine's speed now against when the profile was measured (`machine_speed`: the readings and
    their ratios, None where the profile has no reading), so drift between the two is told from model error."""
    for _ in range(warmup):
        execute_plan(plan, weights, trace, use_cuda=use_cuda)
    before = speed_probe() if probe else None
    runs = [execute_plan(plan, weights, trace, use_cuda=use_cuda) for _ in range(max(repeats, 1))]
    readings = [before, speed_probe()] if probe else None
    result = compare_runs(plan, runs, profile_dir)
    if readings is not None:
        result["machine_speed"] = _machine_speed(recorded_readings(profile_dir), readings)
    return result


def _machine_speed(at_profile: list[dict | None] | None, now: list[dict]) -> dict[str, Any]:
    """The mean readings when profiled and when validated (each window's before and after), their ratios (None
    without a profile reading), and `spread`: how far the validation's two readings, seconds apart, differ by
    themselves (None without a profile reading), which a ratio must exceed to count as drift. The profile's two
    readings are minutes apart, so theirs would count a slowdown during profiling as noise."""
    profile_mean = None if at_profile is None else mean_reading(at_profile)
    now_mean = mean_reading(now)
    return {"profile": profile_mean, "validation": now_mean, "ratios": drift(profile_mean, now_mean),
            "spread": None if profile_mean is None else spread([now])}


def validate_paired(cases: Sequence[tuple[Plan, RoutingTrace]], weights: ModelWeights, spec: ModelSpec,
                    profile_dir: str | Path, rounds: int = 5, max_tokens: int = 1024, progress: bool = True,
                    max_requests: int | None = None, max_kv: int | None = None, warmup: int = 1
                    ) -> list[dict[str, Any]]:
    """Profile this machine's CPU (at torch's current thread count) into `profile_dir` and validate every
    (plan, trace) case against it, interleaved: after each profile round every plan runs once (after `warmup`
    untimed runs each before the profile starts), so a shared machine's drift over minutes hits the profile's
    timings and the plans' measurements alike, and what is left of an error is the cost model's. One result
    per case, as `validate_plan` gives, with `paired: True`; the machine-speed readings are the profile's own
    (before and after its rounds, the same window as the runs)."""
    if rounds < 1:
        raise SimInputError(f"a paired validation needs at least one round, got {rounds}")
    require_unprofiled(profile_dir, "a paired validation profiles into a new folder")
    for plan, trace in cases:
        for _ in range(warmup):
            execute_plan(plan, weights, trace, use_cuda=False)
    runs: list[list[ExecutionResult]] = [[] for _ in cases]

    def run_cases(_round: int) -> None:
        for k, (plan, trace) in enumerate(cases):
            runs[k].append(execute_plan(plan, weights, trace, use_cuda=False))

    profile(spec, profile_dir, devices=("cpu",), rounds=rounds, max_tokens=max_tokens, progress=progress,
            max_requests=max_requests, max_kv=max_kv, between_rounds=run_cases, weights=weights)
    speed = recorded_readings(profile_dir)
    results = []
    for (plan, _), measured in zip(cases, runs, strict=True):
        result = compare_runs(plan, measured, profile_dir)
        result["paired"] = True
        if speed is not None:
            result["machine_speed"] = _machine_speed(speed, speed)
        results.append(result)
    return results


def grid_bounds(plans: Sequence[Plan]) -> dict[str, int]:
    """The profile grid `plans` need (`profile`'s max_tokens, max_requests, max_kv): no op holds more tokens than
    its workload's prompts together (up to the first grid value that covers them, so look-ups stay bracketed), no
    scope more requests than the batch, no cache more entries than the longest prompt plus the longest output. A
    larger grid only costs time (minutes on a small CPU)."""
    workloads = [plan.workload for plan in plans]
    tokens = max(int(w.prompt_lens.sum()) for w in workloads)
    return {"max_tokens": covering(TOKEN_GRID, tokens)[-1], "max_requests": max(w.batch for w in workloads),
            "max_kv": max(int(w.prompt_lens.max() + w.gen_lens.max()) for w in workloads)}


def require_unprofiled(profile_dir: str | Path, hint: str) -> None:
    """Refuse a folder that already holds a profile where a paired validation would profile into it (and so
    overwrite it); `hint` says what to do instead."""
    if Path(profile_dir).exists() and not Path(profile_dir).is_dir():
        raise SimInputError(f"{profile_dir} is a file, not a folder: {hint}")
    if (Path(profile_dir) / "profile.json").exists():
        raise SimInputError(f"{profile_dir} already holds a profile: {hint}")


def compare_runs(plan: Plan, runs: list[ExecutionResult], profile_dir: str | Path) -> dict[str, Any]:
    """The median of measured `runs` of `plan` against the simulator's prediction with the profile."""
    measured = runs[0]
    measured.record = median_record([r.record for r in runs], plan)
    cost = ProfileCostModel(plan.system, profile_dir, plan.model, float(plan.workload.prompt_lens.mean()),
                            threads=torch.get_num_threads())
    # the executor launches every expert op as its own kernels, whatever runtime the plan's policy stands for
    predicted = run_plan(dataclasses.replace(plan, expert_kernels="per_expert"), cost)
    apart = apart_streams(plan, measured)
    result = compare_records(plan, measured.record, predicted, apart)
    result.update(measured.to_dict())
    result["runs"] = len(runs)
    result["profile_hits"], result["roofline_fallbacks"] = cost.hits, cost.misses
    result["profile_machine_differences"] = machine_differences(recorded_fingerprint(profile_dir))
    result["_per_op"] = {
        "class": [class_of(op, apart) for op in plan.ops],
        "measured_s": ((measured.record.end_ns - measured.record.start_ns) / 1e9).tolist(),
        "predicted_s": ((predicted.end_ns - predicted.start_ns) / 1e9).tolist(),
    }
    return result


def apart_streams(plan: Plan, measured: ExecutionResult) -> dict[str, str]:
    """Streams whose measured times are not their unit's, each with its class suffix: without CUDA, GPU streams
    ran on the CPU and link copies did not run (none with CUDA)."""
    if measured.cuda:
        return {}
    suffix = {UnitKind.GPU: GPU_ON_CPU, UnitKind.LINK: UNTIMED_COPY}
    return {stream: suffix[unit.kind] for stream, unit in topology_of(plan.system).streams.items()
            if unit.kind in suffix}


def plot_validation(result: dict[str, Any], path: str | Path, title: str) -> None:
    """Predicted against measured per op (log-log, by class), with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = result["_per_op"]
    m, p = np.asarray(per["measured_s"]), np.asarray(per["predicted_s"])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c in sorted(set(per["class"])):
        mask = np.asarray([k == c for k in per["class"]]) & (m > 0) & (p > 0)
        ax.scatter(m[mask] * 1e3, p[mask] * 1e3, s=10, alpha=0.7, label=c)
    lo = max(min(m[m > 0].min(), p[p > 0].min()) * 1e3, 1e-3) if (m > 0).any() else 1e-3
    hi = max(m.max(), p.max()) * 1e3 * 1.2 if len(m) else 1.0
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured (ms)")
    ax.set_ylabel("predicted (ms)")
    e2e = result["end_to_end"]["total_s"]
    ax.set_title(f"{title}\nend to end: measured {e2e['measured']:.3f} s, predicted {e2e['predicted']:.3f} s",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_figure_file(fig, path, dpi=150)
    finally:
        plt.close(fig)
