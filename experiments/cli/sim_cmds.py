"""Simulation commands: presets, policies, simulate, run-plan, sensitivity, compare, ablation."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from experiments.cli.common import IMAGE_SUFFIXES, emit_json, output_file, positive_int
from experiments.cli.config_flags import add_config_flags, simulation_config, workload_kwargs
from sim.atomic_files import write_csv_file
from sim.errors import SimInputError


def cmd_presets(args: argparse.Namespace) -> int:
    from sim.specs import preset_names, show_preset
    from traces.length_presets import PRESETS

    if args.lengths and args.json:
        emit_json({p.name: {"spec": p.spec, "statistics": p.statistics, "source": p.source} for p in PRESETS.values()})
        return 0
    if args.lengths:
        for p in PRESETS.values():
            print(f"{p.name}: {p.spec}\n    from {p.statistics}\n    source: {p.source}")
        return 0
    if args.show in PRESETS:  # a length preset: its distribution and sources, as `--lengths` gives them
        p = PRESETS[args.show]
        entry = {"name": p.name, "spec": p.spec, "statistics": p.statistics, "source": p.source}
        if args.json:
            emit_json(entry)
        else:
            import yaml

            sys.stdout.write(yaml.safe_dump(entry, sort_keys=False, width=110))
        return 0
    if args.show is not None:  # `--show ''` names no preset: an error below, not the lists
        if args.json:
            import yaml

            emit_json(yaml.safe_load(show_preset(args.show)))
        else:
            sys.stdout.write(show_preset(args.show))
        return 0
    kinds = ("models", "systems", "gpus", "cpus", "links", "ndps", "disks")
    if args.json:
        emit_json({**{kind: preset_names(kind) for kind in kinds}, "lengths": sorted(PRESETS)})
        return 0
    for kind in kinds:
        print(f"{kind}: {', '.join(preset_names(kind))}")
    print(f"lengths: {', '.join(sorted(PRESETS))} (--prompt-len/--gen-len preset:NAME; `--lengths` for sources)")
    print("\n`coxmoe presets --show NAME` prints one as YAML (a model or system as --model-file / --system-file read "
          "back; a length preset as its distribution and sources); `--show FILE` a spec file or config.json as read.")
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
    print(f"  batch {w['batch']}, {lengths_text(w)}")
    print(f"  throughput {d['throughput_tok_s']:.1f} generated tok/s; prefill {d['prefill_s']:.3f} s, "
          f"decode {d['decode_s']:.3f} s, total {d['total_s']:.3f} s")
    busy = ", ".join(f"{k} {v:.0%}" for k, v in d["busy_fraction"].items())
    print(f"  busy: {busy}")
    extra = "".join(f", {pool.upper()} {v / gib:.2f} GiB" for pool, v in d.get("peak_bytes", {}).items()
                    if pool not in ("gpu", "cpu"))
    print(f"  peak memory: GPU {d['peak_gpu_bytes'] / gib:.2f} GiB, CPU {d['peak_cpu_bytes'] / gib:.2f} GiB{extra}")
    sampled = "" if d["decode_steps_simulated"] == d["decode_steps_total"] else (
        f", decode from {d['decode_steps_simulated']} of {d['decode_steps_total']} steps")
    print(f"  {d['num_ops']} ops, {engine_line(d)}, {d['wall_s']:.2f} s wall{sampled}")


def engine_line(d: dict) -> str:
    """How the plan ran: its SimPy events, or the one-pass list schedule where no op slowed another."""
    if d.get("engine") == "list":
        return "list-scheduled (no op slowed another: no SimPy events needed)"
    return f"{d['events']} SimPy events"


def cmd_simulate(args: argparse.Namespace) -> int:
    from sim.api import simulate
    from sim.timeline import chrome_trace_events, write_chrome_trace

    keep = bool(args.timeline or args.plot or args.plan_out)
    result = simulate(simulation_config(args), keep_plan=keep)
    d = result.to_dict()
    if args.plan_out:
        from sim.plan_io import save_plan

        save_plan(result.plan, args.plan_out)
    if args.timeline:
        meta = {k: d[k] for k in ("model", "system", "policy", "knobs", "routing", "seed")}
        write_chrome_trace(args.timeline, chrome_trace_events(result.plan.ops, result.record.start_ns,
                                                              result.record.end_ns,
                                                              cpu_has_amx=result.plan.system.cpu.has_amx), meta)
    if args.plot:
        from experiments.plots import plot_simulation

        plot_simulation(result, args.plot)
    if args.json:
        emit_json(d)
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
    if args.verify:
        from sim.plan_verify import verify_assignments
        from traces import load_trace

        verify_assignments(plan, load_trace(args.verify))
    cost = None
    if args.profile:
        from sim.cost.profile import ProfileCostModel

        cost = ProfileCostModel(plan.system, args.profile, plan.model, float(plan.workload.prompt_lens.mean()))
    with gc_paused():
        record, metrics = simulate_plan(plan, cost)
    d = {"policy": plan.policy, "knobs": plan.knobs, "model": plan.model.name, "system": plan.system.name,
         "priced_by": f"profile {args.profile}" if args.profile else "roofline",
         "throughput_tok_s": throughput_tok_s(plan, metrics),
         **metrics, "peak_gpu_bytes": record.peak_bytes["gpu"], "peak_cpu_bytes": record.peak_bytes["cpu"],
         "peak_bytes": dict(record.peak_bytes), "num_ops": plan.num_ops, "events": record.events,
         "engine": record.engine}
    if args.timeline:
        write_chrome_trace(args.timeline, chrome_trace_events(plan.ops, record.start_ns, record.end_ns,
                                                              cpu_has_amx=plan.system.cpu.has_amx),
                           {"plan": str(args.file)})
    if args.json:
        emit_json(d)
    else:
        print(f"{args.file}: {d['policy']} plan of {d['model']} on {d['system']}, {d['num_ops']} ops, priced by "
              f"the {d['priced_by']}"
              + (f"; every assignment of {args.verify} computed once" if args.verify else ""))
        print(f"  throughput {d['throughput_tok_s']:.1f} tok/s; prefill {d['prefill_s']:.3f} s, "
              f"decode {d['decode_s']:.3f} s, total {d['total_s']:.3f} s")
    return 0


# ---- compare / ablation ---------------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    from sim.compare import COMPARED, compare, compare_table

    policies = COMPARED
    if args.policies is not None:
        policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
        if not policies:
            raise SimInputError("--policies: name at least one policy (leave the flag out for all)")
        twice = sorted({p for p in policies if policies.count(p) > 1})
        if twice:
            raise SimInputError(f"--policies names {', '.join(twice)} twice (each policy runs once)")
    from sim.api import config_model, config_system

    config = simulation_config(args)
    result = compare(config_model(config), config_system(config), policies=policies, progress=True,
                     workers=args.workers, **workload_kwargs(config))
    if args.json:
        emit_json(result)
        return 0
    print(f"{result['model']} on {result['system']}: batch {result['batch']}, {lengths_text(result)}, "
          f"routing {result['routing']}")
    table = compare_table(result)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-"))
    return 0


def lengths_text(w: dict) -> str:
    """Prompt and output lengths as printed: the length when every request has it, else the mean and the longest
    (a distribution's mean alone had read as a fixed length)."""
    def one(name: str) -> str:
        mean, top = w[f"{name}_len_mean"], w[f"{name}_len_max"]
        return f"{top}" if mean == top else f"mean {mean:.1f} (max {top})"

    return f"prompt {one('prompt')}, generate {one('gen')} tokens"


def cmd_ablation(args: argparse.Namespace) -> int:
    import pandas as pd

    from sim.api import config_model, config_system
    from sim.compare import ablation, failure_note

    config = simulation_config(args)
    result = ablation(config_model(config), config_system(config), progress=True, workers=args.workers,
                      **workload_kwargs(config))
    if args.json:
        emit_json(result)
        return 0
    print(f"{result['model']} on {result['system']}: batch {result['batch']}, {lengths_text(result)}, "
          f"routing {result['routing']}")
    rows = [{"step": r["step"], "throughput_tok_s": r.get("throughput_tok_s"),
             "speedup_over_moe_lightning": r.get("speedup_over_moe_lightning"),
             "note": "" if r.get("feasible") else failure_note(r["error"])} for r in result["steps"]]
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0




def cmd_sensitivity(args: argparse.Namespace) -> int:
    from experiments.sensitivity import parse_vary, run_sensitivity, tornado_plot

    config = simulation_config(args)
    vary = parse_vary(args.vary)
    if args.against is not None:
        from sim.policies import POLICIES

        if args.against not in POLICIES:
            raise SimInputError(f"--against {args.against!r}: not a policy; choose from {', '.join(POLICIES)}")
    table = run_sensitivity(config, vary, args.against, progress=True, rank_by=args.rank_by)
    for line in table.attrs.get("skipped", []):
        print(f"not varied: {line}", file=sys.stderr)
    if args.csv:
        write_csv_file(table, args.csv)
    if args.plot:
        tornado_plot(table, Path(args.plot), f"{config.model} on {config.system} under {config.policy}: "
                                             "one number of the system at a time", args.against)
    if args.json:
        emit_json(table.to_dict("records"))
        return 0
    base = table.iloc[0]
    against = ""
    if args.against:
        against = (f", {base['speedup']:.2f}x {args.against}" if math.isfinite(base["speedup"])
                   else f"; {args.against} does not run ({base['note'].removeprefix(args.against + ': ')})")
    print(f"{config.model} on {config.system} under {config.policy}: base {base['throughput_tok_s']:.1f} tok/s"
          + against)
    shown = table.iloc[1:].copy()
    shown["change"] = shown["change"].map(lambda v: f"{100 * v:+.1f}%" if v == v else "n/a")
    cols = ["field", "was", "value", "throughput_tok_s", "change"]
    if args.against:
        shown["speedup_change"] = shown["speedup_change"].map(lambda v: f"{100 * v:+.1f}%" if v == v else "n/a")
        cols += ["speedup", "speedup_change"]
    if shown["note"].astype(bool).any():
        cols.append("note")
    print(shown[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """presets, policies, simulate, run-plan, sensitivity, compare, ablation."""
    p = sub.add_parser("presets", help="list model and hardware presets, or show one as YAML")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--show", metavar="NAME", help="print preset NAME as YAML, or a model / system spec file "
                       "(a Hugging Face config.json too) as the simulator reads it")
    p.add_argument("--json", action="store_true", help="print the lists as JSON")
    which.add_argument("--lengths", action="store_true",
                       help="list the request-length presets (--prompt-len/--gen-len preset:NAME) with their sources")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("policies", help="list policies and their options")
    p.set_defaults(func=cmd_policies)

    p = sub.add_parser("simulate", help="simulate one model, system, policy and workload")
    add_config_flags(p, ("target", "policy", "workload", "cost"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeline", metavar="FILE", type=output_file(".json"),
                   help="write a Chrome-trace JSON timeline (Perfetto)")
    p.add_argument("--plot", metavar="FILE", type=output_file(*IMAGE_SUFFIXES),
                   help="write a PNG: busy time per resource and one decode step")
    p.add_argument("--plan-out", metavar="FILE", type=output_file(".parquet"),
                   help="write the plan as Parquet (engine-neutral; see run-plan)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("run-plan", help="simulate a plan saved with `simulate --plan-out`")
    p.add_argument("file")
    p.add_argument("--verify", metavar="TRACE", help="first prove the plan computes every expert assignment of this "
                   "routing trace exactly once (split and merged scopes included)")
    p.add_argument("--profile", metavar="DIR", help="op times from a measured profile (coxmoe calibrate profile); "
                   "default the roofline: a plan file does not record the cost model it was built under")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeline", metavar="FILE", type=output_file(".json"),
                   help="write a Chrome-trace JSON timeline (Perfetto)")
    p.set_defaults(func=cmd_run_plan)

    p = sub.add_parser("sensitivity", help="how a point's throughput moves with each number of the system, one at "
                       "a time (default: every number whose source is [assumed] or [borrowed], at half and twice)")
    add_config_flags(p, ("target", "policy", "workload", "cost"))
    p.add_argument("--vary", action="append", metavar="FIELD=V1,V2",
                   help="a system number and the values to try (`presets --show` path, as --set); repeatable")
    p.add_argument("--against", metavar="POLICY", help="also run this policy under every variant: the speedup")
    p.add_argument("--rank-by", choices=("throughput", "speedup"), default="throughput",
                   help="order the variants by their throughput change or (with --against) their speedup change")
    p.add_argument("--csv", metavar="FILE", type=output_file(".csv", ".gz", ".bz2", ".xz", ".zip"),
                   help="write every row as CSV (.csv.gz and the like compress)")
    p.add_argument("--plot", metavar="FILE", type=output_file(*IMAGE_SUFFIXES), help="write a tornado chart")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_sensitivity)

    compare_help = "the paper's system and its baselines (or --policies), each at its own best configuration"
    for name, func, help_text in (("compare", cmd_compare, compare_help),
                                  ("ablation", cmd_ablation, "CoX-MoE's ablation: the paper's steps, features off")):
        p = sub.add_parser(name, help=help_text)
        add_config_flags(p, ("target", "workload"))
        if name == "compare":
            from sim.compare import COMPARED
            from sim.policies import POLICIES

            others = ", ".join(n for n in POLICIES if n not in COMPARED)
            p.add_argument("--policies", help=f"comma-separated policies (default: {', '.join(COMPARED)}; any other "
                                              f"by name: {others})")
        p.add_argument("--workers", type=positive_int,
                       help="processes running the policies side by side (default: one per CPU, as many as "
                            "memory holds at --max-gib each; results do not depend on it)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=func)

