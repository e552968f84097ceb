"""Streams that share a device slow each other down fairly, and a device never beats its capacity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from schedules import run_both

from sim.cost import RooflineCostModel
from sim.engine import max_min_rates
from sim.plan import OpKind, Payload, Phase, Plan, PlanBuilder, Stream
from sim.specs.overrides import apply_system_settings
from sim.workload import Workload


def run(model, system, build):
    b = PlanBuilder()
    build(b)
    plan = Plan("t", {}, model, system, Workload.uniform(64, 1, 2), b.ops, {"gpu": {}, "cpu": {}})  # 64-token ops fit
    cost = RooflineCostModel(system)
    return plan, run_both(plan, cost), cost


def cpu_gemm(b, stream, flops, nbytes, deps=()):
    return b.add(OpKind.EXPERT, stream, Phase.DECODE, 1, 0, tokens=64, flops=flops, nbytes=nbytes, deps=deps)


def test_max_min_rates():
    assert max_min_rates([(1.0, 0.2)]) == [1.0]
    assert max_min_rates([(1.0, 0.1), (1.0, 0.1)]) == pytest.approx([0.5, 0.5])
    # Complementary jobs (one compute-bound, one memory-bound) both keep most of their speed.
    r = max_min_rates([(1.0, 0.2), (0.2, 1.0)])
    assert r == pytest.approx([1 / 1.2, 1 / 1.2])
    # Three on one resource: a third each; a job that needs little gets full speed, the rest share.
    assert max_min_rates([(1.0, 0), (1.0, 0), (1.0, 0)]) == pytest.approx([1 / 3] * 3)
    assert max_min_rates([(0.2, 0), (1.0, 0), (1.0, 0)]) == pytest.approx([1.0, 0.4, 0.4])
    assert max_min_rates([(0.0, 0.0), (1.0, 1.0)]) == [1.0, 1.0]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(*[st.one_of(st.just(0.0), st.floats(1e-12, 1e-8), st.floats(0.0, 1.5))] * 3),
                min_size=1, max_size=6))
def test_max_min_rates_ends_and_never_overdraws(usages):
    """Whatever the usages, tiny ones on a saturated resource included (which once held the filling at a zero
    step forever), the rates come back in (0, 1] and no resource does more than its capacity."""
    rates = max_min_rates(usages)
    assert all(0.0 < r <= 1.0 + 1e-9 for r in rates)
    for column in zip(*usages, strict=True):
        assert sum(r * u for r, u in zip(rates, column, strict=True)) <= 1.0 + 1e-6


def test_a_job_barely_using_a_saturated_resource_stops_growing_there():
    # Four jobs fill resource 1; the fifth uses it by 9e-10 only: it freezes with them (dominant resource
    # fairness) instead of holding the filling at a zero step.
    rates = max_min_rates([(0.0, 1.0)] * 4 + [(0.5, 9e-10)])
    assert rates == pytest.approx([0.25] * 4 + [0.5])


def test_two_cpu_workers_share_the_cores(tiny_model, paper_system):
    flops = 10**11  # compute-bound on the 8452Y: ~4.7 ms alone
    plan, rec, cost = run(tiny_model, paper_system, lambda b: (cpu_gemm(b, Stream.CPU, flops, 10**6),
                                                                cpu_gemm(b, Stream.CPU_EXPERTS, flops, 10**6)))
    alone = cost.op_time_ns(plan.ops[0])
    assert rec.end_ns.tolist() == [2 * alone] * 2  # each takes twice as long as alone; together, capacity
    assert rec.start_ns.tolist() == [0, 0]


def test_copies_in_one_pcie_direction_share_the_link(tiny_model, paper_system):
    def build(b):
        b.add(OpKind.COPY, Stream.H2D, Phase.DECODE, 1, 0, nbytes=2 * 10**9)
        b.add(OpKind.COPY, Stream.H2D_ACT, Phase.DECODE, 1, 0, nbytes=10**9)
        b.add(OpKind.COPY, Stream.D2H, Phase.DECODE, 1, 0, nbytes=10**9)  # the other direction: unaffected

    plan, rec, cost = run(tiny_model, paper_system, build)
    big, small, other = (cost.op_time_ns(op) for op in plan.ops)
    assert rec.end_ns[2] == other
    # The small copy runs at half speed until it ends; the big one then has the link to itself.
    assert rec.end_ns[1] == pytest.approx(2 * small, abs=2)
    assert rec.end_ns[0] == pytest.approx(big + small, abs=2)
    assert rec.end_ns[0] >= big and rec.end_ns[1] > small


def test_late_arrival_slows_the_running_op_from_then_on(tiny_model, paper_system):
    flops = 10**11

    def build(b):
        cpu_gemm(b, Stream.CPU, flops, 10**6)
        gate = b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=0, nbytes=0)
        cpu_gemm(b, Stream.CPU_EXPERTS, flops, 10**6, deps=(gate,))

    plan, rec, cost = run(tiny_model, paper_system, build)
    alone = cost.op_time_ns(plan.ops[0])
    arrival = rec.end_ns[1]
    assert 0 < arrival < alone
    # First op: alone until `arrival`, then half speed for what is left.
    assert rec.end_ns[0] == pytest.approx(arrival + 2 * (alone - arrival), abs=2)
    # Second op: half speed while both run, then alone.
    assert rec.end_ns[2] == pytest.approx(arrival + alone + (alone - arrival), abs=2)


def test_work_never_exceeds_capacity_and_overlap_helps(tiny_model, paper_system):
    def build(b):
        cpu_gemm(b, Stream.CPU, 2 * 10**11, 10**7)            # compute-bound
        b.add(OpKind.ATTENTION, Stream.CPU_EXPERTS, Phase.DECODE, 1, 0, tokens=64, flops=10**8,
              nbytes=2 * 10**9)                                 # memory-bound

    plan, rec, cost = run(tiny_model, paper_system, build)
    alone = [cost.op_time_ns(op) for op in plan.ops]
    makespan = rec.makespan_ns
    assert max(alone) <= makespan < sum(alone)  # faster than running one after the other
    for resource in (0, 1):
        demanded = sum(cost.usage(op)[resource] * t for op, t in zip(plan.ops, alone, strict=True))
        assert demanded <= makespan * (1 + 1e-6)
    assert all(rec.end_ns[i] - rec.start_ns[i] >= alone[i] for i in range(2))


def test_same_stream_never_overlaps_itself(tiny_model, paper_system):
    flops = 10**11
    plan, rec, cost = run(tiny_model, paper_system, lambda b: (cpu_gemm(b, Stream.CPU, flops, 10**6),
                                                                cpu_gemm(b, Stream.CPU, flops, 10**6)))
    alone = cost.op_time_ns(plan.ops[0])
    assert rec.start_ns.tolist() == [0, alone] and rec.end_ns.tolist() == [alone, 2 * alone]


def _dma_beside_cpu_attention(b):
    b.add(OpKind.COPY, Stream.H2D, Phase.DECODE, 1, 0, nbytes=4 * 10**9)
    b.add(OpKind.COPY, Stream.D2H, Phase.DECODE, 1, 0, nbytes=4 * 10**9)
    b.add(OpKind.ATTENTION, Stream.CPU, Phase.DECODE, 1, 0, tokens=64, flops=10**8, nbytes=40 * 10**9)


def test_dma_and_cpu_attention_share_host_dram(tiny_model, paper_system):
    """Host DRAM is one resource: two DMA directions and a memory-bound CPU attention each slow down together,
    and the bytes they move per second never exceed the DRAM bandwidth. (An attention kernel that streams at the
    DRAM's achievable rate; the preset's measured kernel streams at less, next test.)"""
    dram = paper_system.cpu.dram_efficiency
    fast_kernel = apply_system_settings(paper_system, {"cpu.attention_stream_efficiency": str(dram)})
    plan, rec, cost = run(tiny_model, fast_kernel, _dma_beside_cpu_attention)
    alone = [cost.op_time_ns(op) for op in plan.ops]
    took = [int(rec.end_ns[i] - rec.start_ns[i]) for i in range(3)]
    assert all(t > a * 1.05 for t, a in zip(took, alone, strict=True))  # each is slowed down
    # The equal copies end together at t1; attention then runs alone at full speed until t2. Over [0, t1] the
    # DRAM bytes all three moved per second stay within the DRAM bandwidth (and fill it: DRAM is the bottleneck).
    t1, t2 = rec.end_ns[0] * 1e-9, rec.end_ns[2] * 1e-9
    assert rec.end_ns[0] == rec.end_ns[1] and t1 < t2
    attention_alone_rate = plan.ops[2].bytes / (alone[2] * 1e-9)
    attention_bytes_by_t1 = plan.ops[2].bytes - (t2 - t1) * attention_alone_rate
    dram_rate = (plan.ops[0].bytes + plan.ops[1].bytes + attention_bytes_by_t1) / t1
    assert dram_rate <= cost.cpu_bw * (1 + 1e-4)
    assert dram_rate >= cost.cpu_bw * 0.99
    # Each resource's demanded work fits in the makespan.
    usages = [cost.usage(op) for op in plan.ops]
    dram_work = sum(u[1] * a for u, a in zip(usages, alone, strict=True))
    assert dram_work <= rec.makespan_ns * (1 + 1e-6)


def test_a_kernel_slower_than_dram_leaves_it_to_the_dma_beside_it(tiny_model, paper_system):
    """The 8452Y's CPU attention streams at a measured kernel's rate (0.343 of DRAM peak), under the DRAM's
    achievable 0.716: with both PCIe directions beside it the three draw less than the DRAM delivers, so none is
    slowed; the same three with a kernel as fast as the DRAM all are (test above)."""
    plan, rec, cost = run(tiny_model, paper_system, _dma_beside_cpu_attention)
    alone = [cost.op_time_ns(op) for op in plan.ops]
    took = [int(rec.end_ns[i] - rec.start_ns[i]) for i in range(3)]
    assert took == pytest.approx(alone, rel=1e-6)
    demand = sum(op.bytes / (a * 1e-9) for op, a in zip(plan.ops, alone, strict=True))
    assert demand < cost.cpu_bw


@pytest.mark.parametrize("payload", [Payload.NONE, Payload.PAGEABLE_WEIGHTS])
def test_a_copy_never_outruns_host_dram(tiny_model, paper_system, payload):
    """A host link set faster than host DRAM (a what-if, e.g. a C2C-class link) moves data at the DRAM's rate:
    pinned copies draw one DRAM pass per byte, pageable ones three (the bounce buffer)."""
    fast = apply_system_settings(paper_system, {"link.h2d_bytes_per_s": "1000e9", "link.h2d_efficiency": "1.0",
                                     "link.pageable_ratio": "1.0"})
    plan, rec, cost = run(tiny_model, fast, lambda b: b.add(OpKind.COPY, Stream.H2D, Phase.DECODE, 1, 0,
                                                            nbytes=10**10, payload=payload))
    passes = 3 if payload is Payload.PAGEABLE_WEIGHTS else 1
    seconds = rec.end_ns[0] * 1e-9
    assert 10**10 * passes / seconds <= cost.cpu_bw * (1 + 1e-6)
    assert 10**10 * passes / seconds >= cost.cpu_bw * 0.99  # DRAM, not the link, sets the pace
    assert cost.usage(plan.ops[0])[1] == pytest.approx(1.0)
    # at the preset's own link, slower than DRAM, nothing changes: the link sets the pace
    plan, rec, cost = run(tiny_model, paper_system, lambda b: b.add(OpKind.COPY, Stream.H2D, Phase.DECODE, 1, 0,
                                                                    nbytes=10**10))
    assert cost.usage(plan.ops[0])[0] == 1.0 and cost.usage(plan.ops[0])[1] < 1.0


def test_dma_alone_with_a_compute_bound_cpu_op_is_not_slowed(tiny_model, paper_system):
    """A copy and a compute-bound CPU GEMM use different resources (DRAM has headroom): neither slows down."""
    def build(b):
        b.add(OpKind.COPY, Stream.H2D, Phase.DECODE, 1, 0, nbytes=10**9)
        cpu_gemm(b, Stream.CPU, 10**11, 10**6)

    plan, rec, cost = run(tiny_model, paper_system, build)
    assert rec.end_ns.tolist() == [cost.op_time_ns(op) for op in plan.ops]


def test_max_min_rates_any_number_of_resources():
    # Host group: (cores, dram, h2d, d2h). A DMA using 1/8 of DRAM and a DRAM-bound CPU op share DRAM.
    r = max_min_rates([(0.0, 0.125, 1.0, 0.0), (0.1, 1.0, 0.0, 0.0)])
    assert r[0] * 0.125 + r[1] * 1.0 == pytest.approx(1.0)
    assert r == pytest.approx([1 / 1.125, 1 / 1.125])


def test_event_count_of_a_retimed_pair(tiny_model, paper_system):
    """The engine's events: a start and an end per stream, a timeout per op, and the re-timing's extra wake-ups (a
    finish that moved later sleeps again; one that moved earlier sleeps anew on a timeout made at the re-timing,
    without an event to wake it, and its old timeout still fires). The dependency costs none: the waiting stream
    resumes inside the end of the op it waits for."""
    def build(b):
        cpu_gemm(b, Stream.CPU, 10**11, 10**6)
        gate = b.add(OpKind.QKV, Stream.GPU, Phase.DECODE, 1, 0, flops=0, nbytes=0)
        cpu_gemm(b, Stream.CPU_EXPERTS, 10**11, 10**6, deps=(gate,))

    _, rec, _ = run(tiny_model, paper_system, build)
    starts_and_ends, timeouts, dependency = 2 * 3, 3, 0
    # op 0 sleeps again; op 2 sleeps anew (its first timeout, one of the three, fires for no one); nothing more:
    # an urgent event per re-timed op, as a SimPy interrupt would add, only for one that ends at that instant
    later_again, anew = 1, 1
    assert rec.events == starts_and_ends + timeouts + dependency + later_again + anew
