"""Every policy at its own best configuration on one model, system and routing trace; and CoX-MoE's ablation.

`compare` returns, per policy, the same dictionary `simulate --json` prints (or the reason it cannot run),
plus the speedup of `coxmoe` over each. `ablation` walks the paper's Table 3 steps from MoE-Lightning to the
full CoX-MoE and switches each CoX-MoE feature off alone.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from sim.api import resolve_model, resolve_routing, resolve_system, simulate
from sim.config import default_workers
from sim.errors import CapacityError, UnsupportedModel
from sim.policies import POLICIES
from sim.specs import ModelSpec, SystemSpec
from traces import RoutingTrace
from traces.limits import memory_limit_bytes

if TYPE_CHECKING:  # imported where the table is made (see sim.plan)
    import pandas as pd

COMPARED = tuple(name for name, cls in POLICIES.items() if cls.compared)  # registry order, coxmoe first

# (label, policy, options): the paper's ablation steps, then CoX-MoE with one feature off at a time.
ABLATION_STEPS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("MoE-Lightning (baseline)", "moe-lightning", {}),
    ("+ coalesced experts with AMX co-execution", "coxmoe", {"attention": "gpu", "stratify": "off"}),
    ("+ attention offload", "coxmoe", {"stratify": "off"}),
    ("+ hot-expert preload (CoX-MoE)", "coxmoe", {}),
    ("CoX-MoE without coalescing", "coxmoe", {"coalesce": "off"}),
    ("CoX-MoE with attention on the GPU", "coxmoe", {"attention": "gpu"}),
    ("CoX-MoE without hot-expert preload", "coxmoe", {"stratify": "off"}),
)


# Seconds each policy's simulation took in `compare` (B=1024, 800/256, full decode, one process), summed over
# Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V2-Lite on a100-80g-8452y (AMX Xeon dev VM, 2026-12-06). Jobs on several
# workers start longest first (a longest-processing-time order: Qwen3's makespan on 2 workers 25.0 -> 21.9 s in
# that measurement); results are the same in any order. A policy not listed starts first (its cost is unknown).
TYPICAL_S = {"moe-lightning": 48.4, "flexgen": 20.3, "moe-gen": 18.9, "coxmoe": 10.4, "stream-experts": 6.7,
             "fiddler": 5.2, "gpu-only": 1.2}


def submission_order(policies: list[str]) -> list[int]:
    """Indices of `policies` in the order their jobs start on a pool: longest typical simulation first
    (`TYPICAL_S`), unlisted policies before all, ties in the given order."""
    return sorted(range(len(policies)), key=lambda i: -TYPICAL_S.get(policies[i], float("inf")))


def default_compare_workers(jobs: int) -> int:
    """Processes for `jobs` policies when none are asked for: one per CPU, one per job at most, and no more than
    the machine's memory holds at the per-process memory limit (`COXMOE_MAX_GIB`, each process checks its own);
    one where processes cannot fork (spawned workers would re-run a caller's unguarded script)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        memory = 0
    by_memory = memory // max(memory_limit_bytes(), 1) if memory > 0 else jobs
    return max(1, min(default_workers(), jobs, by_memory))


def _run(model: ModelSpec, system: SystemSpec, policy: str, options: dict[str, str], trace: RoutingTrace,
         seed: int, decode_sample: int) -> dict[str, Any]:
    try:
        r = simulate(model, system, policy, policy_options=options, trace=trace, seed=seed,
                     decode_sample=decode_sample)
    except (CapacityError, UnsupportedModel) as exc:
        return {"policy": policy, "feasible": False, "error": str(exc)}
    return {**r.to_dict(), "feasible": True}


def _context(model: str | ModelSpec, system: str | SystemSpec, batch: int | None, prompt_len: int | None,
             gen_len: int | None, trace: str | Path | RoutingTrace | None, routing: str, reuse_prob: float,
             seed: int) -> tuple[ModelSpec, SystemSpec, RoutingTrace, str]:
    m, s = resolve_model(model), resolve_system(system)
    wl, tr, name = resolve_routing(m, batch, prompt_len, gen_len, trace, routing, seed, reuse_prob,
                                   prompt_counts=True, system=s)
    if tr.num_requests != wl.batch:  # keep exactly the batch's requests so every policy sees the same work
        tr = tr.head(wl.batch)
    return m, s, tr, name


def _run_all(m: ModelSpec, s: SystemSpec, jobs: list[tuple[str, dict[str, str]]], tr: RoutingTrace, seed: int,
             decode_sample: int, workers: int | None, progress: bool, desc: str) -> list[dict[str, Any]]:
    """`_run` for every (policy, options) job, results in job order; on `workers` processes when more than one
    (default: `default_compare_workers`; started longest first, `submission_order`; each job is independent and
    deterministic, so the results are the same either way)."""
    workers = default_compare_workers(len(jobs)) if workers is None else workers
    bar = tqdm(total=len(jobs), desc=desc, disable=None if progress else True, leave=False)
    if workers <= 1 or len(jobs) <= 1:
        out = []
        for policy, opts in jobs:
            out.append(_run(m, s, policy, opts, tr, seed, decode_sample))
            bar.update()
        bar.close()
        return out
    forked = "fork" in multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if forked else "spawn")
    if forked:  # workers inherit the trace (copy-on-write) instead of unpickling a copy per job
        _FORKED_TRACE[:] = [tr]
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = {}
            for i in submission_order([policy for policy, _ in jobs]):
                policy, opts = jobs[i]
                futures[i] = (pool.submit(_run_forked, m, s, policy, opts, seed, decode_sample) if forked else
                              pool.submit(_run, m, s, policy, opts, tr, seed, decode_sample))
            for _ in as_completed(futures.values()):
                bar.update()
    finally:
        _FORKED_TRACE.clear()
    bar.close()
    return [futures[i].result() for i in range(len(jobs))]


