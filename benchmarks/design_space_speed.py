"""Design-space speed (issue 13): each figure the issue names, next to its target and a bare SimPy loop.

Runs, in one process each (a fresh interpreter per case, so no case profits from another's trace cache):
  standard   Mixtral-8x7B, a100-80g-8452y, coxmoe, 1,024 x (800 + 256), default routing, full decode, search
             included                                                     target < 1 s (goal 0.5 s)
  qwen-4096  Qwen3-30B-A3B, B=4096, 800/256, coxmoe, full decode       target < 15 s and < 1 GB peak RSS
  compare    `compare` Qwen3-30B-A3B, B=1024, 800/256, full decode      target < 20 s
  engine     the standard scenario's plan (uniform routing) through `run_plan` alone, best of 3: ops simulated
             per second over a bare SimPy loop's events per second (`ops_per_bare_event`, 1 for an engine
             that spent one bare timeout per op)                        target >= 0.5 of the bare loop
             `run_plan` list-schedules a plan in which no op slows another (sim/uncontended.py); the case also
             times the SimPy machine alone on the same plan (`fast=False`): `simpy_ratio` is its events/s over
             the bare loop's, `simpy_ops_per_bare_event` its ops/s over them
and, with --fig7, the fig7 sweep from scratch on 2 local workers       target < 60 s.

    python benchmarks/design_space_speed.py [--cases standard,engine] [--fig7] [--breakdown] [--repeats N]

Prints one line per case: wall seconds (with --repeats, the fastest of N fresh processes, every run listed), peak
resident memory of its process (the largest over the runs), the simulated result (so a change that moves it
shows), and whether the target is met.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.cli.common import ScriptParser, positive_int

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "standard": ("from sim.api import simulate\n"
                 "r = simulate('mixtral-8x7b', 'a100-80g-8452y', 'coxmoe', batch=1024, prompt_len=800, gen_len=256)\n"
                 "out = {'throughput_tok_s': r.throughput_tok_s, 'events': r.events, 'ops': r.num_ops}", 1.0, None),
    "qwen-4096": ("from sim.api import simulate\n"
                  "r = simulate('qwen3-30b-a3b', 'a100-80g-8452y', 'coxmoe', batch=4096, prompt_len=800, "
                  "gen_len=256)\n"
                  "out = {'throughput_tok_s': r.throughput_tok_s, 'events': r.events, 'ops': r.num_ops}", 15.0, 1.0),
    "compare": ("from sim.compare import compare\n"
                "r = compare('qwen3-30b-a3b', 'a100-80g-8452y', batch=1024, prompt_len=800, gen_len=256)\n"
                "out = {p: v.get('throughput_tok_s') for p, v in r['policies'].items()}", 20.0, None),
    "engine": ("import time, simpy\n"
               "from sim.api import gc_paused, resolve_model, resolve_routing, resolve_system\n"
               "from sim.cost import RooflineCostModel\n"
               "from sim.engine import run_plan\n"
               "from sim.policies import PlanContext, make_policy\n"
               "m, s = resolve_model('mixtral-8x7b'), resolve_system('a100-80g-8452y')\n"
               "wl, tr, _ = resolve_routing(m, 1024, 800, 256, None, 'uniform', 0)\n"
               "def best(fast):\n"
               "    times = []\n"
               "    for _ in range(3):\n"
               "        t = time.perf_counter(); rec = run_plan(plan, RooflineCostModel(s), fast=fast)\n"
               "        times.append(time.perf_counter() - t)\n"
               "    return rec, min(times)\n"
               "with gc_paused():\n"
               "    plan = make_policy('coxmoe').build(PlanContext(m, s, wl, tr))\n"
               "    rec, engine_s = best(True)\n"
               "    ref, simpy_s = best(False)\n"
               "env = simpy.Environment()\n"
               "def loop():\n"
               "    for _ in range(ref.events):\n"
               "        yield env.timeout(1)\n"
               "env.process(loop()); t = time.perf_counter(); env.run(); bare_s = time.perf_counter() - t\n"
               "bare = ref.events / bare_s\n"
               "out = {'ops': len(plan.ops), 'engine': rec.engine, 'engine_s': engine_s, 'simpy_s': simpy_s,\n"
               "       'simpy_events': ref.events, 'bare_events_per_s': bare,\n"
               "       'ops_per_bare_event': len(plan.ops) / engine_s / bare,\n"
               "       'simpy_ratio': ref.events / simpy_s / bare,\n"
               "       'simpy_ops_per_bare_event': len(plan.ops) / simpy_s / bare}", None, None),
}

# The simulator's modules are imported before the clock starts, with or without --breakdown (whose prologue
# imports them too): 0.7 s of imports had counted in one mode only.
RUNNER = """
import json, resource, sys, time
import sim.api, sim.compare, sim.policies
{prologue}
t0 = time.perf_counter()
{code}
out['wall_s'] = time.perf_counter() - t0
out['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB -> GB (the targets')
{epilogue}
print('RESULT ' + json.dumps(out))
"""

# --breakdown: wall seconds per stage, by wrapping the functions each stage runs through (no profiler, so the
# split is not skewed toward Python-heavy stages): trace synthesis; the policy's analytic ranking (its search
# space, including the trace counts it needs); plan building (the search's time less ranking and engine runs);
# the engine; the rest (metrics, checks outside the search, start-up of the point); and how many decode steps the
# plan builds copied from an earlier step of their shape (`sim/policies/step_replay.py`) instead of emitting.
BREAKDOWN_PROLOGUE = """
import sim.api as _api, sim.search as _search
from sim.policies import POLICIES as _POLICIES
_split = {'trace_s': 0.0, 'ranking_s': 0.0, 'search_s': 0.0, 'engine_s': 0.0, 'engine_in_search_s': 0.0,
          'engine_runs': 0}
