"""Chrome Trace Event JSON (opens in Perfetto / chrome://tracing): one track per stream, one slice per op."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sim.atomic_files import write_atomic
from sim.plan import Op, streams_of

TRACK_NAMES = {"gpu": "GPU compute", "cpu": "CPU (AMX) compute", "cpu_experts": "CPU (AMX) experts",
               "h2d": "PCIe H2D weights", "h2d_act": "PCIe H2D activations", "d2h": "PCIe D2H",
               "disk_read": "Disk read (to DRAM)", "disk_write": "Disk write (from DRAM)"}


def track_name(stream: str, cpu_has_amx: bool = True) -> str:
    """A stream's track label: the one-GPU machine's own names (the CPU's without "(AMX)" on a CPU that has none),
    then the topology's other streams by pattern (gpu1, h2d_gpu1, d2h_gpu1, p2p_gpu_gpu1, ndp); a disk's two
    directions have their own names."""
    name = str(stream)
    if name in TRACK_NAMES:
        return TRACK_NAMES[name] if cpu_has_amx else TRACK_NAMES[name].replace(" (AMX)", "")
    if name == "ndp":
        return "NDP DIMMs compute"
    kind, _, rest = name.partition("_")
    if kind in ("h2d", "d2h") and rest:
        return f"PCIe {kind.upper()} {rest}"
    if kind == "p2p" and "_" in rest:
        src, dst = rest.split("_", 1)
        return f"peer {src} -> {dst}"
    return f"{name.upper()} compute" if name.startswith("gpu") else name


def _label(op: Op) -> str:
    if op.kind == "expert":
        if op.members:  # a grouped op: its experts run one after another
            return f"experts {','.join(str(m[0]) for m in op.members)} L{op.layer}"
        return f"expert {op.expert} L{op.layer}"
    if op.kind == "copy":
        return f"{op.payload} L{op.layer}"
    return f"{op.kind} L{op.layer}" if op.layer >= 0 else str(op.kind)


def chrome_trace_events(ops: list[Op], start_ns: np.ndarray, end_ns: np.ndarray,
                        process_name: str = "cox-moe simulation", cpu_has_amx: bool = True) -> list[dict[str, Any]]:
    """Complete ('X') events in microseconds, plus metadata naming the process and each stream's track (the CPU's
    as AMX only where the machine's CPU has it)."""
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": process_name}}]
    order = streams_of(ops)
    for tid, stream in enumerate(order):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": tid,
                       "args": {"name": track_name(stream, cpu_has_amx)}})
    tids = {s: i for i, s in enumerate(order)}
    for op in ops:
        s, e = int(start_ns[op.id]), int(end_ns[op.id])
        events.append({
            "name": _label(op), "cat": str(op.kind), "ph": "X", "pid": 0, "tid": tids[op.stream],
            "ts": s / 1e3, "dur": (e - s) / 1e3,
            "args": {"id": op.id, "phase": str(op.phase), "step": op.step, "layer": op.layer,
                     "micro_batch": op.micro_batch, "tokens": op.tokens, "flops": op.flops, "bytes": op.bytes},
        })
    return events


def write_chrome_trace(path: str | Path, events: list[dict[str, Any]], metadata: dict[str, Any]) -> Path:
    """Write atomically so an interrupted run never leaves a truncated JSON file."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"traceEvents": events, "displayTimeUnit": "ns", "otherData": metadata}, fh,
                      separators=(",", ":"))

    return write_atomic(path, write)
