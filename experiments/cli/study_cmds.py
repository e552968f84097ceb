"""Studies over many points: sweep, sweep-results, reproduce (the paper's figures), timeline (Gantt charts)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.cli.common import nonneg_int, output_dir, output_file, output_stem, positive_int, seed_int
from sim.atomic_files import write_csv_file
from sim.errors import SimInputError
from sim.policies import parse_kv_pairs


def cmd_sweep(args: argparse.Namespace) -> int:
    from experiments.sweep.run import check_request, run_sweep
    from experiments.sweep.spec import load_spec
    from experiments.sweep.store import ResultStore

    points = load_spec(args.spec)
    check_request(args.engine, args.workers, args.ray_address)  # before the store: a refusal leaves no empty file
    store = ResultStore(args.out)
    try:
        summary = run_sweep(points, store, args.engine, args.workers, args.ray_address)
    except SimInputError:  # refused once running (a cluster that would not take the job): no empty store left
        store.discard_if_unused()
        raise
    finally:
        store.close()  # (again, after a discard: a no-op)
    rerun = f" (of them {summary.stale} finished before by other code or library versions)" if summary.stale else ""
    print(f"sweep {args.spec} ({args.engine}): {summary.total} points, {summary.skipped} already done, "
          f"{summary.ok} ran{rerun}, {summary.failed} failed, {summary.wall_s:.1f} s; results in {store.path}")
    if summary.failed and not args.allow_failures:
        print(f"coxmoe sweep: {summary.failed} point(s) failed (see `coxmoe sweep-results {args.out}`; "
              "--allow-failures exits 0 anyway)", file=sys.stderr)
        return 1
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from experiments.reproduce import FIGURE_OPTIONS, ReproduceOptions, reproduce
    from experiments.reproduce.report import reproduce_all
    from experiments.tables import markdown_table

    if args.keep and args.name != "all":
        raise SimInputError(f"--keep carries figures of `reproduce all`; `reproduce {args.name}` reruns only "
                            f"{args.name} (omit --keep)")
    given = {"workers": args.workers is not None, "engine": args.engine != "local",
             "ray_address": args.ray_address is not None, "profile": args.profile is not None,
             "record": args.record is not None, "points": bool(args.points)}
    unused = [o for o, set_ in given.items() if set_ and args.name not in ("all", FIGURE_OPTIONS[o])]
    if unused:
        flags = ", ".join("--" + o.replace("_", "-") for o in unused)
        raise SimInputError(f"reproduce {args.name} does not use {flags} (for "
                            f"{', '.join(sorted({FIGURE_OPTIONS[o] for o in unused}))}); omit it")
    if args.name in ("fig7", "all"):  # the sweep's own checks, before any figure runs
        from experiments.sweep.run import check_request

        check_request(args.engine, args.workers, args.ray_address)
    options = ReproduceOptions(Path(args.out), quick=args.quick, workers=args.workers or 1, engine=args.engine,
                               ray_address=args.ray_address, profile=Path(args.profile) if args.profile else None,
                               record=Path(args.record) if args.record else None, seed=args.seed,
                               keep=tuple(args.keep or ()), points=tuple(args.points or ()),
                               system_settings=tuple(sorted(parse_kv_pairs(args.set, "--set").items())))
    if args.name == "all":
        results, report = reproduce_all(options)
    else:
        results, report = [reproduce(args.name, options)], None
    for r in results:
        more = f"\n({len(r.table) - 40} more rows in the CSV)" if len(r.table) > 40 else ""
        print(f"== {r.title}\n{markdown_table(r.table.head(40), '{:.4g}')}{more}\npaper: {r.claim}\nhere:  "
              f"{r.finding}")
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


# Settings `sweep-results` shows beside the usual columns when its rows differ in them.
VARYING_COLUMNS = ("policy_options", "system_settings", "routing", "seed", "reuse_prob", "expert_precision",
                   "decode_sample", "trace", "profile")


def cmd_sweep_results(args: argparse.Namespace) -> int:
    from experiments.sweep.store import load_results

    df = load_results(args.dir)
    if args.spec:  # only the points this spec names (a folder may hold the results of earlier specs too)
        from experiments.sweep.spec import load_spec

        keys = {p.key for p in load_spec(args.spec)}
        df = df[df["key"].isin(keys)].reset_index(drop=True)
        if len(df) < len(keys):
            print(f"{len(keys) - len(df)} of the spec's {len(keys)} points have no result yet", file=sys.stderr)
    if args.csv:
        write_csv_file(df, args.csv)
    if df.empty:  # a sweep stopped before its first point finished
        print("0 points: the sweep has not finished any point yet")
        return 0
    shown = ["key", "status", "model", "system", "policy", "batch", "prompt_len", "gen_len", "throughput_tok_s",
             "wall_s", "error"]
    for name in VARYING_COLUMNS:  # shown where the rows differ in them, so no two rows look alike
        if name in df.columns and df[name].map(str).nunique() > 1:  # map: astype(str) keeps NaN apart
            shown.insert(shown.index("throughput_tok_s"), name)
    stale = int(df["stale"].sum())
    note = f" ({stale} recorded by other code or library versions: a rerun of the sweep simulates them again)" \
        if stale else ""
    print(f"{len(df)} points: {int((df['status'] == 'ok').sum())} ok, {int((df['status'] == 'failed').sum())} "
          f"failed{note}")
    if len(df):
        table = df[[c for c in shown if c in df.columns]].astype(object).fillna("")
        print(table.to_string(index=False, max_colwidth=60))
    return 0




def register(sub: argparse._SubParsersAction) -> None:
    """sweep, sweep-results, reproduce, timeline."""
    from experiments.reproduce import FIGURES
    from experiments.sweep import ENGINES

    p = sub.add_parser("sweep", help="run every point of a YAML sweep spec, resumably (finished points are skipped)")
    p.add_argument("spec", help="YAML spec: fixed values and axes (see experiments/sweep/spec.py)")
    p.add_argument("--out", required=True, help="results directory (results.sqlite, one row per point)")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: a process pool; ray: Ray tasks on a cluster or a local Ray instance")
    p.add_argument("--workers", type=positive_int,
                   help="local processes, or the CPUs of a local Ray instance (default: the CPUs this process may use)")
    p.add_argument("--ray-address", help="--engine ray: cluster to join (default: $RAY_ADDRESS, else a local instance)")
    p.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even when some points failed (default: exit 1; failed points are retried next run)")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("reproduce", help="the paper's figures (PNG, PDF, CSV and a printed table); all: every one "
                       "plus a Markdown report", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="figures:\n" + "\n".join(f"  {k:<12} {v}" for k, v in FIGURES.items()))
    p.add_argument("name", help=f"one of {', '.join(FIGURES)}, or all")
    p.add_argument("--out", required=True, type=output_dir, help="output directory")
    p.add_argument("--quick", action="store_true", help="small grids that exercise each figure's code path in "
                   "seconds (smoke tests: fewer models, designs and points than the full figure); the numbers are "
                   "not the paper's setting")
    p.add_argument("--workers", type=positive_int, help="fig7: local processes or local Ray CPUs (default 1)")
    p.add_argument("--engine", choices=ENGINES, default="local", help="fig7: sweep engine")
    p.add_argument("--ray-address", help="fig7 with --engine ray: cluster to join (default: $RAY_ADDRESS)")
    p.add_argument("--profile", metavar="DIR", help="calibration: an existing `coxmoe calibrate profile` directory "
                   "(default: profile DeepSeek-V2-Lite's shapes on this machine first)")
    p.add_argument("--record", metavar="FILE", help="timeline: a measured timeline from `coxmoe execute --timeline`")
    p.add_argument("--points", action="append", metavar="PATTERN", help="validation: only the points whose id or "
                   "group matches PATTERN (shell-style, e.g. 'kt-v02-*' or ktransformers-dsv3); repeatable")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="a number of the system spec on every simulated paper figure's machine (as simulate --set; "
                        "validation and calibration keep their own machines); repeatable")
    p.add_argument("--keep", action="append", metavar="NAME", help="all: do not rerun figure NAME; carry its "
                   "summary row and section from the report already in --out (repeatable)")
    p.set_defaults(func=cmd_reproduce)
    p = sub.add_parser("timeline", help="Gantt chart (PNG + PDF) of one decode step from Chrome-trace timelines")
    p.add_argument("files", nargs="+", help="timelines from simulate/execute --timeline; one panel each")
    p.add_argument("--out", required=True, type=output_stem, help="output stem (writes STEM.png and STEM.pdf)")
    p.add_argument("--step", type=nonneg_int, help="decode step to draw (default: each timeline's middle one)")
    p.set_defaults(func=cmd_timeline)

    p = sub.add_parser("sweep-results", help="summarise (or export) a sweep's results")
    p.add_argument("dir", help="a sweep's --out directory")
    p.add_argument("--csv", metavar="FILE", type=output_file(".csv", ".gz", ".bz2", ".xz", ".zip"),
                   help="also write every row to this CSV file (compressed by its suffix: .csv.gz, ...)")
    p.add_argument("--spec", help="only the points of this sweep spec (the folder may hold earlier specs' results)")
    p.set_defaults(func=cmd_sweep_results)