_in_search = [False]
def _timed(owner, name, key, engine=False, search=False):
    f = getattr(owner, name)
    def g(*a, **k):
        _in_search[0] |= search
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            dt = time.perf_counter() - t
            _split[key] += dt
            if engine:
                _split['engine_runs'] += 1
                if _in_search[0]:
                    _split['engine_in_search_s'] += dt
            if search:
                _in_search[0] = False
    setattr(owner, name, g)
import sim.policies.step_replay as _replay
_replay_of = _replay.replay
def _counted_replay(*a, **k):
    done = _replay_of(*a, **k)
    _split['replayed_steps'] += done
    return done
_replay.replay = _counted_replay
_split['replayed_steps'] = 0
_timed(_api, 'synthesise', 'trace_s')
_timed(_search, 'run_plan', 'engine_s', engine=True)
_timed(_api, 'run_plan', 'engine_s', engine=True)
_timed(_api, 'plan_policy', 'search_s', search=True)
_timed(_search, 'plan_policy', 'search_s', search=True)  # Policy.build's path (its late import finds this one)
for _cls in set(_POLICIES.values()):
    if 'search_space' in vars(_cls):
        _timed(_cls, 'search_space', 'ranking_s')
"""
BREAKDOWN_EPILOGUE = """
_builds = _split['search_s'] - _split['ranking_s'] - _split['engine_in_search_s']
out['split_s'] = {'trace': _split['trace_s'], 'ranking': _split['ranking_s'], 'plan_builds': _builds,
                  'engine': _split['engine_s'], 'engine_runs': _split['engine_runs'],
                  'replayed_steps': _split['replayed_steps'],
                  'other': out['wall_s'] - _split['trace_s'] - _split['search_s'] - _split['engine_s']
                           + _split['engine_in_search_s']}
"""


def run_case(name: str, breakdown: bool = False) -> dict:
    code, _, _ = CASES[name]
    runner = RUNNER.format(code=code, prologue=BREAKDOWN_PROLOGUE if breakdown else "",
                           epilogue=BREAKDOWN_EPILOGUE if breakdown else "")
    proc = subprocess.run([sys.executable, "-c", runner], cwd=ROOT, capture_output=True,
                          text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{name}: failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(line.removeprefix("RESULT "))


FIG7_WRAPPER = """
import json, resource, subprocess, sys
proc = subprocess.run([sys.executable, "-m", "experiments.cli", "sweep", "experiments/specs/fig7.yaml", "--out",
                       sys.argv[1], "--workers", "2"], capture_output=True, text=True, check=False)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
print(json.dumps({"peak_rss_gb": peak, "ok": proc.returncode == 0, "tail": proc.stdout.strip()[-200:]}))
"""


def fig7_sweep() -> dict:
    """The fig7 grid from scratch on 2 local workers (a fresh results directory). Run under a wrapper process whose
    children are the sweep's alone, so the peak is that of its largest process, not of an earlier case's."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", FIG7_WRAPPER, out], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        wall = time.perf_counter() - t0
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"peak_rss_gb": float("nan"), "ok": False, "tail": (proc.stdout + proc.stderr).strip()[-200:]}
    return {"wall_s": wall, **result}


