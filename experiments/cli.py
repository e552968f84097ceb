"""`coxmoe` command line: a thin layer over the library. Bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sim.errors import SimInputError
from traces.errors import TraceError
from traces.limits import DEFAULT_LIMIT_GIB as LIMIT_DEFAULT
from traces.limits import LIMIT_ENV, parse_gib

EXIT_USAGE = 2


class UsageError(Exception):
    """Raised by the parser instead of printing usage; main() prints one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low, else a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _length(text: str) -> int | str:
    """A length: a positive integer, or a distribution spec (checked when the lengths are drawn)."""
    if text.split(":", 1)[0] in ("fixed", "uniform", "lognormal"):
        return text
    return _positive_int(text)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _positive_gib(text: str) -> float:
    try:
        return parse_gib(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


IMAGE_SUFFIXES = ("", ".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")


def _output_file(*suffixes: str) -> Callable[[str], str]:
    """An argparse type for a file to write: not a directory, with one of `suffixes` (checked before any work,
    so a long run never ends in an unwritable path)."""

    def parse(text: str) -> str:
        path = Path(text)
        if path.is_dir() or text.endswith(("/", os.sep)):
            raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
        if path.suffix.lower() not in suffixes:
            shown = ", ".join(s or "(none)" for s in suffixes)
            raise argparse.ArgumentTypeError(f"{text}: unsupported file type {path.suffix or '(none)'!r}; "
                                             f"use {shown}")
        if path.parent.exists() and not path.parent.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: {path.parent} is not a directory")
        return text

    return parse


def _one_line(text: str) -> str:
    """An error message as one line whatever it quotes (a key with a newline, a multi-line parser message)."""
    return " ".join(text.split("\n")).replace("\r", " ")


def _finite(obj: Any) -> Any:
    """The same structure with every NaN or infinite float as null: JSON output stays standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _emit_json(obj: Any) -> None:
    json.dump(_finite(obj), sys.stdout, indent=2, sort_keys=False, allow_nan=False)
    sys.stdout.write("\n")


# ---- presets / policies ---------------------------------------------------------------------------------------
def cmd_presets(args: argparse.Namespace) -> int:
    from sim.specs import preset_names, show_preset

    if args.show:
        sys.stdout.write(show_preset(args.show))
        return 0
    kinds = ("models", "systems", "gpus", "cpus", "links")
    if args.json:
        _emit_json({kind: preset_names(kind) for kind in kinds})
        return 0
    for kind in kinds:
        print(f"{kind}: {', '.join(preset_names(kind))}")
    print("\n`coxmoe presets --show NAME` prints one as YAML that --model-file / --system-file read back.")
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    import dataclasses

    from sim.policies import POLICIES

    for name, cls in sorted(POLICIES.items()):
        print(f"{name}: {cls.summary}")
        for f in dataclasses.fields(cls.Options):
            print(f"    {f.name} = {f.default!r}")
        doc = (cls.Options.__doc__ or "").split("\n")
        print("    " + " ".join(line.strip() for line in doc if line.strip()))
    return 0


# ---- simulate -------------------------------------------------------------------------------------------------
def _short(value: Any) -> str:
    """Knob values for a summary line: per-layer lists become their mean."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple) and len(value) > 4:
        return f"mean {sum(value) / len(value):.1f} per layer"
    return str(value)


def _print_summary(d: dict[str, Any]) -> None:
    gib = 2**30
    print(f"{d['model']} on {d['system']} under {d['policy']} ({d['routing']}, seed {d['seed']})")
    print(f"  knobs: {', '.join(f'{k}={_short(v)}' for k, v in d['knobs'].items())}")
    if d.get("analytic_total_s") is not None:
        s = d["search"]
        print(f"  search: {s['candidates']} candidates, {s['simulated']} simulated, {s['search_s']:.2f} s; "
              f"analytic estimate {d['analytic_total_s']:.3f} s against simulated {d['total_s']:.3f} s")
    w = d["workload"]
    print(f"  batch {w['batch']}, prompt {w['prompt_len_mean']:.0f}, generate {w['gen_len_mean']:.0f} tokens")
    print(f"  throughput {d['throughput_tok_s']:.1f} generated tok/s; prefill {d['prefill_s']:.3f} s, "
          f"decode {d['decode_s']:.3f} s, total {d['total_s']:.3f} s")
    busy = ", ".join(f"{k} {v:.0%}" for k, v in d["busy_fraction"].items())
    print(f"  busy: {busy}")
    print(f"  peak memory: GPU {d['peak_gpu_bytes'] / gib:.2f} GiB, CPU {d['peak_cpu_bytes'] / gib:.2f} GiB")
    sampled = "" if d["decode_steps_simulated"] == d["decode_steps_total"] else (
        f", decode from {d['decode_steps_simulated']} of {d['decode_steps_total']} steps")
    print(f"  {d['num_ops']} ops, {d['events']} events, {d['wall_s']:.2f} s wall{sampled}")


def cmd_simulate(args: argparse.Namespace) -> int:
    from sim.api import simulate
    from sim.policies import parse_kv_pairs
    from sim.timeline import chrome_trace_events, write_chrome_trace

    keep = bool(args.timeline or args.plot or args.plan_out)
    result = simulate(
        args.model_file or args.model, args.system_file or args.system, args.policy,
        batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
        policy_options=parse_kv_pairs(args.policy_opt), trace=args.trace, routing=args.routing,
        reuse_prob=args.reuse_prob, seed=args.seed, keep_plan=keep, decode_sample=args.decode_sample,
        profile=args.profile,
    )
    d = result.to_dict()
    if args.plan_out:
        from sim.plan_io import save_plan

        save_plan(result.plan, args.plan_out)
    if args.timeline:
        meta = {k: d[k] for k in ("model", "system", "policy", "knobs", "routing", "seed")}
        write_chrome_trace(args.timeline, chrome_trace_events(result.plan.ops, result.record.start_ns,
                                                              result.record.end_ns), meta)
    if args.plot:
        from experiments.plots import plot_simulation

        plot_simulation(result, args.plot)
    if args.json:
        _emit_json(d)
    else:
        _print_summary(d)
        if args.timeline:
            print(f"  timeline: {args.timeline} (open in https://ui.perfetto.dev)")
        if args.plot:
            print(f"  plot: {args.plot}")
        if args.plan_out:
            print(f"  plan: {args.plan_out} (coxmoe run-plan reads it back)")
    return 0


def cmd_run_plan(args: argparse.Namespace) -> int:
    from sim.api import gc_paused, simulate_plan
    from sim.metrics import throughput_tok_s
    from sim.plan_io import load_plan
    from sim.timeline import chrome_trace_events, write_chrome_trace

    plan = load_plan(args.file)
    with gc_paused():
        record, metrics = simulate_plan(plan)
    d = {"policy": plan.policy, "knobs": plan.knobs, "model": plan.model.name, "system": plan.system.name,
         "throughput_tok_s": throughput_tok_s(plan, metrics),
         **metrics, "peak_gpu_bytes": record.peak_bytes["gpu"], "peak_cpu_bytes": record.peak_bytes["cpu"],
         "num_ops": len(plan.ops), "events": record.events}
    if args.timeline:
        write_chrome_trace(args.timeline, chrome_trace_events(plan.ops, record.start_ns, record.end_ns),
                           {"plan": str(args.file)})
    if args.json:
        _emit_json(d)
    else:
        print(f"{args.file}: {d['policy']} plan of {d['model']} on {d['system']}, {d['num_ops']} ops")
        print(f"  throughput {d['throughput_tok_s']:.1f} tok/s; prefill {d['prefill_s']:.3f} s, "
              f"decode {d['decode_s']:.3f} s, total {d['total_s']:.3f} s")
    return 0


# ---- compare / ablation ---------------------------------------------------------------------------------------
def _workload_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, trace=args.trace,
                routing=args.routing, reuse_prob=args.reuse_prob, seed=args.seed, decode_sample=args.decode_sample,
                progress=True)


