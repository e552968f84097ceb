"""Predicted against measured: the executor runs real plans on this machine, the simulator predicts them from a
profile of this machine's kernels (`coxmoe calibrate profile`) and from the preset's datasheet roofline. Without
`--profile` it profiles DeepSeek-V2-Lite's shapes (small, so it runs in minutes on a laptop-class CPU) paired with
the runs: each profile round is followed by one run of every plan (`executor.validate.validate_paired`), so a
shared machine's drift hits both alike; the new profile replaces the one in the output folder. With `--profile
DIR` the plans use that profile's model and are validated against it after it was measured (unpaired)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from tqdm import tqdm

from experiments.reproduce import ReproduceOptions, Reproduction
from experiments.reproduce.style import paper_style, save_csv, save_figure
from sim.errors import SimInputError

T = TypeVar("T")

DEFAULT_MODEL = "deepseek-v2-lite"
SYSTEM = "a100-80g-8452y"  # a cpu-only plan uses only its DRAM size; the roofline column uses its Xeon 8452Y
PROMPT, GEN = 4, 4
QUICK_BATCHES = (8, 32)
BATCHES = (16, 64, 256)
PAIRED_ROUNDS = 5  # profile rounds, each followed by one run of every plan (the CPU validation's default)
CLASS_ORDER = ("cpu_experts", "gpu_experts", "attention", "copies", "other")


def _into_fresh(folder: Path, measure: Callable[[Path], T]) -> T:
    """`measure(new)` with `new` an empty sibling of `folder` to profile into; once it returns, `new` replaces
    `folder` (a failed or interrupted run leaves the kept profile as it was)."""
    new = folder.with_name(folder.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    result = measure(new)
    shutil.rmtree(folder, ignore_errors=True)
    new.rename(folder)
    return result


def run(options: ReproduceOptions) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    import torch

    from executor.profile import fingerprint, machine_differences, recorded_fingerprint
    from executor.validate import grid_bounds, validate_paired, validate_plan
    from executor.weights import random_weights, truncated
    from sim.api import resolve_model, resolve_routing, resolve_system
    from sim.cost.roofline import RooflineCostModel
    from sim.engine import run_plan
    from sim.policies import PlanContext, make_policy

    paired = options.profile is None
    prof = options.out / "calibration_profile" if paired else options.profile
    devices: object = ["cpu"]
    if paired:
        full = resolve_model(DEFAULT_MODEL)
    else:
        try:
            meta = json.loads((prof / "profile.json").read_text())
            name = meta["model"]
            if not isinstance(name, str):
                raise TypeError(f"model {name!r} is not a name")
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
            raise SimInputError(f"--profile {prof}: profile.json is not a profile ({type(exc).__name__}: {exc})") \
                from None
        try:
            full = resolve_model(name)
        except SimInputError as exc:
            raise SimInputError(f"--profile {prof}: its model {name!r} is not a preset ({exc})") from None
        devices = meta.get("devices")
    moe_layers, batches = (1, QUICK_BATCHES) if options.quick else (2, BATCHES)
    layers = full.num_layers - full.num_moe_layers + moe_layers  # keep any leading dense layers
    spec = truncated(full, layers)
    system = resolve_system(SYSTEM)
    weights = random_weights(spec, seed=options.seed)
    gpu_rows = isinstance(devices, list) and "cuda" in devices
    policies = ["cpu-only"] + (["coxmoe"] if gpu_rows and torch.cuda.is_available() else [])
    cases = []
    for policy in policies:
        for batch in batches:
            wl, trace, _ = resolve_routing(spec, batch, PROMPT, GEN, None, "uniform", options.seed)
            cases.append((policy, batch, make_policy(policy, {}).build(PlanContext(spec, system, wl, trace)), trace))
    if paired:
        plans = [plan for _, _, plan, _ in cases]  # their op sizes bound the grid
        results = _into_fresh(prof, lambda new: validate_paired(
            [(plan, trace) for _, _, plan, trace in cases], weights, full, new,
            rounds=1 if options.quick else PAIRED_ROUNDS, **grid_bounds(plans)))
    else:
        results = [validate_plan(plan, weights, trace, prof, repeats=1 if options.quick else 3)
                   for _, _, plan, trace in tqdm(cases, desc="calibration", disable=None)]
    rows, per_op = [], []
    for (policy, batch, plan, _), r in zip(cases, results, strict=True):
        roof = run_plan(plan, RooflineCostModel(system))
        roof_s = (roof.end_ns - roof.start_ns) / 1e9
        classes = r["_per_op"]["class"]
        for c, stats in r["classes"].items():
            rows.append({"policy": policy, "batch": batch, "class": c, "measured_s": stats["measured_s"],
                         "predicted_profile_s": stats["predicted_s"],
                         "predicted_roofline_s": float(sum(t for k, t in zip(classes, roof_s, strict=True)
                                                           if k == c)),
                         "error_profile": stats["error"]})
        e2e = r["end_to_end"]["total_s"]
        rows.append({"policy": policy, "batch": batch, "class": "end to end", "measured_s": e2e["measured"],
                     "predicted_profile_s": e2e["predicted"],
                     "predicted_roofline_s": float(roof.makespan_ns / 1e9), "error_profile": e2e["error"]})
        per_op.append(pd.DataFrame({"policy": policy, "batch": batch, "class": classes,
                                    "kind": [str(op.kind) for op in plan.ops],
                                    "phase": [str(op.phase) for op in plan.ops],
                                    "tokens": [op.tokens for op in plan.ops],
                                    "measured_s": r["_per_op"]["measured_s"],
                                    "predicted_profile_s": r["_per_op"]["predicted_s"],
                                    "predicted_roofline_s": roof_s}))
    table = pd.DataFrame(rows)
    table["error_roofline"] = table["predicted_roofline_s"] / table["measured_s"] - 1
    table.insert(0, "model", f"{spec.name} ({layers} layers)")
    here, recorded = fingerprint(), recorded_fingerprint(prof)
    machine = {"cpu": here["cpu_model"], "threads": torch.get_num_threads(), "amx": here["amx_tile"],
               "torch": here["torch"], "profile": str(prof), "paired": paired, "profile_cpu": recorded.get("cpu_model"),
               "profile_differences": machine_differences(recorded, here)}
    return table, pd.concat(per_op, ignore_index=True), machine


def plot(per_op: pd.DataFrame, table: pd.DataFrame, machine: dict, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    with paper_style():
        fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.0))
        for ax, col, title in ((axes[0], "predicted_profile_s", _whose_profile(machine)),
                               (axes[1], "predicted_roofline_s", "preset roofline (Xeon 8452Y datasheet)")):
            m, p = per_op["measured_s"].to_numpy() * 1e3, per_op[col].to_numpy() * 1e3
            for c in [c for c in CLASS_ORDER if c in set(per_op["class"])]:
                mask = (per_op["class"] == c).to_numpy() & (m > 0) & (p > 0)
                ax.scatter(m[mask], p[mask], s=6, alpha=0.7, label=c)
            pos = np.concatenate([m[m > 0], p[p > 0]])
            lo, hi = pos.min() / 1.5, pos.max() * 1.5
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("measured per op (ms)")
            ax.set_ylabel("predicted per op (ms)")
            e2e = table[table["class"] == "end to end"]
            err = (e2e[col] / e2e["measured_s"] - 1).abs().median()
            ax.set_title(f"predicted by {title}\nmedian end-to-end error {err:.1%}")
            ax.grid(axis="x", linewidth=0.4, alpha=0.5)
        axes[0].legend(loc="upper left")
        fig.suptitle(f"{table['model'].iloc[0]}, measured on {machine['cpu']} ({machine['threads']} threads, "
                     f"AMX {'yes' if machine['amx'] else 'no'})", fontsize=8)
        fig.tight_layout()
        return save_figure(fig, out, "calibration")


def finding(table: pd.DataFrame, machine: dict) -> str:
    e2e = table[table["class"] == "end to end"]
    return (f"On {machine['cpu']} ({machine['threads']} threads), {len(e2e)} executed plans: median absolute "
            f"end-to-end error {e2e['error_profile'].abs().median():.1%} with {_whose_profile(machine)}, "
            f"{e2e['error_roofline'].abs().median():.0%} with the uncalibrated preset roofline (profile: "
            f"{machine['profile']}, {'measured in the same rounds as the runs' if machine.get('paired') else 'kept'}"
            f"{_measured_elsewhere(machine)}).")


def _whose_profile(machine: dict) -> str:
    return "another machine's profile" if machine.get("profile_differences") else "this machine's profile"


def _measured_elsewhere(machine: dict) -> str:
    """A warning for the finding when `--profile` came from another machine: its predictions price that one."""
    if not machine.get("profile_differences"):
        return ""
    return (f", measured on another machine, {machine.get('profile_cpu')}: "
            + "; ".join(machine["profile_differences"]))


def reproduce(options: ReproduceOptions) -> Reproduction:
    table, per_op, machine = run(options)
    files = [save_csv(table, options.out, "calibration"), save_csv(per_op, options.out, "calibration_per_op"),
             *plot(per_op, table, machine, options.out)]
    claim = ("No figure in the paper: the simulator's error against real runs, so its other figures can be trusted "
             "as far as this error allows.")
    return Reproduction("calibration", "Simulator against executor (calibration)", claim, finding(table, machine),
                        table, files)
