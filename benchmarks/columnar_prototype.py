"""What a columnar plan would save the engine (docs/columnar-plan.md, issue 13): on a CoX-MoE plan, with its ops
already held as columns (their extraction from `Op` objects is timed apart: the builder would write them), times
a vectorised check of the per-op conditions `Plan.check` tests first, the pricing as today, and the forward pass of
the list schedule over dependency lists in CSR form, next to `run_plan` as it is. The forward pass's schedule is
compared with `run_plan`'s (it must be the same, op for op), and the vectorised check's verdict with
`Plan.check`'s. A measurement for the design, not a second engine: it goes when the columnar stages land.

    python benchmarks/columnar_prototype.py [--batch 1024 --prompt-len 800 --gen-len 256]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import chain
from operator import attrgetter
from typing import Any

import numpy as np

from experiments.cli.common import ScriptParser, positive_int

INT_FIELDS = ("id", "step", "layer", "micro_batch", "tokens", "flops", "bytes", "expert", "kv_tokens", "scope")


def best_of(f: Callable[[], Any], repeats: int = 5) -> tuple[float, Any]:
    """(fastest seconds, result) of `repeats` calls."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return min(times), out


def columns(plan) -> dict[str, np.ndarray]:
    """The plan's ops as the columns the check and the forward pass read (deps as CSR: `dep_start`, `dep_ids`)."""
    from sim.plan import Phase
    from sim.topology import topology_of

    ops, n = plan.ops, len(plan.ops)
    index = {name: k for k, name in enumerate(topology_of(plan.system).streams)}
    col = {f: np.fromiter(map(attrgetter(f), ops), np.int64, n) for f in INT_FIELDS}
    col["decode"] = np.fromiter((op.phase is Phase.DECODE for op in ops), np.bool_, n)
    col["stream"] = np.fromiter((index[op.stream] for op in ops), np.int16, n)
    col["plain"] = np.fromiter((not (op.alloc or op.free or op.members) for op in ops), np.bool_, n)
    deps = list(map(attrgetter("deps"), ops))
    lens = np.fromiter(map(len, deps), np.int64, n)
    col["dep_start"] = np.concatenate([[0], np.cumsum(lens)])
    col["dep_ids"] = np.fromiter(chain.from_iterable(deps), np.int64, int(lens.sum()))
    return col


def vectorised_check(col: dict[str, np.ndarray], plan) -> bool:
    """`Plan.check`'s first per-op test (ids are positions, deps point backwards, steps, layers, experts, work in
    range, no scope) as column-wide comparisons; True when every op passes."""
    from sim.plan import MAX_OP_WORK

    n = col["id"].size
    max_step = int(plan.workload.gen_lens.max()) - 1
    step = col["step"]
    ok = (col["id"] == np.arange(n)) & (col["tokens"] >= 0) & (col["kv_tokens"] >= 0) & (col["scope"] == -1)
    ok &= np.where(col["decode"], (step >= 1) & (step <= max_step), step == 0)
    ok &= (col["layer"] >= -1) & (col["layer"] <= plan.model.num_layers) & (col["micro_batch"] >= -1)
    ok &= (col["expert"] >= -1) & (col["expert"] < max(plan.model.num_experts, 1))
    ok &= (col["flops"] >= 0) & (col["flops"] <= MAX_OP_WORK) & (col["bytes"] >= 0) & (col["bytes"] <= MAX_OP_WORK)
    owner = np.repeat(np.arange(n), np.diff(col["dep_start"]))
    return bool(ok.all()) and bool(((col["dep_ids"] >= 0) & (col["dep_ids"] < owner)).all())


def forward(col: dict[str, np.ndarray], durations: list[int], streams: int) -> tuple[list[int], list[int]]:
    """Every op's start and end when nothing slows anything (the list schedule's forward pass) over CSR lists."""
    starts, ids, stream = col["dep_start"].tolist(), col["dep_ids"].tolist(), col["stream"].tolist()
    n = len(stream)
    start, end, free_at = [0] * n, [0] * n, [0] * streams
    for i in range(n):
        s = stream[i]
        t = free_at[s]
        for d in ids[starts[i]:starts[i + 1]]:
            e = end[d]
            if e > t:
                t = e
        start[i] = t
        free_at[s] = end[i] = t + durations[i]
    return start, end


def main() -> None:
    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=1024)
    parser.add_argument("--prompt-len", type=positive_int, default=800)
    parser.add_argument("--gen-len", type=positive_int, default=256)
    args = parser.parse_args()

    from sim.api import gc_paused, resolve_model, resolve_routing, resolve_system
    from sim.cost import GroupPrices, RooflineCostModel
    from sim.engine import run_plan
    from sim.policies import PlanContext, make_policy
    from sim.topology import topology_of

    model, system = resolve_model("mixtral-8x7b"), resolve_system("a100-80g-8452y")
    wl, trace, _ = resolve_routing(model, args.batch, args.prompt_len, args.gen_len, None, "uniform", 0)
    with gc_paused():
        plan = make_policy("coxmoe").build(PlanContext(model, system, wl, trace))
        extract_s, col = best_of(lambda: columns(plan), 3)
        check_s, verdict = best_of(lambda: vectorised_check(col, plan))
        plan.check()  # raises if the plan is not a checked one; the vectorised verdict must agree
        cost = RooflineCostModel(system)
        cost.prepare(plan)
        group = GroupPrices(cost)
        price_s, durations = best_of(lambda: [group(op) if op.members else cost.op_time_ns(op) for op in plan.ops])
        forward_s, (start, end) = best_of(lambda: forward(col, durations, len(topology_of(system).streams)))
        record = run_plan(plan, RooflineCostModel(system))
        run_s, _ = best_of(lambda: run_plan(plan, RooflineCostModel(system)))
    same = record.engine == "list" and np.array_equal(record.start_ns, start) and np.array_equal(record.end_ns, end)
    print(f"{len(plan.ops):,} ops; columns read out of Op objects {extract_s * 1e3:.1f} ms (the builder would write "
          f"them)")
    print(f"vectorised check {check_s * 1e3:.1f} ms (passes: {verdict}); pricing {price_s * 1e3:.1f} ms; forward "
          f"pass {forward_s * 1e3:.1f} ms (run_plan's schedule: {same}); run_plan today {run_s * 1e3:.1f} ms")
    if not (verdict and same):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
