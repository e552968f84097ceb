"""Predicted against measured on this machine: CPU-only plans of real-size Mixtral-8x7B layers.

1. Validate `cpu-only` plans of the first --layers layers at decode batch 16, 64 and 256 (short prompts, so
   decode dominates): measured by the executor, predicted by the simulator with a profile of this machine's
   kernels for Mixtral-8x7B shapes.
2. Coalesced against micro-batched experts (batch 256, micro-batch 32): the measured ratio of expert time
   beside the simulator's predicted ratio.
Paired (the default; --profile must name a folder without a profile): the profile is measured now and every plan
runs once after each of its --rounds rounds, so a shared VM's drift (its memory bandwidth moved 2x within
minutes on the development VMs) hits the profile and the measurements alike. With --reuse-profile the plans run
after the profile already in --profile, and each batch's row gives the machine's speed during its runs over its
speed when profiled (a bf16 GEMM and a copy, `executor.speed_probe`), so a drifting VM's share of an error shows.

    python experiments/cpu_validation.py --out docs/results [--profile out/profile-paired] [--layers 2]

Writes cpu_validation.md, cpu_validation.png and cpu_validation_ops.csv (every op, measured beside predicted)
into --out, and prints the tables.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from executor.profile import fingerprint, machine_differences, recorded_fingerprint
from executor.validate import plot_validation, require_unprofiled, validate_paired, validate_plan
from executor.weights import random_weights, truncated
from experiments.cli.common import ScriptParser, output_dir, run_script
from sim.api import resolve_model, resolve_routing, resolve_system
from sim.atomic_files import write_atomic_text
from sim.errors import SimInputError
from sim.policies import PlanContext, make_policy

BATCHES = (16, 64, 256)


def _speed(result: dict) -> str:
    """The machine's speed during a validation over its speed when profiled: on a drifting VM, the part of an
    error that is the machine's."""
    speed = result.get("machine_speed") or {}
    ratios, noise = speed.get("ratios"), speed.get("spread")
    if ratios is None:
        return "n/a (no reading in the profile)"
    text = f"{ratios['gemm_tflops_ratio']:.2f}x, {ratios['copy_gb_s_ratio']:.2f}x"
    return text + (f" (readings spread up to {max(noise.values()):.0%})" if noise else "")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=output_dir, default="docs/results")
    parser.add_argument("--profile", default="out/profile-paired")
    parser.add_argument("--layers", type=_positive, default=2)
    parser.add_argument("--prompt-len", type=_positive, default=4)
    parser.add_argument("--gen-len", type=_positive, default=4)
    parser.add_argument("--max-tokens", type=_positive, default=1024)
    parser.add_argument("--rounds", type=_positive, default=5,
                        help="profile rounds, and runs of each plan between them (paired)")
    parser.add_argument("--reuse-profile", action="store_true",
                        help="validate against the profile already in --profile (unpaired: the plans run after it)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    prof = Path(args.profile)
    paired = not args.reuse_profile
    if paired:
        try:
            require_unprofiled(prof, "name a new folder to profile and validate together, or pass --reuse-profile "
                               "to validate against it")
        except SimInputError as exc:
            parser.exit(2, f"cpu_validation.py: {exc}\n")
    if not paired and not (prof / "profile.json").exists():
        parser.exit(2, f"cpu_validation.py: --reuse-profile, but {prof} holds no profile.json\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)  # before minutes of profiling, not after them
    model = resolve_model("mixtral-8x7b")
    spec = truncated(model, args.layers)
    system = resolve_system("a100-80g-8452y")  # only its DRAM size matters to a cpu-only plan
    weights = random_weights(spec, seed=0)

    def case(batch: int, options: dict[str, str]) -> tuple:
        wl, trace, _ = resolve_routing(spec, batch, args.prompt_len, args.gen_len, None, "table:mixtral-8x7b", 0)
        return make_policy("cpu-only", options).build(PlanContext(spec, system, wl, trace)), trace

    cases = [case(batch, {}) for batch in BATCHES]
    ratio_names = ("coalesced", "micro-batched")
    cases += [case(256, {"decode_micro_batch": "32", "coalesce": c}) for c in ("on", "off")]
    if paired:  # profile now, the plans run between its rounds
        results = validate_paired(cases, weights, model, prof, rounds=args.rounds, max_tokens=args.max_tokens)
    else:  # an existing profile: the plans run now, the speed readings tell the drift since it was measured
        results = [validate_plan(plan, weights, trace, prof, use_cuda=False) for plan, trace in cases]
    lines = ["| decode batch | ops | measured total s | predicted total s | error | decode error | "
             "expert error | attention error | other error | machine speed vs profiling (GEMM, copy) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    errors = []
    for batch, (plan, _), r in zip(BATCHES, cases[:len(BATCHES)], results[:len(BATCHES)], strict=True):
        e2e, cls = r["end_to_end"], r["classes"]
        errors.append(abs(e2e["total_s"]["error"]))

        def pct(c: str, cls: dict = cls) -> str:
            return f"{cls[c]['error']:+.1%}" if c in cls and cls[c]["error"] is not None else "n/a"

        lines.append(f"| {batch} | {len(plan.ops)} | {e2e['total_s']['measured']:.3f} | "
                     f"{e2e['total_s']['predicted']:.3f} | {e2e['total_s']['error']:+.1%} | "
                     f"{e2e['decode_s']['error']:+.1%} | {pct('cpu_experts')} | {pct('attention')} | {pct('other')} | "
                     f"{'paired (same rounds)' if paired else _speed(r)} |")
    last = results[len(BATCHES) - 1]
    lines.append(f"\nMedian absolute end-to-end error: {np.median(errors):.1%} over {len(errors)} batches.")
    # Coalesced against micro-batched experts at batch 256, micro-batch 32.
    ratio_rows = {name: r["classes"]["cpu_experts"] for name, r in zip(ratio_names, results[len(BATCHES):],
                                                                        strict=True)}
    m_ratio = ratio_rows["micro-batched"]["measured_s"] / ratio_rows["coalesced"]["measured_s"]
    p_ratio = ratio_rows["micro-batched"]["predicted_s"] / ratio_rows["coalesced"]["predicted_s"]
    co, mb = ratio_rows["coalesced"], ratio_rows["micro-batched"]
    lines.append(f"\nExpert time, batch 256, micro-batch 32: micro-batched / coalesced = {m_ratio:.2f}x measured, "
                 f"{p_ratio:.2f}x predicted (coalesced: {co['measured_s']:.3f} s measured, "
                 f"{co['predicted_s']:.3f} s predicted; micro-batched: {mb['measured_s']:.3f} s, "
                 f"{mb['predicted_s']:.3f} s).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_validation(last, out / "cpu_validation.png", f"{spec.name}, cpu-only, decode batch {BATCHES[-1]}")
    fp = fingerprint()
    differences = machine_differences(recorded_fingerprint(prof), fp)
    elsewhere = (" The profile was measured on another machine, so the predictions price its kernels: "
                 + "; ".join(differences) + ".") if differences else ""
    mode = (f"Paired: the profile was measured in this run, each plan ran once after each of its {args.rounds} "
            "rounds (per-op medians)." if paired else
            "The profile was measured before this run; each plan ran 3 times after a warm-up (per-op medians).")
    how = f"--rounds {args.rounds}" if paired else "--reuse-profile"
    header = (f"Made by `python experiments/cpu_validation.py --out {args.out} --profile {args.profile} --layers "
              f"{args.layers} --prompt-len {args.prompt_len} --gen-len {args.gen_len} --max-tokens {args.max_tokens} "
              f"{how}` in {time.perf_counter() - t0:.0f} s on {fp['cpu_model']} "
              f"({fp['cpus']} CPUs, "
              f"{torch.get_num_threads()} threads, torch {fp['torch']}, AMX {'yes' if fp['amx_tile'] else 'no'}). "
              f"Prompt {args.prompt_len}, output {args.gen_len}, Mixtral-8x7B measured routing table. {mode}"
              f"{elsewhere}\n\n")
    text = header + "\n".join(lines) + "\n"
    write_atomic_text(out / "cpu_validation.md", text)
    write_atomic_text(out / "cpu_validation_ops.csv", per_op_table(cases, results).to_csv(index=False))
    print(text)


def per_op_table(cases: list[tuple], results: list[dict]) -> pd.DataFrame:
    """Every op of every validated plan, measured beside predicted: where a class's error sits (which layer,
    step, token count), for the cases in the order they ran (the three batches, then coalesced and
    micro-batched)."""
    names = [f"batch {b}" for b in BATCHES] + ["batch 256 coalesced", "batch 256 micro-batched"]
    frames = []
    for name, (plan, _), r in zip(names, cases, results, strict=True):
        per = r["_per_op"]
        frames.append(pd.DataFrame({
            "case": name, "op": range(len(plan.ops)), "kind": [str(op.kind) for op in plan.ops],
            "class": per["class"], "phase": [str(op.phase) for op in plan.ops], "step": [op.step for op in plan.ops],
            "layer": [op.layer for op in plan.ops], "tokens": [op.tokens for op in plan.ops],
            "measured_s": per["measured_s"], "predicted_s": per["predicted_s"]}))
    return pd.concat(frames, ignore_index=True)


if __name__ == "__main__":
    run_script(main, "cpu_validation.py")