# numba's trace kernels (traces/jit.py) compiled into their disk cache before any case is timed, for the signatures
# the cases use (one-byte ids, two-byte count tables): a user's first run pays this once, later runs load them.
WARM_JIT = """
import time
import numpy as np
from traces.synth import SynthConfig, generate_trace
t = time.perf_counter()
for k, routing in ((8, 'zipf:1.0'), (8, 'uniform'), (2, 'table:mixtral-8x7b')):
    experts = 8 if k == 2 else 128
    tr = generate_trace(SynthConfig('warm', 2, experts, k, routing), np.full(64, 300), np.full(64, 9),
                        prompt_counts=True)
    tr.decode_step_counts([np.arange(64)])
print(time.perf_counter() - t)
"""


def warm_jit() -> float:
    """Seconds to compile (or load) the trace kernels in a fresh process, COXMOE_JIT=on."""
    proc = subprocess.run([sys.executable, "-c", WARM_JIT], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COXMOE_JIT": "on"})
    return float(proc.stdout.strip().splitlines()[-1])


ENGINE_RATIO_TARGET = 0.5  # issue 13: engine events/s at least half a bare SimPy loop's


def verdict(value: float, target: float | None) -> str:
    return "" if target is None else ("meets" if value < target else "misses") + f" < {target:g}"


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--fig7", action="store_true", help="also the fig7 sweep from scratch (minutes)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also each case's wall seconds by stage: trace synthesis, analytic ranking, plan "
                             "builds, engine runs, the rest")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="runs of each case (and of the fig7 sweep), each in a fresh process: the fastest is "
                             "judged against the target, every wall time is printed, and the peak is the largest "
                             "(default 1; a VM whose speed moves between runs needs several)")
    args = parser.parse_args()
    names = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    print(f"numba's trace kernels compiled or loaded in {warm_jit():.2f} s before the cases (a first run on a "
          "machine pays the compile once)")
    for name in names:
        runs = [run_case(name, args.breakdown) for _ in range(args.repeats)]
        r = min(runs, key=lambda run: run["wall_s"])
        r["peak_rss_gb"] = max(run["peak_rss_gb"] for run in runs)
        _, wall_target, rss_target = CASES[name]
        extra = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                 if k not in ("wall_s", "peak_rss_gb", "split_s")}
        if "split_s" in r:
            extra["split_s"] = {k: round(v, 2) for k, v in r["split_s"].items()}
        print(f"{name:10} {r['wall_s']:8.2f} s {verdict(r['wall_s'], wall_target):12} peak RSS "
              f"{r['peak_rss_gb']:.2f} GB {verdict(r['peak_rss_gb'], rss_target):12} {extra}{walls(runs)}")
        if "simpy_ratio" in r:  # the engine case, against a bare SimPy loop's events/s (target >= 0.5)
            ratio = r["ops_per_bare_event"]
            how = ("list-scheduled: no op slowed another" if r["engine"] == "list" else "on the SimPy machine")
            print(f"{'':10} the engine ({how}) simulates {ratio:.3f} ops per bare-loop event time: "
                  f"{'meets' if ratio >= ENGINE_RATIO_TARGET else 'misses'} >= {ENGINE_RATIO_TARGET:g}; the SimPy "
                  f"machine alone {r['simpy_ratio']:.3f} of the bare loop's events/s "
                  f"({r['simpy_ops_per_bare_event']:.3f} ops per bare event)")
    if args.fig7:
        runs = [fig7_sweep() for _ in range(args.repeats)]
        r = min(runs, key=lambda run: run["wall_s"])
        peak, ok = max(run["peak_rss_gb"] for run in runs), all(run["ok"] for run in runs)
        print(f"{'fig7':10} {r['wall_s']:8.2f} s {verdict(r['wall_s'], 60.0):12} peak RSS (largest process) "
              f"{peak:.2f} GB  {'ok' if ok else 'FAILED'}: {r['tail']}{walls(runs)}")


def walls(runs: list[dict]) -> str:
    """Every run's wall seconds, in order, where there were several (the line reports the fastest)."""
    return "" if len(runs) < 2 else "  runs: " + ", ".join(f"{run['wall_s']:.2f}" for run in runs) + " s"


if __name__ == "__main__":
    main()