def cmd_compare(args: argparse.Namespace) -> int:
    from sim.compare import COMPARED, compare, compare_table

    policies = tuple(args.policies.split(",")) if args.policies else COMPARED
    result = compare(args.model_file or args.model, args.system_file or args.system, policies=policies,
                     **_workload_kwargs(args))
    if args.json:
        _emit_json(result)
        return 0
    print(f"{result['model']} on {result['system']}: batch {result['batch']}, prompt {result['prompt_len_mean']:.0f}, "
          f"generate {result['gen_len_mean']:.0f}, routing {result['routing']}")
    table = compare_table(result)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def cmd_ablation(args: argparse.Namespace) -> int:
    import pandas as pd

    from sim.compare import ablation

    result = ablation(args.model_file or args.model, args.system_file or args.system, **_workload_kwargs(args))
    if args.json:
        _emit_json(result)
        return 0
    print(f"{result['model']} on {result['system']}: batch {result['batch']}, routing {result['routing']}")
    rows = [{"step": r["step"], "throughput_tok_s": r.get("throughput_tok_s"),
             "speedup_over_moe_lightning": r.get("speedup_over_moe_lightning"),
             "note": "" if r.get("feasible") else r["error"].split(":")[0]} for r in result["steps"]]
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def _weights(spec: Any, args: argparse.Namespace) -> Any:
    """Seeded random weights, or the model's own from a local safetensors checkpoint (--checkpoint). Also
    applies --threads, since both execute and validate load weights first."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
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
    from executor.weights import truncated
    from sim.api import resolve_model, resolve_routing, resolve_system
    from sim.metrics import plan_metrics, throughput_tok_s
    from sim.policies import PlanContext, make_policy, parse_kv_pairs
    from sim.timeline import chrome_trace_events, write_chrome_trace

    full = resolve_model(args.model_file or args.model)
    spec = truncated(full, args.layers or full.num_layers)
    system = resolve_system(args.system_file or args.system)
    workload, trace, routing = resolve_routing(spec, args.batch, args.prompt_len, args.gen_len, args.trace,
                                               args.routing, args.seed, args.reuse_prob)
    plan = make_policy(args.policy, parse_kv_pairs(args.policy_opt)).build(PlanContext(spec, system, workload, trace))
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
        events = chrome_trace_events(plan.ops, result.record.start_ns, result.record.end_ns, process_name=name)
        write_chrome_trace(args.timeline, events, {"measured": True, **result.to_dict()})
    if args.json:
        _emit_json(d)
        return 0
    label = " (GPU-role ops ran on the CPU: not GPU timings)" if result.gpu_role_on_cpu else ""
    print(f"measured: {spec.name} ({spec.num_layers} layers) under {plan.policy} on this machine{label}")
    print(f"  devices: {', '.join(f'{k}={v}' for k, v in result.devices.items())}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"  throughput {d['throughput_tok_s']:.1f} generated tok/s; prefill {d['prefill_s']:.3f} s, "
          f"decode {d['decode_s']:.3f} s, total {d['total_s']:.3f} s ({len(plan.ops)} ops)")
    print(f"  busy: {', '.join(f'{k} {v:.0%}' for k, v in d['busy_fraction'].items() if v)}")
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
    profile(spec, out, devices=devices, rounds=args.rounds, max_tokens=args.max_tokens, threads=threads)
    print(f"wrote {out}/profile.json and {out}/timings.csv ({', '.join(devices)}; {spec.name}; {args.rounds} rounds)")
    return 0


def cmd_calibrate_isa(args: argparse.Namespace) -> int:
    from executor.isa import report

    r = report()
    if args.json:
        _emit_json(r)
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
    from executor.validate import plot_validation, validate_plan
    from executor.weights import truncated
    from sim.api import resolve_model, resolve_routing, resolve_system
    from sim.policies import PlanContext, make_policy, parse_kv_pairs

    full = resolve_model(args.model_file or args.model)
    spec = truncated(full, args.layers or full.num_layers)
    system = resolve_system(args.system_file or args.system)
    workload, trace, _ = resolve_routing(spec, args.batch, args.prompt_len, args.gen_len, args.trace, args.routing,
                                         args.seed, args.reuse_prob)
    plan = make_policy(args.policy, parse_kv_pairs(args.policy_opt)).build(PlanContext(spec, system, workload, trace))
    use_cuda = _cuda_choice(args.cuda)
    result = validate_plan(plan, _weights(spec, args), trace, args.profile, use_cuda, args.warmup, args.repeats)
    if args.plot:
        plot_validation(result, args.plot, f"{spec.name} under {plan.policy}, batch {workload.batch}")
    result.pop("_per_op")
    if args.json:
        _emit_json({"model": spec.name, "policy": plan.policy, "knobs": plan.knobs, **result})
        return 0
    label = " (GPU-role ops on the CPU)" if result["gpu_role_on_cpu"] else ""
    print(f"validation: {spec.name} under {plan.policy}, batch {workload.batch}{label}; profile {args.profile} "
          f"({result['profile_hits']} op times from it, {result['roofline_fallbacks']} from the roofline)")
    for c, v in result["classes"].items():
        err = "n/a" if v["error"] is None else f"{v['error']:+.1%}"
        print(f"  {c:12} {v['ops']:6} ops  measured {v['measured_s']:.4f} s  predicted {v['predicted_s']:.4f} s  {err}")
    for k, v in result["end_to_end"].items():
        err = "n/a" if v["error"] is None else f"{v['error']:+.1%}"
        print(f"  {k:12} measured {v['measured']:.4f} s  predicted {v['predicted']:.4f} s  {err}")
    return 0


# ---- trace ----------------------------------------------------------------------------------------------------
def cmd_trace_gen(args: argparse.Namespace) -> int:
    import numpy as np

    from traces import SynthConfig, generate_trace, request_lengths, save_trace

    if args.preset:
        from traces.synth_presets import synth_preset

        synth_preset(args.preset)  # an unknown preset fails here, naming the presets
        args.model = args.model or args.preset
    if args.preset and (args.routing != "uniform" or args.reuse_prob):
        raise SimInputError("--preset sets the routing and reuse; drop --routing / --reuse-prob")
    if args.model:
        from sim.api import resolve_model

        m = resolve_model(args.model)
        name, layers, experts, top_k = m.name, m.num_moe_layers, m.num_experts, m.top_k
    else:
        if not (args.layers and args.experts and args.top_k):
            raise SimInputError("give --model, or all of --layers, --experts and --top-k")
        name, layers, experts, top_k = "custom", args.layers, args.experts, args.top_k
    rng = np.random.default_rng([args.seed, 0x1E25])
    prompt = request_lengths(args.prompt_len, args.requests, rng, "--prompt-len")
    gen = request_lengths(args.gen_len, args.requests, rng, "--gen-len")
    if args.preset:
        from traces.synth_presets import synth_preset

        cfg = synth_preset(args.preset).config(layers, experts, top_k, seed=args.seed, topics=args.topics,
                                               topic_shift=args.topic_shift, affinity=args.affinity)
    else:
        cfg = SynthConfig(name, layers, experts, top_k, args.routing, args.reuse_prob, args.seed,
                          topics=args.topics, topic_shift=args.topic_shift, affinity=args.affinity)
    trace = generate_trace(cfg, prompt, gen, progress=True)
    save_trace(trace, args.output, compress=args.compress)
    print(f"wrote {args.output}: {trace.num_requests} requests, {trace.num_tokens} routed tokens, "
          f"{layers} MoE layers x {experts} experts, top-{top_k}, routing {cfg.routing}"
          + (f" (preset {args.preset})" if args.preset else ""))
    return 0


def _save_and_report(trace, output: str, origin: str) -> int:
    """Write a trace and print its one-line summary (import and record)."""
    from traces import save_trace

    save_trace(trace, output)
    h = trace.header
    print(f"wrote {output}: {trace.num_requests} requests, {trace.num_tokens} routed tokens, {h.num_layers} "
          f"MoE layers x {h.num_experts} experts, top-{h.top_k}, {origin}")
    return 0


def cmd_trace_import(args: argparse.Namespace) -> int:
    from traces import import_jsonl, import_switch_csv, read_count_table, trace_from_counts

    if args.format == "jsonl":
        trace = import_jsonl(args.file, model=args.model or "imported", num_experts=args.experts)
    elif args.format == "switch-csv":
        trace = import_switch_csv(args.file, model=args.model or "switch-base-32")
    else:
        if not args.top_k:
            raise SimInputError("--format counts needs --top-k (the table counts top-k selections)")
        trace = trace_from_counts(read_count_table(args.file), args.top_k, model=args.model or "counts",
                                  seed=args.seed, source=f"counts:{Path(args.file).name}")
    return _save_and_report(trace, args.output, f"source {trace.header.source}")


def cmd_eas(args: argparse.Namespace) -> int:
    """EAS: features (prompt embeddings, or the trace's request features), prototypes, their prefill routing
    (from the trace, or recorded from a local checkpoint), hot experts per layer."""
    import numpy as np

    from traces import load_trace
    from traces.eas import hit_ratio, map_from_probe, oracle_map, pick_prototypes, save_map

    if not (args.trace or args.model_dir):
        raise SimInputError("give --trace (probe recorded routing) or --model-dir (probe the model itself)")
    if args.model_dir and not args.prompts:
        raise SimInputError("--model-dir probes prompts: give --prompts")
    trace = load_trace(args.trace) if args.trace else None
    features, prompts = None, None
    if args.prompts:
        from executor.embed import embed_prompts
        from executor.record import read_prompts

        prompts = read_prompts(args.prompts)
        if trace is not None and len(prompts) != trace.num_requests:
            raise SimInputError(f"{args.prompts} has {len(prompts)} prompts but the trace has "
                                f"{trace.num_requests} requests; they must be the same requests in order")
        features = embed_prompts(prompts, args.embedder)
    elif trace is not None:
        features = trace.request_features
    count = len(prompts) if prompts is not None else trace.num_requests
    if features is None:
        print("note: no prompts and no request_features in the trace; sampling prototypes uniformly (one cluster)",
              file=sys.stderr)
    clusters = min(args.clusters, count) if features is not None else 1
    picked = pick_prototypes(features, count, clusters=clusters, sample=min(args.sample, count), seed=args.seed)
    if args.model_dir:
        from executor.record import record_trace

        probe = record_trace(args.model_dir, [prompts[i] for i in picked], gen_len=1,
                             max_prompt_tokens=args.max_prompt_tokens)
        load = probe.expert_counts(np.arange(probe.num_tokens)).astype(np.float64)
        model, top_k = probe.header.model, probe.header.top_k
    else:
        load = trace.expert_counts(trace.prefill_rows(picked)).astype(np.float64)
        model, top_k = trace.header.model, trace.header.top_k
    if args.vram_experts > load.shape[1]:
        raise SimInputError(f"--vram-experts {args.vram_experts} exceeds the {load.shape[1]} experts per layer")
    hot = map_from_probe(model, load, top_k, args.vram_experts, {
        "clusters": clusters, "sample": int(picked.size), "seed": args.seed,
        "probe": "model" if args.model_dir else "trace",
        "features": "prompt-embeddings" if prompts is not None else ("trace" if features is not None else "none")})
    save_map(hot, args.output)
    line = (f"wrote {args.output}: {args.vram_experts} resident experts per layer from {picked.size} prototypes "
            f"in {clusters} clusters ({hot.extra['probed_tokens']} probed prompt tokens)")
    if trace is not None:
        line += (f"; expert hit ratio on the trace {hit_ratio(trace, hot):.3f} (global-frequency oracle "
                 f"{hit_ratio(trace, oracle_map(trace, args.vram_experts)):.3f})")
    print(line)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from experiments.sweep.run import run_sweep
    from experiments.sweep.spec import load_spec
    from experiments.sweep.store import ResultStore

    points = load_spec(args.spec)
    store = ResultStore(args.out)
    try:
        summary = run_sweep(points, store, args.engine, args.workers, args.ray_address)
    finally:
        store.close()
    print(f"sweep {args.spec} ({args.engine}): {summary.total} points, {summary.skipped} already done, "
          f"{summary.ok} ran, {summary.failed} failed, {summary.wall_s:.1f} s; results in {store.path}")
    if summary.failed and not args.allow_failures:
        print(f"coxmoe sweep: {summary.failed} point(s) failed (see `coxmoe sweep-results {args.out}`; "
              "--allow-failures exits 0 anyway)", file=sys.stderr)
        return 1
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from experiments.reproduce import ReproduceOptions, reproduce
    from experiments.reproduce.report import reproduce_all
    from experiments.tables import markdown_table

    options = ReproduceOptions(Path(args.out), quick=args.quick, workers=args.workers or 1, engine=args.engine,
                               ray_address=args.ray_address, profile=Path(args.profile) if args.profile else None,
                               record=Path(args.record) if args.record else None, seed=args.seed,
                               keep=tuple(args.keep or ()))
    if args.name == "all":
        results, report = reproduce_all(options)
    else:
        results, report = [reproduce(args.name, options)], None
    for r in results:
        print(f"== {r.title}\n{markdown_table(r.table.head(40), '{:.4g}')}\npaper: {r.claim}\nhere:  {r.finding}")
        if r.note:
            print(f"note:  {r.note}")
        print("wrote " + ", ".join(str(f) for f in r.files) + "\n")
    if report:
        print(f"report: {report}")
    return 0


def cmd_timeline(args: argparse.Namespace) -> int:
    from experiments.gantt import gantt_figure, load_chrome_trace, process_name
    from experiments.reproduce.style import paper_style, save_figure

    out = Path(args.out)
    if out.suffix not in ("", ".png", ".pdf"):
        raise SimInputError(f"--out {out}: give a stem or a .png/.pdf name (both are written)")
    timelines = []
    for path in args.files:
        events, _ = load_chrome_trace(path)
        timelines.append((f"{process_name(events, 'timeline')}: {Path(path).name}", events))
    with paper_style():
        fig, steps = gantt_figure(timelines, args.step)
        files = save_figure(fig, out.parent, out.stem)
    print(f"decode step(s) {', '.join(map(str, steps))}: wrote {', '.join(map(str, files))}")
    return 0


def cmd_sweep_results(args: argparse.Namespace) -> int:
    from experiments.sweep.store import load_results

    df = load_results(args.dir)
    if args.csv:
        df.to_csv(args.csv, index=False)
    if df.empty:  # a sweep stopped before its first point finished
        print("0 points: the sweep has not finished any point yet")
        return 0
    shown = ["key", "status", "model", "system", "policy", "batch", "prompt_len", "gen_len", "throughput_tok_s",
             "wall_s", "error"]
    print(f"{len(df)} points: {int((df['status'] == 'ok').sum())} ok, {int((df['status'] == 'failed').sum())} failed")
    if len(df):
        table = df[[c for c in shown if c in df.columns]].astype(object).fillna("")
        print(table.to_string(index=False, max_colwidth=60))
    return 0


def cmd_trace_record(args: argparse.Namespace) -> int:
    from executor.record import read_prompts, record_trace

    prompts = read_prompts(args.prompts, limit=args.limit)
    trace = record_trace(args.model_dir, prompts, args.gen_len, args.max_prompt_tokens)
    return _save_and_report(trace, args.output, f"recorded from {args.model_dir}")


def cmd_trace_stats(args: argparse.Namespace) -> int:
    from traces import format_stats, load_trace, trace_stats

    stats = trace_stats(load_trace(args.file), lru_max_tokens=args.lru_tokens)
    if args.json:
        _emit_json(stats.to_dict())
    else:
        print(format_stats(stats))
    return 0


def cmd_trace_validate(args: argparse.Namespace) -> int:
    from traces import load_trace

    t = load_trace(args.file)
    h = t.header
    print(f"ok: {args.file}: trace v1, model {h.model}, {t.num_requests} requests, {t.num_tokens} routed tokens, "
          f"{h.num_layers} MoE layers x {h.num_experts} experts, top-{h.top_k}, source {h.source}")
    return 0


# ---- parser ---------------------------------------------------------------------------------------------------
def _add_model_system(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="model preset (see `coxmoe presets`)")
    g.add_argument("--model-file", help="model spec YAML/JSON, or a Hugging Face config.json")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--system", help="system preset (see `coxmoe presets`)")
    g.add_argument("--system-file", help="system spec YAML/JSON (e.g. edited `presets --show` output)")


def _add_workload(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=_positive_int, help="requests in the batch (default: all of --trace)")
    p.add_argument("--prompt-len", type=_length, help="prompt tokens per request: N, or a distribution "
                   "uniform:LO:HI or lognormal:MEDIAN:SIGMA[:MAX] (drawn per request, seeded by --seed)")
    p.add_argument("--gen-len", type=_length, help="generated tokens per request, same forms as --prompt-len "
                   "(a distribution: requests finish at different steps)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--trace", help="routing trace file (.npz, format v1); lengths come from it")
    g.add_argument("--routing", default="uniform", help="synthetic routing: uniform, zipf:ALPHA, table:NAME or "
                   "preset:NAME (tuned to published statistics: mixtral-8x7b, qwen3-30b-a3b, deepseek-v2-lite)")
    p.add_argument("--reuse-prob", type=_probability, default=0.0,
                   help="synthetic routing: probability a token reuses the previous token's experts")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the synthetic routing")
    p.add_argument("--decode-sample", type=_nonneg_int, default=0, metavar="N",
                   help="simulate N evenly spaced decode steps and scale decode time to all (0: every step)")


def _add_real_run(p: argparse.ArgumentParser) -> None:
    """Arguments of a real run (execute, calibrate validate): what to run, where it was planned for, how."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="model preset (see `coxmoe presets`)")
    g.add_argument("--model-file", help="model spec YAML/JSON, or a Hugging Face config.json")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--system", default="a100-80g-8452y", help="system the policy plans for (default %(default)s)")
    g.add_argument("--system-file", help="system spec YAML/JSON")
    p.add_argument("--layers", type=_positive_int, help="run the first N layers (real size); default all")
    p.add_argument("--policy", default="cpu-only", help="policy name (default %(default)s)")
    p.add_argument("--policy-opt", action="append", metavar="KEY=VALUE", help="policy option; repeatable")
    _add_workload(p)
    p.add_argument("--cuda", choices=("auto", "on", "off"), default="auto",
                   help="run GPU-stream ops on CUDA (auto: when available; off: on the CPU, labelled)")
    p.add_argument("--warmup", type=_nonneg_int, default=1, help="untimed runs first (default %(default)s)")
    p.add_argument("--checkpoint", metavar="DIR", help="load weights from a local Hugging Face safetensors checkpoint")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's own choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="coxmoe", description="Simulate CPU-GPU MoE inference policies (CoX-MoE and baselines).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("presets", help="list model and hardware presets, or show one as YAML")
    p.add_argument("--show", metavar="NAME", help="print preset NAME as YAML")
    p.add_argument("--json", action="store_true", help="print the lists as JSON")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("policies", help="list policies and their options")
    p.set_defaults(func=cmd_policies)

    p = sub.add_parser("simulate", help="simulate one model, system, policy and workload")
    _add_model_system(p)
    p.add_argument("--policy", default="stream-experts", help="policy name (see `coxmoe policies`)")
    p.add_argument("--policy-opt", action="append", metavar="KEY=VALUE", help="policy option; repeatable")
    _add_workload(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeline", metavar="FILE", type=_output_file(".json"),
                   help="write a Chrome-trace JSON timeline (Perfetto)")
    p.add_argument("--plot", metavar="FILE", type=_output_file(*IMAGE_SUFFIXES),
                   help="write a PNG: busy time per resource and one decode step")
    p.add_argument("--plan-out", metavar="FILE", type=_output_file(".parquet"),
                   help="write the plan as Parquet (engine-neutral; see run-plan)")
    p.add_argument("--profile", metavar="DIR", help="op times from a measured profile (coxmoe calibrate profile); "
                   "the roofline outside it")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("run-plan", help="simulate a plan saved with `simulate --plan-out`")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeline", metavar="FILE", type=_output_file(".json"),
                   help="write a Chrome-trace JSON timeline (Perfetto)")
    p.set_defaults(func=cmd_run_plan)

    for name, func, help_text in (("compare", cmd_compare, "every policy at its own best configuration, same trace"),
                                  ("ablation", cmd_ablation, "CoX-MoE's ablation: the paper's steps, features off")):
        p = sub.add_parser(name, help=help_text)
        _add_model_system(p)
        _add_workload(p)
        if name == "compare":
            p.add_argument("--policies", help="comma-separated subset (default: all)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=func)

    p = sub.add_parser("execute", help="run a policy's plan for real with torch and report measured times")
    _add_real_run(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeline", metavar="FILE", type=_output_file(".json"),
                   help="write the measured Chrome-trace JSON timeline")
    p.set_defaults(func=cmd_execute)

    cal = sub.add_parser("calibrate", help="measure this machine (profile) and score the simulator (validate)")
    csub = cal.add_subparsers(dest="calibrate_command", required=True, parser_class=_Parser)
    p = csub.add_parser("profile", help="microbenchmark the executor's kernels into a profile directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="model preset whose shapes to measure")
    g.add_argument("--model-file", help="model spec YAML/JSON or Hugging Face config.json")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--rounds", type=_positive_int, default=3, help="interleaved repeats per grid point")
    p.add_argument("--max-tokens", type=_positive_int, default=1024,
                   help="largest tokens per op in the grid (up to 4096)")
    p.add_argument("--threads", help="comma-separated torch thread counts to profile the CPU with (default: "
                   "the current count)")
    p.set_defaults(func=cmd_calibrate_profile)
    p = csub.add_parser("isa", help="which oneDNN kernel (AMX or not) runs bf16 GEMMs here, and how fast")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate_isa)
    p = csub.add_parser("validate", help="run a plan for real and in the simulator; errors per op class")
    _add_real_run(p)
    p.add_argument("--profile", required=True, metavar="DIR", help="profile of this machine")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs; per-op medians are compared")
    p.add_argument("--plot", metavar="FILE", type=_output_file(*IMAGE_SUFFIXES),
                   help="write predicted against measured per op (PNG)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate_validate)

    p = sub.add_parser("eas", help="expert-aware stratification: pick hot experts per layer from probed prototypes")
    p.add_argument("--trace", help="routing trace to probe (its request_features are clustered without --prompts)")
    p.add_argument("--prompts", help="JSONL prompts (a text field per line) to embed and cluster; with --trace, "
                   "the trace's requests in the same order")
    p.add_argument("--model-dir", help="probe the prototypes' prefill routing on this local HF MoE checkpoint")
    p.add_argument("--embedder", help="local sentence-transformers directory (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--max-prompt-tokens", type=_positive_int, help="--model-dir: truncate prompts")
    p.add_argument("--vram-experts", type=_nonneg_int, required=True, help="resident experts per layer (E_R)")
    p.add_argument("--clusters", type=_positive_int, default=8, help="k-means clusters of the request features")
    p.add_argument("--sample", type=_positive_int, default=64, help="prototypes to probe, split by cluster size")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("-o", "--output", required=True, type=_output_file(".npz"),
                   help="hot-expert map (.npz) for --policy-opt hot_map=PATH")
    p.set_defaults(func=cmd_eas)

    from experiments.reproduce import FIGURES
    from experiments.sweep import ENGINES

    p = sub.add_parser("sweep", help="run every point of a YAML sweep spec, resumably (finished points are skipped)")
    p.add_argument("spec", help="YAML spec: fixed values and axes (see experiments/sweep/spec.py)")
    p.add_argument("--out", required=True, help="results directory (results.sqlite, one row per point)")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: a process pool; ray: Ray tasks on a cluster or a local Ray instance")
    p.add_argument("--workers", type=_positive_int,
                   help="local processes, or the CPUs of a local Ray instance (default: the CPUs this process may use)")
    p.add_argument("--ray-address", help="--engine ray: cluster to join (default: $RAY_ADDRESS, else a local instance)")
    p.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even when some points failed (default: exit 1; failed points are retried next run)")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("reproduce", help="the paper's figures (PNG, PDF, CSV and a printed table); all: every one "
                       "plus a Markdown report", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="figures:\n" + "\n".join(f"  {k:<12} {v}" for k, v in FIGURES.items()))
    p.add_argument("name", help=f"one of {', '.join(FIGURES)}, or all")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quick", action="store_true", help="small grids that exercise every step in seconds (smoke "
                   "tests); the numbers are not the paper's setting")
    p.add_argument("--workers", type=_positive_int, help="fig7: local processes or local Ray CPUs (default 1)")
    p.add_argument("--engine", choices=ENGINES, default="local", help="fig7: sweep engine")
    p.add_argument("--ray-address", help="fig7 with --engine ray: cluster to join (default: $RAY_ADDRESS)")
    p.add_argument("--profile", metavar="DIR", help="calibration: an existing `coxmoe calibrate profile` directory "
                   "(default: profile DeepSeek-V2-Lite's shapes on this machine first)")
    p.add_argument("--record", metavar="FILE", help="timeline: a measured timeline from `coxmoe execute --timeline`")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--keep", action="append", metavar="NAME", help="all: do not rerun figure NAME; carry its "
                   "summary row and section from the report already in --out (repeatable)")
    p.set_defaults(func=cmd_reproduce)
    p = sub.add_parser("timeline", help="Gantt chart (PNG + PDF) of one decode step from Chrome-trace timelines")
    p.add_argument("files", nargs="+", help="timelines from simulate/execute --timeline; one panel each")
    p.add_argument("--out", required=True, help="output stem (writes STEM.png and STEM.pdf)")
    p.add_argument("--step", type=_nonneg_int, help="decode step to draw (default: each timeline's middle one)")
    p.set_defaults(func=cmd_timeline)

    p = sub.add_parser("sweep-results", help="summarise (or export) a sweep's results")
    p.add_argument("dir", help="a sweep's --out directory")
    p.add_argument("--csv", help="also write every row to this CSV file")
    p.set_defaults(func=cmd_sweep_results)

    t = sub.add_parser("trace", help="generate, inspect and validate routing traces")
    tsub = t.add_subparsers(dest="trace_command", required=True, parser_class=_Parser)
    p = tsub.add_parser("gen", help="write a synthetic routing trace")
    p.add_argument("--model", help="model preset or file (sets layers, experts and top-k)")
    p.add_argument("--layers", type=_positive_int, help="MoE layers (without --model)")
    p.add_argument("--experts", type=_positive_int, help="experts per layer (without --model)")
    p.add_argument("--top-k", type=_positive_int, help="experts per token (without --model)")
    p.add_argument("--requests", type=_positive_int, required=True, help="number of requests")
    p.add_argument("--prompt-len", required=True, help="N, fixed:N, uniform:LO:HI or lognormal:MEDIAN:SIGMA[:MAX]")
    p.add_argument("--gen-len", required=True, help="same forms as --prompt-len")
    p.add_argument("--routing", default="uniform", help="uniform, zipf:ALPHA or table:NAME")
    p.add_argument("--reuse-prob", type=_probability, default=0.0, help="probability of reusing the last experts")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--preset", help="synthesis preset tuned to published routing statistics (mixtral-8x7b, "
                   "qwen3-30b-a3b, deepseek-v2-lite): popularity and per-layer reuse")
    p.add_argument("--affinity", type=_probability, default=0.0,
                   help="probability a token's experts follow (rank-matched) from its previous layer's")
    p.add_argument("--topics", type=_nonneg_int, default=0,
                   help="latent topics, each with its own popularity; requests carry a topic feature vector")
    p.add_argument("--topic-shift", type=_probability, default=0.5,
                   help="share of a topic's popularity that is its own (0: topics route alike)")
    p.add_argument("--compress", action="store_true", help="deflate the arrays (smaller, slower to write)")
    p.add_argument("-o", "--output", required=True, type=_output_file(".npz"), help="output .npz file")
    p.set_defaults(func=cmd_trace_gen)
    p = tsub.add_parser("import", help="convert published routing data into a trace (format v1)")
    p.add_argument("file")
    p.add_argument("--format", required=True, choices=("jsonl", "switch-csv", "counts"),
                   help="jsonl: per-(request, token, layer) records; switch-csv: the Switch-base decoder CSV; "
                   "counts: a [layers, experts] selection-count table (.csv or .npy)")
    p.add_argument("--model", help="model name for the trace header")
    p.add_argument("--experts", type=_positive_int, help="jsonl: experts per layer (default: largest id + 1)")
    p.add_argument("--top-k", type=_positive_int, help="counts: experts per token")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="counts: seed of the token order")
    p.add_argument("-o", "--output", required=True, type=_output_file(".npz"), help="output .npz file")
    p.set_defaults(func=cmd_trace_import)
    p = tsub.add_parser("record", help="record routing from a local Hugging Face MoE checkpoint")
    p.add_argument("--model-dir", required=True, help="local checkpoint directory (config, tokenizer, weights)")
    p.add_argument("--prompts", required=True, help="JSONL file with a text field per line")
    p.add_argument("--gen-len", type=_positive_int, default=16, help="tokens to generate greedily per prompt")
    p.add_argument("--max-prompt-tokens", type=_positive_int, help="truncate prompts to this many tokens")
    p.add_argument("--limit", type=_positive_int, help="use only the first N prompts")
    p.add_argument("-o", "--output", required=True, type=_output_file(".npz"), help="output .npz file")
    p.set_defaults(func=cmd_trace_record)
    p = tsub.add_parser("stats", help="popularity, entropy, reuse and LRU hit rates of a trace")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--lru-tokens", type=_positive_int, default=50_000,
                   help="routed tokens replayed for the LRU hit rates (whole requests, from the first)")
    p.set_defaults(func=cmd_trace_stats)
    p = tsub.add_parser("validate", help="check a trace file and print its header")
    p.add_argument("file")
    p.set_defaults(func=cmd_trace_validate)
    _add_limit_option(parser)
    return parser


def _add_limit_option(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """`--max-gib` on the top-level parser and on every (sub)command, so it may stand anywhere."""
    parser.add_argument("--max-gib", type=_positive_gib, default=None if top else argparse.SUPPRESS,
                        help=f"memory a trace or plan may take before it is refused (default {LIMIT_DEFAULT:g} GiB, "
                             f"or {LIMIT_ENV})")
    for action in parser._actions:  # argparse keeps subcommands as a _SubParsersAction's choices
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_limit_option(child, top=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    saved_limit = os.environ.get(LIMIT_ENV)
    try:
        args = parser.parse_args(argv)
        if args.max_gib is not None:  # read by the guards, here and in sweep workers, for this command only
            os.environ[LIMIT_ENV] = repr(args.max_gib)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except (SimInputError, TraceError) as exc:
        print(f"coxmoe: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"coxmoe: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("coxmoe: interrupted", file=sys.stderr)
        return 130
    finally:
        if saved_limit is None:
            os.environ.pop(LIMIT_ENV, None)
        else:
            os.environ[LIMIT_ENV] = saved_limit


if __name__ == "__main__":
    sys.exit(main())