_FORKED_TRACE: list[RoutingTrace] = []  # the trace of the jobs in flight, for workers forked from this process


def _run_forked(m: ModelSpec, s: SystemSpec, policy: str, options: dict[str, str], seed: int,
                decode_sample: int) -> dict[str, Any]:
    """`_run` on the trace this worker inherited from the process that forked it."""
    return _run(m, s, policy, options, _FORKED_TRACE[0], seed, decode_sample)


def _lengths(tr: RoutingTrace) -> dict[str, float | int]:
    """The run's prompt and output lengths as compare and ablation report them: means and maxima."""
    return {"prompt_len_mean": float(tr.prompt_lens.mean()), "gen_len_mean": float(tr.gen_lens.mean()),
            "prompt_len_max": int(tr.prompt_lens.max()), "gen_len_max": int(tr.gen_lens.max())}


def compare(model: str | ModelSpec, system: str | SystemSpec, *, batch: int | None = None,
            prompt_len: int | None = None, gen_len: int | None = None, trace: str | Path | RoutingTrace | None = None,
            routing: str = "uniform", reuse_prob: float = 0.0, seed: int = 0, decode_sample: int = 0,
            policies: tuple[str, ...] = COMPARED, progress: bool = False,
            options: dict[str, dict[str, str]] | None = None, workers: int | None = None) -> dict[str, Any]:
    """Run each policy with its own search on the same trace (`options` pins knobs per policy), on `workers`
    processes (default: one per CPU, as memory allows); speedups are CoX-MoE's throughput over each."""
    m, s, tr, routing_name = _context(model, system, batch, prompt_len, gen_len, trace, routing, reuse_prob, seed)
    options = options or {}
    runs = _run_all(m, s, [(p, options.get(p, {})) for p in policies], tr, seed, decode_sample, workers, progress,
                    "policies")
    results = dict(zip(policies, runs, strict=True))
    cox = results.get("coxmoe", {})
    speedups = {p: (cox["throughput_tok_s"] / r["throughput_tok_s"]) if cox.get("feasible") and r.get("feasible")
                and r["throughput_tok_s"] > 0 else None for p, r in results.items() if p != "coxmoe"}
    return {"model": m.name, "system": s.name, "batch": tr.num_requests,
            **_lengths(tr),
            "routing": routing_name, "seed": seed, "decode_sample": decode_sample,
            "policies": results, "coxmoe_speedup": speedups}


