"""`executor.interpret.BuiltOnce`: a scope's gathered tokens are built once per key, outside the table's lock, so
one stream's slow gather does not hold up another stream's different key; same-key callers wait and share it."""

from __future__ import annotations

import threading
import time

import pytest

from executor.interpret import BuiltOnce


def test_a_slow_build_does_not_block_another_key_and_same_key_callers_share_it():
    table = BuiltOnce()
    started, release = threading.Event(), threading.Event()
    builds: list[str] = []
    results: dict[str, object] = {}

    def slow() -> str:
        builds.append("a")
        started.set()
        assert release.wait(10)
        return "A"

    def ask(name: str, key: str, build) -> None:
        results[name] = table.get(key, build)

    first = threading.Thread(target=ask, args=("first", "a", slow))
    first.start()
    assert started.wait(10)
    t0 = time.perf_counter()
    assert table.get("b", lambda: "B") == "B"  # while "a" is still being built
    assert time.perf_counter() - t0 < 1.0
    second = threading.Thread(target=ask, args=("second", "a", lambda: builds.append("again") or "A2"))
    second.start()
    time.sleep(0.05)
    assert "second" not in results  # waits for the build in progress
    release.set()
    first.join(10)
    second.join(10)
    assert results == {"first": "A", "second": "A"} and builds == ["a"]


def test_dropped_keys_are_rebuilt_and_a_failed_build_reaches_its_waiters():
    table = BuiltOnce()
    assert table.get(("s1", 0), lambda: 1) == 1
    assert table.get(("s2", 0), lambda: 2, drop=lambda k: k[0] == "s1") == 2
    assert table.get(("s1", 0), lambda: 3) == 3  # dropped, so built again
    gate = threading.Event()
    errors: list[BaseException] = []

    def failing() -> None:
        gate.wait(10)
        raise ValueError("no tokens")

    def ask(build) -> None:
        try:
            table.get("x", build)
        except BaseException as exc:  # noqa: BLE001 - the test collects whatever each thread got
            errors.append(exc)

    builder = threading.Thread(target=ask, args=(failing,))
    builder.start()
    time.sleep(0.05)
    waiter = threading.Thread(target=ask, args=(lambda: "never",))
    waiter.start()
    time.sleep(0.05)
    gate.set()
    builder.join(10)
    waiter.join(10)
    kinds = sorted(type(e).__name__ for e in errors)
    assert kinds == ["RuntimeError", "ValueError"]
    wrapped = next(e for e in errors if isinstance(e, RuntimeError))
    assert isinstance(wrapped.__cause__, ValueError)
    with pytest.raises(RuntimeError, match="failed in another thread"):  # a later caller is told too
        table.get("x", lambda: "never")
