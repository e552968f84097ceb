"""The one-pass list schedule (`sim.uncontended`): where no op slows another it is the SimPy machine's schedule,
op for op; wherever a resource is oversubscribed, or a pool overflows, the SimPy machine runs instead and gives
the result or error the plan has."""

from __future__ import annotations

import numpy as np
import pytest
from schedules import assert_same_schedule, both_schedules

import sim.uncontended as uncontended
from sim.api import simulate
from sim.cost import RooflineCostModel
from sim.engine import PlanDeadlock, run_plan
from sim.errors import CapacityError, SimInputError
from sim.plan import OpKind, Phase, Plan, PlanBuilder, Stream
from sim.policies import POLICIES
from sim.specs import ModelSpec, load_system
from sim.topology import topology_of
from sim.workload import Workload

MODEL = ModelSpec(name="tiny", num_layers=4, hidden_size=256, vocab_size=1000, num_attention_heads=8,
                  num_kv_heads=2, head_dim=32, num_experts=8, top_k=2, expert_intermediate_size=512)
SYSTEM = load_system("a100-80g-8452y")
HOST_STREAMS = (Stream.CPU, Stream.CPU_EXPERTS, Stream.H2D, Stream.H2D_ACT, Stream.D2H)


class StubCost:
    """Durations of whole microseconds (`flops`) and usages picked by `bytes` from a short list: equal-time
    events, resources filled exactly to capacity, and oversubscribed ones."""

    USAGES = ((0.25, 0.25), (0.5, 0.0), (0.0, 0.5), (0.25, 0.5), (0.5, 0.5), (1.0, 1.0), (0.75, 0.125))

    def __init__(self, system=SYSTEM):
        self.topology = topology_of(system)

    def op_time_ns(self, op) -> int:
        return 1000 * op.flops

    def usage(self, op) -> tuple[float, float]:
        return self.USAGES[op.bytes % len(self.USAGES)]


COST = StubCost()


def plan_of(b: PlanBuilder) -> Plan:
    return Plan("t", {}, MODEL, SYSTEM, Workload.uniform(64, 1, 2), b.ops, {"gpu": {}, "cpu": {}})


def host_op(b: PlanBuilder, stream: Stream, us: int, usage: int, deps=(), **kw) -> int:
    kind = OpKind.COPY if stream in (Stream.H2D, Stream.H2D_ACT, Stream.D2H) else OpKind.EXPERT
    return b.add(kind, stream, Phase.DECODE, 1, 0, tokens=64, flops=us, nbytes=usage, deps=deps, **kw)


def both(plan: Plan, cost=COST):
    """(default run, SimPy run), required equal."""
    return both_schedules(plan, cost)


def test_jobs_that_fill_a_resource_exactly_are_list_scheduled():
    """Two CPU ops at half the cores and half the DRAM each run side by side at full speed: no SimPy events."""
    b = PlanBuilder()
    host_op(b, Stream.CPU, 3, 4)
    host_op(b, Stream.CPU_EXPERTS, 5, 4)
    listed, reference = both(plan_of(b))
    assert listed.engine == "list" and listed.events == 0 < reference.events
    assert listed.end_ns.tolist() == [3000, 5000]


def test_jobs_that_oversubscribe_a_resource_run_on_simpy():
    """Two DRAM-bound CPU ops at once need twice the DRAM: the SimPy machine shares it and both take longer."""
    b = PlanBuilder()
    host_op(b, Stream.CPU, 3, 5)
    host_op(b, Stream.CPU_EXPERTS, 3, 5)
    listed, _ = both(plan_of(b))
    assert listed.engine == "simpy"
    assert listed.end_ns.tolist() == [6000, 6000]


def test_a_job_ending_as_another_starts_does_not_count_with_it():
    """Intervals are half-open: a DRAM-bound op starting the nanosecond another ends shares nothing with it."""
    b = PlanBuilder()
    first = host_op(b, Stream.CPU, 2, 5)
    b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=2)
    host_op(b, Stream.CPU_EXPERTS, 3, 5, deps=(1,))
    listed, _ = both(plan_of(b))
    assert listed.engine == "list"
    assert listed.start_ns[2] == listed.end_ns[first] == 2000


