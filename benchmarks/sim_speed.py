"""Simulator speed: events per second on the reference scenario next to a bare SimPy loop, same machine.

Scenario (issue 2): Mixtral-8x7B on a100-80g-8452y, batch 1024, prompt 800, output 256, `stream-experts`,
uniform synthetic routing, seed 0. Prints the median of --repeats runs of each stage and the engine's rate against a
bare SimPy loop's events/s (one process yielding a timeout per event): the engine as `simulate` runs it (a plan in
which no op slows another is list-scheduled in one pass, sim/uncontended.py) and the SimPy machine alone
(`run_plan(fast=False)`), each as ops/s and, for SimPy, events/s.

    python benchmarks/sim_speed.py [--repeats 3]
"""

from __future__ import annotations

import statistics
import time

import simpy

from experiments.cli.common import ScriptParser, positive_int, run_script
from sim.api import gc_paused, resolve_model, resolve_routing, resolve_system, simulate_plan
from sim.cost import RooflineCostModel
from sim.engine import run_plan
from sim.policies import PlanContext, make_policy

SCENARIO = dict(model="mixtral-8x7b", system="a100-80g-8452y", policy="stream-experts", batch=1024,
                prompt_len=800, gen_len=256, routing="uniform", seed=0)


def bare_simpy_events_per_s(events: int) -> float:
    """A single process yielding `events` unit timeouts: SimPy's own ceiling on this machine."""
    env = simpy.Environment()

    def loop():
        for _ in range(events):
            yield env.timeout(1)

    env.process(loop())
    t0 = time.perf_counter()
    env.run()
    return events / (time.perf_counter() - t0)


def one_run() -> dict[str, float]:
    s = SCENARIO
    model, system = resolve_model(s["model"]), resolve_system(s["system"])
    t0 = time.perf_counter()
    wl, trace, _ = resolve_routing(model, s["batch"], s["prompt_len"], s["gen_len"], None, s["routing"], s["seed"])
    t1 = time.perf_counter()
    with gc_paused():
        plan = make_policy(s["policy"]).build(PlanContext(model, system, wl, trace))
        t2 = time.perf_counter()
        record, metrics = simulate_plan(plan)
        t3 = time.perf_counter()
        reference = run_plan(plan, RooflineCostModel(system), fast=False)
        t4 = time.perf_counter()
    return {"trace_s": t1 - t0, "plan_s": t2 - t1, "engine_s": t3 - t2, "total_s": t3 - t0, "simpy_s": t4 - t3,
            "listed": float(record.engine == "list"), "events": reference.events, "ops": len(plan.ops),
            "throughput_tok_s": wl.generated_tokens / metrics["total_s"]}


def main() -> None:
    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    runs, bare = [], []
    for _ in range(args.repeats):
        runs.append(one_run())
        bare.append(bare_simpy_events_per_s(runs[-1]["events"]))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    bare_eps = statistics.median(bare)
    ops_s, simpy_ops_s = med["ops"] / med["engine_s"], med["ops"] / med["simpy_s"]
    simpy_eps = med["events"] / med["simpy_s"]
    how = "list-scheduled, no op slowed another" if med["listed"] == 1.0 else "on SimPy"
    print(f"scenario: {SCENARIO}")
    print(f"simulated throughput {med['throughput_tok_s']:.1f} tok/s; {int(med['ops'])} ops, "
          f"{int(med['events'])} events on the SimPy machine")
    print(f"median of {args.repeats} runs (s): trace synthesis {med['trace_s']:.2f}, plan build {med['plan_s']:.2f}, "
          f"engine {med['engine_s']:.2f} ({how}), end to end {med['total_s']:.2f}; SimPy machine alone "
          f"{med['simpy_s']:.2f}")
    print(f"bare SimPy loop:              {bare_eps / 1e6:.3f} M events/s")
    print(f"engine as simulate runs it:   {ops_s / 1e6:.3f} M ops/s     (ops per bare event {ops_s / bare_eps:.2f})")
    print(f"SimPy machine alone:          {simpy_eps / 1e6:.3f} M events/s  (ratio {simpy_eps / bare_eps:.2f}; "
          f"{simpy_ops_s / 1e6:.3f} M ops/s, ops per bare event {simpy_ops_s / bare_eps:.2f})")

if __name__ == "__main__":
    run_script(main, "sim_speed")
