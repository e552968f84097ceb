"""Real runs on this machine: execute a plan with torch; calibrate (profile, isa, validate)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, NamedTuple

from experiments.cli.common import (
    IMAGE_SUFFIXES,
    Parser,
    arg_type,
    emit_json,
    output_dir,
    output_file,
    positive_int,
    positive_run_count,
    run_count,
)
from experiments.cli.config_flags import add_config_flags, config_from_args
from sim.config import int_at_least
from sim.errors import SimInputError


class RealRun(NamedTuple):
    """What a real run executes: the model cut to --layers, the system it was planned for, the workload and its
    routing, and the policy's plan."""

    spec: Any
    system: Any
    workload: Any
    trace: Any
    routing: str
    plan: Any


def _real_run(args: argparse.Namespace, profile: str | None = None) -> RealRun:
    """Apply --threads, then build the plan. With `profile`, the policy's search scores its candidates with the
    profile's op times (the cost model the run is compared against), not the roofline."""
    from executor.weights import truncated
    from sim.api import config_model, config_system, resolve_routing
    from sim.policies import PlanContext, make_policy

    if args.threads:
        import torch

        _check_threads((args.threads,))
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    full = config_model(config)
    spec = truncated(full, args.layers or full.num_layers)
    system = config_system(config)
    workload, trace, routing = resolve_routing(spec, config.batch, config.prompt_len, config.gen_len, config.trace,
                                               config.routing, config.seed, config.reuse_prob)
    trace.require_prompt_rows("the executor")  # before the plan search: it routes every prompt token as traced
    cost = None
    if profile is not None:
        import torch

        from sim.cost.profile import ProfileCostModel

        cost = ProfileCostModel(system, profile, spec, float(workload.prompt_lens.mean()),
                                threads=torch.get_num_threads())
    policy = make_policy(config.policy, dict(config.policy_options))
    plan = policy.build(PlanContext(spec, system, workload, trace, cost=cost))
    return RealRun(spec, system, workload, trace, routing, plan)


def _weights(spec: Any, args: argparse.Namespace) -> Any:
    """Seeded random weights, or the model's own from a local safetensors checkpoint (--checkpoint)."""
    if args.checkpoint:
        from executor.checkpoint import load_checkpoint

        return load_checkpoint(spec, args.checkpoint, spec.num_layers)
    from executor.weights import random_weights

    return random_weights(spec, seed=args.seed)


# ---- execute ----------------------------------------------------------------------------------------------
def _cuda_choice(flag: str) -> bool | None:
    """--cuda auto|on|off as execute_plan's use_cuda; `on` without a CUDA device is refused before any work."""
    import torch

    if flag == "on" and not torch.cuda.is_available():
        raise SimInputError("--cuda on: torch sees no CUDA device (use --cuda auto or off)")
    return {"auto": None, "on": True, "off": False}[flag]