def test_a_grouped_op_is_checked_member_by_member():
    """A grouped CPU expert op whose second member is DRAM-bound oversubscribes DRAM only while that member runs
    beside a DRAM-bound copy; with the copy placed beside its first member, nothing is slowed."""
    def plan(copy_delay_us: int) -> Plan:
        b = PlanBuilder()
        group = host_op(b, Stream.CPU_EXPERTS, 0, 0)
        b.ops[group].members = ((0, 32, 2, 1), (1, 32, 2, 5))  # 2 us at (0.5, 0), then 2 us at (1, 1)
        b.ops[group].tokens, b.ops[group].flops, b.ops[group].bytes = 64, 4, 6
        if copy_delay_us:
            gate = b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=copy_delay_us)
            host_op(b, Stream.D2H, 1, 2, deps=(gate,))
        else:
            host_op(b, Stream.D2H, 1, 2)
        return plan_of(b)

    early, _ = both(plan(0))
    assert early.engine == "list"
    late, _ = both(plan(2))
    assert late.engine == "simpy"
    assert late.end_ns[0] > 4000  # the second member shared DRAM with the copy


def test_contention_after_the_first_chunk_is_found(monkeypatch):
    """A long uncontended prefix, then two ops that oversubscribe DRAM: the check reaches them."""
    monkeypatch.setattr(uncontended, "FIRST_CHUNK", 16)
    b = PlanBuilder()
    last = -1
    for _ in range(300):
        last = b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=1, deps=(last,))
    host_op(b, Stream.CPU, 3, 5, deps=(last,))
    host_op(b, Stream.CPU_EXPERTS, 3, 5, deps=(last,))
    listed, _ = both(plan_of(b))
    assert listed.engine == "simpy"


def test_a_contended_plan_is_handed_over_after_its_first_chunk(monkeypatch):
    """Contention among the first ops: the check stops after the first chunk, not after the whole plan, and the
    group's jobs were made for that chunk's ops only (a large contended plan never holds them all)."""
    monkeypatch.setattr(uncontended, "FIRST_CHUNK", 16)
    collected: list[int] = []
    jobs_of: list[int] = []
    original, original_jobs = uncontended._GroupJobs.fit, uncontended._GroupJobs._jobs

    def fit(self, start, upto: int) -> bool:
        collected.append(upto)
        return original(self, start, upto)

    def jobs(self, upto: int):
        made = original_jobs(self, upto)
        jobs_of.extend(made[0].tolist())
        return made

    monkeypatch.setattr(uncontended._GroupJobs, "fit", fit)
    monkeypatch.setattr(uncontended._GroupJobs, "_jobs", jobs)
    b = PlanBuilder()
    host_op(b, Stream.CPU, 3, 5)
    host_op(b, Stream.CPU_EXPERTS, 3, 5)
    for _ in range(1000):
        host_op(b, Stream.D2H, 1, 2)
    listed, _ = both(plan_of(b))
    assert listed.engine == "simpy" and collected == [16]
    assert sorted(jobs_of) == list(range(16))


def test_a_pool_overflow_raises_the_engines_error():
    b = PlanBuilder()
    capacity = topology_of(SYSTEM).pools["gpu"]
    b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=1, alloc=(("gpu", capacity),))
    b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=1, alloc=(("gpu", 1),))
    plan = plan_of(b)
    with pytest.raises(CapacityError) as listed:
        run_plan(plan, COST)
    with pytest.raises(CapacityError) as reference:
        run_plan(plan, COST, fast=False)
    assert str(listed.value) == str(reference.value)


def test_memory_freed_before_it_is_allocated_raises_the_engines_error():
    b = PlanBuilder()
    gate = b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=5)
    b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=1, deps=(gate,), alloc=(("cpu", 8),))
    host_op(b, Stream.CPU, 1, 0, free=(("cpu", 8),))
    plan = plan_of(b)
    errors = []
    for fast in (True, False):
        with pytest.raises(SimInputError) as caught:
            run_plan(plan, COST, check=False, fast=fast)
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "before it is allocated" in errors[0]


def test_a_dependency_on_a_later_op_is_left_to_the_engine():
    """An unchecked plan whose op waits for a later one: the list schedule declines, the engine reports it."""
    b = PlanBuilder()
    b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=1)
    b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=1)
    b.ops[0].deps = (1,)
    with pytest.raises(PlanDeadlock):
        run_plan(plan_of(b), COST, check=False)