def ablation(model: str | ModelSpec, system: str | SystemSpec, *, batch: int | None = None,
             prompt_len: int | None = None, gen_len: int | None = None,
             trace: str | Path | RoutingTrace | None = None, routing: str = "uniform", reuse_prob: float = 0.0,
             seed: int = 0, decode_sample: int = 0, progress: bool = False,
             workers: int | None = None) -> dict[str, Any]:
    """The paper's ablation (Table 3) plus each feature switched off alone, on `workers` processes; speedups over
    MoE-Lightning."""
    m, s, tr, routing_name = _context(model, system, batch, prompt_len, gen_len, trace, routing, reuse_prob, seed)
    # steps with the same policy and options (the paper's attention step is CoX-MoE without preload) run once
    jobs = list({(policy, tuple(sorted(options.items()))): (policy, options)
                 for _, policy, options in ABLATION_STEPS}.values())
    done = _run_all(m, s, jobs, tr, seed, decode_sample, workers, progress, "ablation")
    by_job = {(policy, tuple(sorted(options.items()))): run for (policy, options), run in zip(jobs, done, strict=True)}
    runs = [by_job[(policy, tuple(sorted(options.items())))] for _, policy, options in ABLATION_STEPS]
    rows = [{"step": label, "options": options, **run}
            for (label, _, options), run in zip(ABLATION_STEPS, runs, strict=True)]
    base = rows[0]
    for row in rows:
        ok = row.get("feasible") and base.get("feasible") and base["throughput_tok_s"] > 0
        row["speedup_over_moe_lightning"] = row["throughput_tok_s"] / base["throughput_tok_s"] if ok else None
    return {"model": m.name, "system": s.name, "batch": tr.num_requests,
            **_lengths(tr),
            "routing": routing_name, "seed": seed, "decode_sample": decode_sample, "steps": rows}


def failure_note(error: str) -> str:
    """A table's short note for a run that does not fit: the error's first clause, after any leading
    "policy NAME: " (whose own first clause would say only which policy)."""
    text = re.sub(r"^policy [^:]+: ", "", error)
    return text.split(":")[0]


def compare_table(result: dict[str, Any]) -> pd.DataFrame:
    """One row per policy: throughput, CoX-MoE's speedup over it (1 on its own row; no column when CoX-MoE did not
    run; NaN where either side did not fit), busy seconds per resource, peak VRAM."""
    import pandas as pd

    rows = []
    ran = result["policies"].get("coxmoe", {}).get("feasible", False)
    for policy, r in result["policies"].items():
        speedup = 1.0 if policy == "coxmoe" and ran else result["coxmoe_speedup"].get(policy)
        if not r.get("feasible"):
            rows.append({"policy": policy, "throughput_tok_s": None, "coxmoe_speedup": None,
                         "note": failure_note(r["error"])})
            continue
        busy = {f"{k}_s": v for k, v in r["busy_s"].items()}
        rows.append({"policy": policy, "throughput_tok_s": r["throughput_tok_s"],
                     "coxmoe_speedup": speedup, "total_s": r["total_s"],
                     "prefill_s": r["prefill_s"], "decode_s": r["decode_s"], **busy,
                     "peak_vram_gib": r["peak_gpu_bytes"] / 2**30, "note": ""})
    table = pd.DataFrame(rows, columns=None if rows else ["policy", "throughput_tok_s", "coxmoe_speedup", "note"])
    table["coxmoe_speedup"] = pd.to_numeric(table["coxmoe_speedup"], errors="coerce")
    return table if "coxmoe" in result["policies"] else table.drop(columns="coxmoe_speedup")
