"""Test helper: run a plan on both schedules the engine has (the SimPy machine, and the one-pass list schedule
of `sim.uncontended` where no op slows another) and require the same record from each."""

from __future__ import annotations

from sim.engine import EngineRecord, run_plan


def assert_same_schedule(a: EngineRecord, b: EngineRecord) -> None:
    """Every op's start and end, the busy times and the memory peaks agree."""
    assert a.start_ns.tolist() == b.start_ns.tolist()
    assert a.end_ns.tolist() == b.end_ns.tolist()
    assert a.busy_ns == b.busy_ns and a.peak_bytes == b.peak_bytes


def both_schedules(plan, cost, **kw) -> tuple[EngineRecord, EngineRecord]:
    """(`run_plan`'s default record, the SimPy machine's), required equal."""
    default, simpy_record = run_plan(plan, cost, **kw), run_plan(plan, cost, fast=False, **kw)
    assert_same_schedule(default, simpy_record)
    assert simpy_record.engine == "simpy"
    return default, simpy_record


def run_both(plan, cost, **kw) -> EngineRecord:
    """The SimPy machine's record of `plan`, after checking that `run_plan`'s default (list schedule where it
    applies) gives the same one."""
    return both_schedules(plan, cost, **kw)[1]