def random_plan(rng: np.random.Generator) -> Plan:
    """Up to 60 ops of 0-4 us on every stream, with random dependencies, grouped expert ops on any host stream,
    and allocations freed by later ops that depend on them; one allocation in 40 is larger than any pool, so some
    plans fail: most ends tie with another event."""
    b = PlanBuilder()
    held: list[tuple[str, int, int]] = []
    streams = (Stream.GPU, *HOST_STREAMS)
    for i in range(int(rng.integers(1, 61))):
        stream = streams[int(rng.integers(len(streams)))]
        deps = tuple(int(d) for d in rng.integers(0, i, size=int(rng.integers(0, 3)))) if i else ()
        alloc = free = ()
        if rng.random() < 0.2:
            pool = ("gpu", "cpu")[int(rng.integers(2))]
            size = int(rng.integers(1, 1 << 30)) if rng.random() > 0.025 else 1 << 50
            alloc = ((pool, size),)
            held.append((pool, size, i))
        elif held and rng.random() < 0.5:
            pool, size, owner = held.pop(int(rng.integers(len(held))))
            free = ((pool, size),)
            deps = (*deps, owner)
        op = host_op(b, stream, int(rng.integers(0, 5)), int(rng.integers(0, 7)), deps=deps, alloc=alloc,
                     free=free)
        if stream is not Stream.GPU and rng.random() < 0.3:
            n = int(rng.integers(2, 5))
            flops = [int(x) for x in rng.integers(0, 4, size=n)]
            usage = [int(x) for x in rng.integers(0, 7, size=n)]
            entry = b.ops[op]
            entry.kind = OpKind.EXPERT
            entry.members = tuple((e, 1, f, u) for e, (f, u) in enumerate(zip(flops, usage, strict=True)))
            entry.tokens, entry.flops, entry.bytes = n, sum(flops), sum(usage)
    return plan_of(b)


def outcome(plan: Plan, cost, fast: bool) -> tuple:
    """('ok', engine) after a run, or ('error', its type and message)."""
    try:
        record = run_plan(plan, cost, fast=fast)
    except SimInputError as exc:
        return "error", type(exc).__name__, str(exc)
    return "ok", record


def test_random_plans_schedule_alike_on_both_paths():
    """600 random plans: the same record, or the same error, from the list schedule and the SimPy machine, and
    both schedules (and errors) reached often: the property is not vacuous."""
    rng = np.random.default_rng(7)
    seen = {"list": 0, "simpy": 0, "error": 0}
    for _ in range(600):
        plan = random_plan(rng)
        listed, reference = outcome(plan, COST, True), outcome(plan, COST, False)
        if listed[0] == "error":
            assert listed == reference
            seen["error"] += 1
            continue
        assert reference[0] == "ok"
        assert_same_schedule(listed[1], reference[1])
        seen[listed[1].engine] += 1
    assert min(seen.values()) >= 30, seen


class HugeCost(StubCost):
    """Ops of 10^18 ns each (the roofline's per-op bound): ten of them outlast int64 nanoseconds."""

    def op_time_ns(self, op) -> int:
        return 10**18 if op.flops else 0


def test_a_run_past_the_clock_raises_run_too_long_either_way():
    """Copies and a CPU op share the host group, so the list schedule's checks run: it declines past 2^53 ns and
    the engine raises RunTooLong (numpy's OverflowError had escaped from the checks)."""
    b = PlanBuilder()
    for _ in range(10):
        host_op(b, Stream.H2D, 1, 0)
    host_op(b, Stream.CPU, 1, 0)
    plan = plan_of(b)
    assert outcome(plan, HugeCost(), True)[:2] == outcome(plan, HugeCost(), False)[:2] == ("error", "RunTooLong")


