"""Golden synthetic traces: `generate_trace` gives exactly the bytes recorded before a behaviour-preserving change
to synthesis (tests/data/golden_traces.json, first written by the code at b621102, before the column-major draws
of 2026-12-04). Cases cover both top-k paths (k <= 4 by whole columns; k > 4 by chunks, several chunks, column
compares and the taken table of a skewed popularity), reuse, cross-layer affinity, topics, and both trace forms
(every row; prompts as counts). A change meant to move traces re-records them with `write_golden()` and says why:
`PYTHONPATH=tests python -c "import test_trace_golden; test_trace_golden.write_golden()"`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import traces.pages as pages
from traces.format import count_dtype
from traces.synth import SynthConfig, generate_trace

GOLDEN = Path(__file__).parent / "data" / "golden_traces.json"

# name -> (config, prompt lengths below, generated lengths below, requests)
CASES = {
    "top8-of-128": (SynthConfig("m", 4, 128, 8, "uniform", 0.0, 0), 300, 40, 7),
    "top8-zipf-reuse": (SynthConfig("m", 4, 128, 8, "zipf:1.0", 0.2, 1), 300, 40, 7),
    "top6-skewed-taken-table": (SynthConfig("m", 3, 64, 6, "zipf:3.0", 0.0, 2), 200, 30, 5),
    "top2-of-8": (SynthConfig("m", 4, 8, 2, "uniform", 0.0, 0), 400, 40, 9),
    "top2-table-reuse": (SynthConfig("m", 4, 8, 2, "table:mixtral-8x7b", 0.3, 3), 400, 40, 9),
    "top6-affinity": (SynthConfig("m", 3, 64, 6, "zipf:1.2", 0.0, 4, affinity=0.3), 250, 30, 6),
    "top8-topics": (SynthConfig("m", 3, 128, 8, "zipf:0.8", 0.1, 5, topics=3), 250, 30, 6),
    "top8-chunks": (SynthConfig("m", 2, 128, 8, "uniform", 0.0, 7), 1300, 200, 200),
    "top8-chunks-zipf": (SynthConfig("m", 2, 128, 8, "zipf:1.0", 0.1, 8), 1300, 200, 200),
    "top2-many-rows": (SynthConfig("m", 2, 8, 2, "zipf:1.0", 0.0, 9), 1300, 200, 200),
    "top8-of-256": (SynthConfig("m", 2, 256, 8, "zipf:1.1", 0.0, 6), 600, 130, 5),
}


def trace_digest(name: str, prompt_counts: bool) -> str:
    cfg, prompt, gen, requests = CASES[name]
    rng = np.random.default_rng(11)
    lengths = rng.integers(1, prompt, requests), rng.integers(1, gen, requests)
    tr = generate_trace(cfg, *lengths, prompt_counts=prompt_counts)
    h = hashlib.sha256(np.ascontiguousarray(tr.experts).tobytes())
    if tr.prompt_counts is not None:  # the values, in the type they were recorded in: the bound's (`narrowed` may
        # keep them narrower since 2026-12-07)
        h.update(tr.prompt_counts.astype(count_dtype(int(lengths[0].max()) * cfg.top_k)).tobytes())
    return h.hexdigest()


def write_golden(path: Path = GOLDEN) -> None:
    """Re-record every case with the code at hand (for a change that is meant to move traces)."""
    path.write_text(json.dumps({f"{name}/{form}": trace_digest(name, form == "prompt-counts") for name in CASES
                                for form in ("rows", "prompt-counts")}, indent=1) + "\n")


@pytest.mark.parametrize("form", ["rows", "prompt-counts"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_synthesis_gives_the_recorded_bytes(name, form):
    assert trace_digest(name, form == "prompt-counts") == json.loads(GOLDEN.read_text())[f"{name}/{form}"]


def test_plain_pages_switches_numpy_off_huge_pages_and_back(monkeypatch):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    state = {"flag": True}
    calls = []

    def setter(flag):
        calls.append(flag)
        previous, state["flag"] = state["flag"], flag
        return previous

    monkeypatch.setattr(pages, "_setter", lambda: setter)
    with pages.plain_pages():
        assert state["flag"] is False
    assert state["flag"] is True and calls == [False, True]
    with pytest.raises(RuntimeError), pages.plain_pages():  # restored on an error too
        raise RuntimeError
    assert state["flag"] is True


def test_plain_pages_restores_numpys_choice_when_the_last_of_overlapping_blocks_closes(monkeypatch):
    """Blocks that overlap (nested, or in two threads whose blocks close in either order) restore numpy's choice
    once, when the last one closes: never a later block's off switch taken for the choice to restore."""
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    state = {"flag": True}

    def setter(flag):
        previous, state["flag"] = state["flag"], flag
        return previous

    monkeypatch.setattr(pages, "_setter", lambda: setter)
    first, second = pages.plain_pages(), pages.plain_pages()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first to open closes first, as one thread may while another runs on
    assert state["flag"] is False
    second.__exit__(None, None, None)
    assert state["flag"] is True


def test_plain_pages_leaves_numpys_own_switch_alone(monkeypatch):
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    monkeypatch.setattr(pages, "_setter", lambda: pytest.fail("numpy's setting must not be touched"))
    with pages.plain_pages():
        pass


def test_numpy_has_the_switch():
    """The private setter exists in the pinned numpy (else synthesis silently runs with huge pages)."""
    setter = pages._setter()
    assert setter is not None
    previous = setter(False)
    assert setter(previous) is False


def test_reading_a_trace_file_runs_with_plain_pages_and_a_version_check_does_not(monkeypatch, tmp_path):
    """The huge-page switch wraps `read_npz` (a re-read found it had slid onto `is_version`, inserted under its
    decorator: trace loads lost it, and every version check took its lock)."""
    from traces import format as fmt

    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    calls = []
    monkeypatch.setattr(pages, "_setter", lambda: (lambda flag: calls.append(flag) or True))
    assert fmt.is_version(1, 1) and not fmt.is_version(True, 1)
    assert calls == []
    path = tmp_path / "a.npz"
    np.savez(path, x=np.arange(3))
    assert fmt.read_npz(path, {"x"}, (), "test file")["x"].tolist() == [0, 1, 2]
    assert calls == [False, True]
