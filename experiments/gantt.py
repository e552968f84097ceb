"""Gantt charts of one decode step per resource, drawn from Chrome-trace JSON: the simulator's
(`simulate --timeline`) and the executor's measured one (`execute --timeline`) share that schema, so one code
path draws both and they can sit one above the other."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from experiments.plots import KIND_COLORS
from sim.errors import SimInputError
from traces.limits import check_memory

Events = list[dict[str, Any]]
# Memory per byte of a timeline's JSON while it is read: the text (1x) and the parsed events, measured with
# tracemalloc at 4.0x on a simulated timeline (2026-12-06, Mixtral B=64 64/16: 0.88 MB of JSON, 3.5 MB parsed)
JSON_PARSED_PER_BYTE = 6


def load_chrome_trace(path: str | Path) -> tuple[Events, dict[str, Any]]:
    """The events and metadata of a timeline written by cox-moe; a one-line error for anything else."""
    path = Path(path)
    if path.is_dir():
        raise SimInputError(f"timeline {path}: a directory, not a timeline file")
    if not path.is_file():  # missing, or a FIFO or device (a read would block, or never end)
        raise SimInputError(f"timeline {path}: no such file" if not path.exists() else
                            f"timeline {path}: not a regular file")
    try:
        # parsed JSON takes about this many times its text: charged before it is read
        check_memory(path.stat().st_size * JSON_PARSED_PER_BYTE, f"reading timeline {path}")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SimInputError(f"timeline {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SimInputError(f"timeline {path}: not JSON ({exc})") from None
    events = doc.get("traceEvents") if isinstance(doc, dict) else None
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise SimInputError(f"timeline {path}: no traceEvents list (write one with simulate/execute --timeline)")
    ops = [e for e in events if e.get("ph") == "X"]
    bad = next((e for e in ops if not isinstance(e.get("args"), dict) or "phase" not in e["args"]
                or not _time(e.get("ts")) or not _time(e.get("dur")) or not _integer(e.get("tid"))
                or not isinstance(e.get("cat"), str)
                or (e["args"].get("phase") == "decode" and not _integer(e["args"].get("step")))), None)
    if bad is not None or not ops:
        raise SimInputError(f"timeline {path}: op events need ts and dur in [0, 1e15] us, an integer tid, a cat and "
                            "args.phase (decode ones an integer args.step): not a cox-moe timeline?")
    names = [e for e in events if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")]
    if any(not isinstance(e.get("args"), dict) or not isinstance(e["args"].get("name"), str)
           or (e["name"] == "thread_name" and not _integer(e.get("tid"))) for e in names):
        raise SimInputError(f"timeline {path}: process_name and thread_name events need args.name (a string; "
                            "thread names an integer tid): not a cox-moe timeline?")
    other = doc.get("otherData")
    if other is not None and not isinstance(other, dict):
        raise SimInputError(f"timeline {path}: otherData must be a JSON object")
    return events, other or {}


MAX_TIME_US = 1e15  # about 31 years in microseconds: a longer time is not a run's (a 400-digit one overflowed)


def _time(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, int):
        return 0 <= value <= MAX_TIME_US
    return math.isfinite(value) and 0 <= value <= MAX_TIME_US


def _integer(value: Any) -> bool:
    """An integer field (a track id, a decode step), not a boolean."""
    return isinstance(value, int) and not isinstance(value, bool)


def process_name(events: Events, default: str) -> str:
    """The timeline's process name ("cox-moe simulation", "cox-moe execution (measured...)"), else `default`."""
    return next((e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"), default)


LABEL_CHARS = 80  # longer names are cut: matplotlib's layout of a 200,000-character track name ran for minutes


def plain(text: str, limit: int = LABEL_CHARS) -> str:
    """`text` as matplotlib draws it literally (a `$` would start maths: a name like `run$1_$.json` did not parse),
    cut to `limit` characters."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text.replace("$", r"\$")


def track_names(events: Events) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}


def decode_steps(events: Events) -> list[int]:
    return sorted({e["args"]["step"] for e in events if e.get("ph") == "X" and e["args"].get("phase") == "decode"})


def step_events(events: Events, step: int | None = None, what: str = "timeline") -> tuple[int, Events]:
    """The op events of one decode step (the middle one by default), times shifted to start at 0 (in us); `what`
    names the timeline in errors."""
    steps = decode_steps(events)
    if not steps:
        raise SimInputError(f"{what} has no decode steps (simulated or run with --gen-len 1?)")
    if step is None:
        step = steps[len(steps) // 2]
    elif step not in steps:
        shown = ", ".join(map(str, steps[:12])) + (", ..." if len(steps) > 12 else "")
        raise SimInputError(f"decode step {step} is not in {what} (its decode steps: {shown})")
    chosen = [e for e in events if e.get("ph") == "X" and e["args"].get("phase") == "decode"
              and e["args"].get("step") == step]
    t0 = min(e["ts"] for e in chosen)
    return step, [{**e, "ts": e["ts"] - t0} for e in chosen]


def draw_gantt(ax: plt.Axes, events: Events, tracks: dict[int, str], title: str) -> set[str]:
    """One row per resource that did work, one bar per op coloured by kind; returns the kinds drawn."""
    used = sorted({e["tid"] for e in events})
    rows = {tid: i for i, tid in enumerate(used)}
    kinds: set[str] = set()
    for e in events:
        kinds.add(e["cat"])
        color = KIND_COLORS.get(e["cat"], "#cccccc")
        # an outline in the bar's colour and no pixel snapping: a bar narrower than a pixel (a 20 us copy in a
        # 100 ms step) was snapped to zero width and vanished
        ax.barh(rows[e["tid"]], max(e["dur"], 1e-3) / 1e3, left=e["ts"] / 1e3, height=0.7, color=color,
                edgecolor=color, linewidth=0.3, snap=False)
    ax.set_yticks(range(len(used)), [plain(tracks.get(t, str(t))) for t in used])
    ax.invert_yaxis()
    ax.grid(axis="x", linewidth=0.4, alpha=0.5)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("time within the decode step (ms)")
    ax.set_title(plain(title))
    return kinds


def gantt_figure(timelines: list[tuple[str, Events]], step: int | None = None) -> tuple[plt.Figure, list[int]]:
    """Stack one Gantt per (title, events) timeline; each shows decode step `step`, or its own middle one."""
    fig, axes = plt.subplots(len(timelines), 1, figsize=(7.2, 1.0 + 1.5 * len(timelines)), squeeze=False)
    kinds: set[str] = set()
    steps = []
    for ax, (title, events) in zip(axes[:, 0], timelines, strict=True):
        chosen, ops = step_events(events, step, title)
        steps.append(chosen)
        span = max(e["ts"] + e["dur"] for e in ops) / 1e3
        kinds |= draw_gantt(ax, ops, track_names(events), f"{title}: decode step {chosen}, {span:.1f} ms")
    handles = [Patch(color=KIND_COLORS.get(k, "#cccccc"), label=plain(k)) for k in sorted(kinds)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), bbox_to_anchor=(0.5, -0.02))
    with warnings.catch_warnings():  # a layout that cannot fit every label is drawn as it is, without a warning
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig, steps