@pytest.mark.parametrize(("ops", "beyond_int64"), [(5, False), (10, True)])
def test_the_simpy_machine_names_a_run_past_its_clock(ops, beyond_int64):
    """The SimPy machine keeps starts and ends in int64 arrays: a run past MAX_RUN_NS (2^62 ns; five ops of 10^18
    ns) and one whose ends would not fit int64 at all (ten, which the arrays refuse mid-run) both end in
    RunTooLong's one line, never an OverflowError; a run that fits records int64 arrays either way."""
    b = PlanBuilder()
    for _ in range(ops):
        host_op(b, Stream.H2D, 1, 0)
    kind, name, message = outcome(plan_of(b), HugeCost(), False)
    assert (kind, name) == ("error", "RunTooLong")
    assert message.startswith("the run would last ") and "(over 4.61e+09 s)" in message
    assert ("last over 9.22e+09 s" in message) == beyond_int64
    fits = outcome(plan_of(b), COST, False)[1]
    assert fits.start_ns.dtype.type is fits.end_ns.dtype.type is np.int64


def test_a_schedule_past_2_53_ns_is_left_to_the_engine():
    """Past 2^53 ns the engine's float bookkeeping rounds: the list schedule declines, whatever the result."""
    b = PlanBuilder()
    for _ in range(2):
        host_op(b, Stream.H2D, 1, 0)
    host_op(b, Stream.CPU, 1, 0)
    listed, _ = both(plan_of(b), HugeCost())
    assert listed.engine == "simpy"


def test_allocations_beyond_int64_are_judged_exactly():
    """Nothing bounds an allocation's size: 2^62 bytes taken and returned at one instant beside a 1-byte
    allocation leave the pool 1 byte over its capacity, which the engine refuses and so must the replay."""
    b = PlanBuilder()
    big = 1 << 62
    first = b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=0, alloc=(("gpu", big),))
    host_op(b, Stream.CPU, 5, 0, alloc=(("gpu", 1),))
    b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=0, deps=(first,), free=(("gpu", big),))
    capacity = topology_of(SYSTEM).pools["gpu"]
    plan = Plan("t", {}, MODEL, SYSTEM, Workload.uniform(64, 1, 2), b.ops, {"gpu": {"weights": capacity}, "cpu": {}})
    listed, reference = outcome(plan, COST, True), outcome(plan, COST, False)
    assert listed == reference and listed[1] == "CapacityError"


class SignedCost(StubCost):
    """A cost model whose usages are not all shares (one negative): sums then depend on their order."""

    USAGES = ((1e8, 0.0), (-1e8, 0.0), (0.5, 0.0))


def test_a_negative_usage_is_left_to_the_engine():
    b = PlanBuilder()
    host_op(b, Stream.CPU, 2, 0)
    host_op(b, Stream.H2D, 1, 1)
    host_op(b, Stream.D2H, 1, 2)
    listed, _ = both(plan_of(b), SignedCost())
    assert listed.engine == "simpy"


def test_an_unchecked_plan_whose_ids_are_not_positions_is_refused_by_both_paths():
    """The engine reads a plan as columns (row = id), so ids out of place are named even without the check."""
    b = PlanBuilder()
    b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=5)
    b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=3)
    b.ops[0].id, b.ops[1].id = 1, 0
    plan = plan_of(b)
    for fast in (True, False):
        with pytest.raises(SimInputError, match="^plan op at position 0 has id 1$"):
            run_plan(plan, COST, check=False, fast=fast)


POINTS = {"gpu-only": ("deepseek-v2-lite", "a100-80g-8452y"),  # a point where each policy fits; else Mixtral
          "expert-parallel": ("mixtral-8x7b", "2x-h100-sxm-nvlink-8480"),
          "ndp-experts": ("mixtral-8x7b", "a100-80g-8452y-ndp8"), "trimoe": ("mixtral-8x7b", "a100-80g-8452y-ndp8")}


def test_every_policy_schedules_alike_on_both_paths():
    """A real plan of every policy (B=128, 96/8, Mixtral-8x7B on the A100 + 8452Y unless it needs another
    machine or a smaller model): the same record either way, and both schedules among them."""
    engines = set()
    for policy in sorted(POLICIES):
        model, system = POINTS.get(policy, ("mixtral-8x7b", "a100-80g-8452y"))
        r = simulate(model, system, policy, batch=128, prompt_len=96, gen_len=8, keep_plan=True)
        assert r.record is not None and r.plan is not None
        reference = run_plan(r.plan, RooflineCostModel(r.plan.system), fast=False)
        assert_same_schedule(r.record, reference)
        assert r.engine == r.record.engine
        engines.add(r.engine)
    assert engines == {"list", "simpy"}