def cmd_execute(args: argparse.Namespace) -> int:
    import torch

    from executor.run import execute_plan
    from sim.metrics import plan_metrics, throughput_tok_s
    from sim.timeline import chrome_trace_events, write_chrome_trace

    spec, system, workload, trace, routing, plan = _real_run(args)
    use_cuda = _cuda_choice(args.cuda)
    weights = _weights(spec, args)
    for _ in range(args.warmup):
        execute_plan(plan, weights, trace, use_cuda=use_cuda)
    result = execute_plan(plan, weights, trace, use_cuda=use_cuda)
    metrics = plan_metrics(plan, result.record)
    d = {"model": spec.name, "system": system.name, "policy": plan.policy, "knobs": plan.knobs,
         "routing": routing, "workload": workload.to_dict(), "measured": True, **result.to_dict(),
         "throughput_tok_s": throughput_tok_s(plan, metrics), **metrics, "num_ops": len(plan.ops),
         "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.timeline:
        name = "cox-moe execution (measured" + (", GPU role on the CPU)" if result.gpu_role_on_cpu else ")")
        from executor.cpu_experts import cpu_flags

        # measured: the tracks name the CPU that ran the ops (this host's), not the planned system's
        events = chrome_trace_events(plan.ops, result.record.start_ns, result.record.end_ns, process_name=name,
                                     cpu_has_amx="amx_bf16" in cpu_flags())
        write_chrome_trace(args.timeline, events, {"measured": True, **result.to_dict()})
    if args.json:
        emit_json(d)
        return 0
    label = " (GPU-role ops ran on the CPU: not GPU timings)" if result.gpu_role_on_cpu else ""
    label += " (near-memory ops emulated on the CPU: not NDP timings)" if result.ndp_emulated else ""
    label += (" (modelled GPUs share a real one: GPU-to-GPU copies ran within a device, not over a link)"
              if result.gpus_shared else "")
    print(f"measured: {spec.name} ({spec.num_layers} layers) under {plan.policy} on this machine{label}")
    print(f"  devices: {', '.join(f'{k}={v}' for k, v in result.devices.items())}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"  throughput {d['throughput_tok_s']:.1f} generated tok/s; prefill {d['prefill_s']:.3f} s, "
          f"decode {d['decode_s']:.3f} s, total {d['total_s']:.3f} s ({len(plan.ops)} ops)")
    print(f"  busy: {', '.join(f'{k} {v:.0%}' for k, v in d['busy_fraction'].items() if v)}")
    if args.timeline:
        print(f"  timeline: {args.timeline} (open in https://ui.perfetto.dev)")
    return 0


# ---- calibrate ------------------------------------------------------------------------------------------------
def cmd_calibrate_profile(args: argparse.Namespace) -> int:
    import torch

    from executor.profile import profile
    from sim.api import resolve_model

    spec = resolve_model(args.model_file or args.model)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SimInputError("--device cuda: torch sees no CUDA device")
    devices = ("cpu", "cuda") if cuda else ("cpu",)
    out = Path(args.out)
    try:
        threads = tuple(int(t) for t in args.threads.split(",")) if args.threads else None
    except ValueError:
        raise SimInputError(f"--threads {args.threads!r}: expected comma-separated integers") from None
    if threads and min(threads) < 1:
        raise SimInputError("--threads: counts must be >= 1")
    if threads and len(set(threads)) != len(threads):  # each count would be measured twice, its rows duplicated
        raise SimInputError(f"--threads {args.threads}: a count is repeated")
    if threads:
        _check_threads(threads)
    new = [p for p in (out, *out.parents) if not p.exists()]  # the folders a profile would create, deepest first
    try:
        profile(spec, out, devices=devices, rounds=args.rounds, max_tokens=args.max_tokens, threads=threads,
                max_requests=args.max_requests, max_kv=args.max_kv)
    except BaseException:
        for folder in new:  # a refusal leaves no empty folder behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    print(f"wrote {out}/profile.json and {out}/timings.csv ({', '.join(devices)}; {spec.name}; {args.rounds} rounds)")
    return 0


def cmd_calibrate_isa(args: argparse.Namespace) -> int:
    from executor.isa import report

    r = report()
    if args.json:
        emit_json(r)
        return 0
    o = r["onednn"]
    amx = "yes" if o["uses_amx"] else ("no (the CPU has AMX tiles but oneDNN did not use them)"
                                       if o["amx_tile_supported"] else "no (this CPU has no AMX)")
    print(f"oneDNN ISA: {o['isa']}" if o["onednn_used"] else
          "oneDNN ISA: not used (torch ran this bf16 GEMM outside oneDNN: the CPU lacks AVX-512)")
    print(f"bf16 GEMM {o['shape'][0]}x{o['shape'][1]}x{o['shape'][2]}: kernel {', '.join(o['kernels']) or 'n/a'}; "
          f"AMX: {amx}; {o['tflops']:.3f} TFLOP/s ({o['median_s'] * 1e3:.1f} ms)")
    sw = r["sweep"]
    print(f"bf16 GEMM [M x {sw['k']}] x [{sw['k']} x {sw['n']}], measured ceiling {sw['ceiling_tflops']:.3f} TFLOP/s: "
          + ", ".join(f"M={m}: {v:.3f} ({sw['fraction_of_ceiling'][m]:.0%})" for m, v in sw["tflops"].items()))
    ipex = r["ipex"]
    print("intel-extension-for-pytorch: " + (f"available ({ipex['version']})" if ipex["available"]
                                              else f"not used: {ipex['reason']}"))
    return 0


def cmd_calibrate_validate(args: argparse.Namespace) -> int:
    from executor.speed_probe import describe, drifted, noisy
    from executor.validate import grid_bounds, plot_validation, require_unprofiled, validate_paired, validate_plan
    from sim.metrics import APART

    if args.paired:
        require_unprofiled(args.profile, "--paired profiles into --profile (name a new folder, or drop --paired "
                           "to validate against it)")
        if args.cuda == "on":
            raise SimInputError("--paired validates on the CPU only (drop --cuda on)")
    # Paired, there is no profile yet: a searched policy picks its plan with the roofline.
    spec, _, workload, trace, _, plan = _real_run(args, profile=None if args.paired else args.profile)
    if args.paired:  # the plan's op sizes bound the grid
        result, = validate_paired([(plan, trace)], _weights(spec, args), spec, args.profile, rounds=args.repeats,
                                  warmup=args.warmup, **grid_bounds([plan]))
    else:
        result = validate_plan(plan, _weights(spec, args), trace, args.profile, _cuda_choice(args.cuda),
                               args.warmup, args.repeats)
    if args.plot:
        plot_validation(result, args.plot, f"{spec.name} under {plan.policy}, batch {workload.batch}")
        result["plot"] = str(args.plot)
    result.pop("_per_op")
    if args.json:
        emit_json({"model": spec.name, "policy": plan.policy, "knobs": plan.knobs, **result})
        return 0
    label = " (GPU-role ops on the CPU)" if result["gpu_role_on_cpu"] else ""
    label += " (near-memory ops emulated on the CPU)" if result.get("ndp_emulated") else ""
    label += " (modelled GPUs share a real one: GPU-to-GPU copies not over a link)" if result.get("gpus_shared") else ""
    print(f"validation: {spec.name} under {plan.policy}, batch {workload.batch}{label}; profile {args.profile} "
          f"({result['profile_hits']} op times from it, {result['roofline_fallbacks']} from the roofline)")
    if result["profile_machine_differences"]:
        print("  note: the profile was measured on another machine, so these predictions price its kernels, not "
              "this machine's (" + "; ".join(result["profile_machine_differences"]) + ")")
    speed = result.get("machine_speed")
    if result.get("paired"):
        print(f"  paired: {args.profile} was profiled in the same {args.repeats} rounds as the runs (drift hits both)")
    elif speed is not None:
        ratios, noise = speed["ratios"], speed.get("spread")
        if drifted(ratios, noise):
            note = "  note: this machine's speed moved since profiling, so part of each error is its drift; "
        elif noisy(noise):
            note = (f"  note: this machine's speed moves by itself (its two readings around these runs differ "
                    f"by up to {max(noise.values()):.0%}), so changes of that size are its noise; ")
        else:
            note = "  "
        print(f"{note}machine speed now: {describe(ratios)}")
    width = max(12, *(len(c) for c in result["classes"]))
    apart = [why for c in result["classes"] for suffix, why in APART.items() if c.endswith(suffix)]
    for c, v in result["classes"].items():
        err = "n/a" if v["error"] is None else f"{v['error']:+.1%}"
        err += "".join(f" ({why})" for suffix, why in APART.items() if c.endswith(suffix))
        print(f"  {c:{width}} {v['ops']:6} ops  measured {v['measured_s']:.4f} s  predicted {v['predicted_s']:.4f} s  "
              f"{err}")
    for k, v in result["end_to_end"].items():
        err = "n/a" if v["error"] is None else f"{v['error']:+.1%}"
        err += f" (includes ops apart: {'; '.join(sorted(set(apart)))})" if apart else ""
        print(f"  {k:{width}} measured {v['measured']:.4f} s  predicted {v['predicted']:.4f} s  {err}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0




def _add_real_run(p: argparse.ArgumentParser) -> None:
    """Arguments of a real run (execute, calibrate validate): what to run, where it was planned for, how. Every
    decode step runs, so there is no --decode-sample."""
    add_config_flags(p, ("target", "policy", "workload"), defaults={"system": "a100-80g-8452y", "policy": "cpu-only"},
                     exclude=("decode_sample",))
    p.add_argument("--layers", type=positive_int, help="run the first N layers (real size); default all")
    p.add_argument("--cuda", choices=("auto", "on", "off"), default="auto",
                   help="run GPU-stream ops on CUDA (auto: when available; off: on the CPU, labelled)")
    p.add_argument("--warmup", type=run_count, default=1, help="untimed runs first, at most 1000 (default %(default)s)")
    p.add_argument("--checkpoint", metavar="DIR", help="load weights from a local Hugging Face safetensors checkpoint")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's own choice)")


def register(sub: argparse._SubParsersAction) -> None:
    """execute; calibrate profile, isa, validate."""
    p = sub.add_parser("execute", help="run a policy's plan for real with torch and report measured times")
    _add_real_run(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeline", metavar="FILE", type=output_file(".json"),
                   help="write the measured Chrome-trace JSON timeline")
    p.set_defaults(func=cmd_execute)

    cal = sub.add_parser("calibrate", help="measure this machine (profile) and score the simulator (validate)")
    csub = cal.add_subparsers(dest="calibrate_command", required=True, parser_class=Parser)
    p = csub.add_parser("profile", help="microbenchmark the executor's kernels into a profile directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="model preset whose shapes to measure")
    g.add_argument("--model-file", help="model spec YAML/JSON or Hugging Face config.json")
    p.add_argument("--out", required=True, type=output_dir, help="output directory")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--rounds", type=positive_run_count, default=3,
                   help="interleaved repeats per grid point (at most 1000)")
    p.add_argument("--max-tokens", type=arg_type(int_at_least(1, 4096)), default=1024,
                   help="largest tokens per op in the grid (up to 4096)")
    # the attention grids' largest points cost minutes on a small CPU; plans to be priced need no more than their
    # batch and their longest prompt plus output (a look-up beyond the grid scales its edge by the work)
    p.add_argument("--max-requests", type=arg_type(int_at_least(1, 2**24)), default=None,
                   help="attention grids up to the first batch size covering N requests (default: the whole grid)")
    p.add_argument("--max-kv", type=arg_type(int_at_least(1, 2**24)), default=None,
                   help="attention grids up to the first KV length covering N tokens (default: the whole grid)")
    p.add_argument("--threads", help="comma-separated torch thread counts to profile the CPU with (default: "
                   "the current count)")
    p.set_defaults(func=cmd_calibrate_profile)
    p = csub.add_parser("isa", help="which oneDNN kernel (AMX or not) runs bf16 GEMMs here, and how fast")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate_isa)
    p = csub.add_parser("validate", help="run a plan for real and in the simulator; errors per op class")
    _add_real_run(p)
    p.add_argument("--profile", required=True, metavar="DIR", help="profile of this machine (the policy's search "
                   "scores its candidates with it too); with --paired, the new folder to profile into")
    p.add_argument("--repeats", type=positive_run_count, default=3,
                   help="timed runs; per-op medians are compared (at most 1000)")
    p.add_argument("--paired", action="store_true",
                   help="profile this machine into --profile (a new folder) in the same rounds as the timed runs "
                   "(one run after each of --repeats profile rounds), so a drifting machine hits both alike; CPU "
                   "only; a searched policy then picks its plan with the roofline")
    p.add_argument("--plot", metavar="FILE", type=output_file(*IMAGE_SUFFIXES),
                   help="write predicted against measured per op (PNG)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate_validate)


MAX_THREADS_PER_CPU = 8  # oversubscription beyond this only measures the scheduler


def _check_threads(counts: tuple[int, ...]) -> None:
    """Torch thread counts up to MAX_THREADS_PER_CPU per CPU this process may use (100,000 failed to start)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if max(counts) > MAX_THREADS_PER_CPU * cpus:
        raise SimInputError(f"--threads {max(counts)}: at most {MAX_THREADS_PER_CPU * cpus} on this machine's {cpus} "
                            "CPUs")
