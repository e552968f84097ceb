"""Predicted against measured on this machine: CPU-only plans of real-size Mixtral-8x7B layers.

1. Profile this machine's kernels for Mixtral-8x7B shapes (skipped if --profile already holds one).
2. Validate `cpu-only` plans of the first --layers layers at decode batch 16, 64 and 256 (short prompts, so
   decode dominates): measured by the executor, predicted by the simulator with that profile.
3. Coalesced against micro-batched experts (batch 256, micro-batch 32): the measured ratio of expert time
   beside the simulator's predicted ratio.
Each batch's row also gives the machine's speed during its runs over its speed when profiled (a bf16 GEMM and
a copy, `executor.speed_probe`), so a drifting VM's share of an error shows.

    python experiments/cpu_validation.py --out docs/results [--profile out/profile-mixtral] [--layers 2]

Writes cpu_validation.md and cpu_validation.png into --out, and prints the tables.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from executor.profile import fingerprint, machine_differences, profile, recorded_fingerprint
from executor.validate import plot_validation, validate_plan
from executor.weights import random_weights, truncated
from sim.api import resolve_model, resolve_routing, resolve_system
from sim.policies import PlanContext, make_policy

BATCHES = (16, 64, 256)


def _speed(result: dict) -> str:
    """The machine's speed during a validation over its speed when profiled: on a drifting VM, the part of an
    error that is the machine's."""
    ratios = (result.get("machine_speed") or {}).get("ratios")
    if ratios is None:
        return "n/a (no reading in the profile)"
    return f"{ratios['gemm_tflops_ratio']:.2f}x, {ratios['copy_gb_s_ratio']:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--profile", default="out/profile-mixtral")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=4)
    parser.add_argument("--gen-len", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=1024)
    args = parser.parse_args()
    t0 = time.perf_counter()
    model = resolve_model("mixtral-8x7b")
    prof = Path(args.profile)
    if not (prof / "profile.json").exists():
        profile(model, prof, devices=("cpu",), max_tokens=args.max_tokens)
    spec = truncated(model, args.layers)
    system = resolve_system("a100-80g-8452y")  # only its DRAM size matters to a cpu-only plan
    weights = random_weights(spec, seed=0)
    lines = ["| decode batch | ops | measured total s | predicted total s | error | decode error | "
             "expert error | attention error | other error | machine speed vs profiling (GEMM, copy) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    errors = []
    last = None
    for batch in BATCHES:
        wl, trace, _ = resolve_routing(spec, batch, args.prompt_len, args.gen_len, None, "table:mixtral-8x7b", 0)
        plan = make_policy("cpu-only", {}).build(PlanContext(spec, system, wl, trace))
        r = validate_plan(plan, weights, trace, prof, use_cuda=False)
        e2e, cls = r["end_to_end"], r["classes"]
        errors.append(abs(e2e["total_s"]["error"]))

        def pct(c: str, cls: dict = cls) -> str:
            return f"{cls[c]['error']:+.1%}" if c in cls and cls[c]["error"] is not None else "n/a"

        lines.append(f"| {batch} | {len(plan.ops)} | {e2e['total_s']['measured']:.3f} | "
                     f"{e2e['total_s']['predicted']:.3f} | {e2e['total_s']['error']:+.1%} | "
                     f"{e2e['decode_s']['error']:+.1%} | {pct('cpu_experts')} | {pct('attention')} | {pct('other')} | "
                     f"{_speed(r)} |")
        last = r
    lines.append(f"\nMedian absolute end-to-end error: {np.median(errors):.1%} over {len(errors)} batches.")
    # Coalesced against micro-batched experts at batch 256, micro-batch 32.
    wl, trace, _ = resolve_routing(spec, 256, args.prompt_len, args.gen_len, None, "table:mixtral-8x7b", 0)
    ratio_rows = {}
    for name, opts in (("coalesced", {"decode_micro_batch": "32", "coalesce": "on"}),
                       ("micro-batched", {"decode_micro_batch": "32", "coalesce": "off"})):
        plan = make_policy("cpu-only", opts).build(PlanContext(spec, system, wl, trace))
        r = validate_plan(plan, weights, trace, prof, use_cuda=False)
        ratio_rows[name] = r["classes"]["cpu_experts"]
    m_ratio = ratio_rows["micro-batched"]["measured_s"] / ratio_rows["coalesced"]["measured_s"]
    p_ratio = ratio_rows["micro-batched"]["predicted_s"] / ratio_rows["coalesced"]["predicted_s"]
    co, mb = ratio_rows["coalesced"], ratio_rows["micro-batched"]
    lines.append(f"\nExpert time, batch 256, micro-batch 32: micro-batched / coalesced = {m_ratio:.2f}x measured, "
                 f"{p_ratio:.2f}x predicted (coalesced: {co['measured_s']:.3f} s measured, "
                 f"{co['predicted_s']:.3f} s predicted; micro-batched: {mb['measured_s']:.3f} s, "
                 f"{mb['predicted_s']:.3f} s).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    assert last is not None
    plot_validation(last, out / "cpu_validation.png", f"{spec.name}, cpu-only, decode batch {BATCHES[-1]}")
    fp = fingerprint()
    differences = machine_differences(recorded_fingerprint(prof), fp)
    elsewhere = (" The profile was measured on another machine, so the predictions price its kernels: "
                 + "; ".join(differences) + ".") if differences else ""
    header = (f"Made by `python experiments/cpu_validation.py --out {args.out} --profile {args.profile} --layers "
              f"{args.layers}` in {time.perf_counter() - t0:.0f} s on {fp['cpu_model']} ({fp['cpus']} CPUs, "
              f"{torch.get_num_threads()} threads, torch {fp['torch']}, AMX {'yes' if fp['amx_tile'] else 'no'}). "
              f"Prompt {args.prompt_len}, output {args.gen_len}, Mixtral-8x7B measured routing table.{elsewhere}\n\n")
    text = header + "\n".join(lines) + "\n"
    (out / "cpu_validation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
