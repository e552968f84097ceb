"""Microbenchmarks of the executor's own kernels on this machine, written as a profile the simulator reads.

`coxmoe calibrate profile --model M --out DIR` times, with the exact code the executor runs:
- expert ops (gather the expert's tokens, gate, up and down projections, gate-weighted scatter-add) over a
  grid of tokens per expert, with cold weights (copies rotated so the caches cannot hold them, as when many
  experts are touched), timed as a burst over every copy and divided by the calls, since plans run a layer's
  experts back to back (a lone call after unrelated ops costs up to 2x more for small experts); on the CPU
  through `executor.cpu_experts` (prepacked where oneDNN runs bf16; the backend is in the fingerprint), packed
  during the warm-up, as the executor packs an expert on its first call; on the CPU also with INT8 weights (where
  oneDNN's quantised linear runs) and INT4 weights (`expert_int8`, `expert_int4` rows);
- the other GEMM-shaped ops (QKV, O-projection, router, LM head) over the same token grid;
- decode attention over (batch, KV length);
- DRAM bandwidth (a large copy);
- where CUDA exists, the same on the GPU plus host-device copies by size, pinned and pageable.
Every round times every grid point (drift over rounds hits every point alike), kind by kind, each kind's block
led by an untimed call of its own kind (what ran just before a call moves its time), the GEMMs that reuse their
weights (QKV, O-projection, router, LM head) each after a cache flush, as in a plan where expert weights stream
between them, in a worker thread, as the executor runs ops; each point keeps the median and the 10th/90th
percentiles. DIR gets `profile.json` (fingerprint: CPU model and flags, GPU, torch and oneDNN versions, threads;
model signature) and
`timings.csv` (one row per device, kind and grid point), and a reading of the machine's speed before and after
the measurements (`executor.speed_probe`), which a validation compares with its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from executor import kernels as K
from executor.cpu_experts import CpuExperts, cpu_flags, onednn_int8
from executor.cpu_experts import backend as cpu_experts_backend
from executor.cpu_experts import describe as describe_cpu_experts
from executor.speed_probe import mean_reading, speed_probe
from executor.weights import LayerWeights, ModelWeights, first_layers, random_weights, truncated
from sim.cost.profile import PROFILE_VERSION, QUANTIZED_EXPERT_KINDS, model_signature
from sim.errors import SimInputError
from sim.specs import ModelSpec
from traces.files import write_atomic_text

T = TypeVar("T")

TOKEN_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
ATTENTION_BATCH = (1, 4, 16, 64, 256)
ATTENTION_KV = (1, 4, 16, 64, 256, 1024)
PREFILL_BATCH = (1, 4, 16, 64, 256)
PREFILL_LEN = (1, 4, 16, 64, 256)
OVERHEAD_REQUESTS = (1, 16, 64)
# Kinds whose grid points reuse one set of weights on every call: each timed call follows a cache flush (at least
# FLUSH_BYTES, and on the CPU twice its largest cache: `flush_bytes`), since in a plan gigabytes of expert weights
# stream between two of them. Expert points rotate cold copies instead (`_cold_copies`).
COLD_CACHE_KINDS = frozenset({"qkv", "o_proj", "router", "lm_head"})
FLUSH_BYTES = 256 * 2**20
CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def largest_cpu_cache_bytes(root: Path = CPU_CACHES) -> int:
    """The largest cache the kernel reports for CPU 0 (its last level; a VM reports its host's), 0 if unknown."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    largest = 0
    for size in root.glob("index*/size"):
        try:
            text = size.read_text().strip()
            largest = max(largest, int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text))
        except (OSError, ValueError):
            continue
    return largest


def flush_bytes(device: str) -> int:
    """What a cache flush reads: FLUSH_BYTES, or on the CPU twice its largest cache where that is more (a 2-vCPU
    Xeon VM reports a 300 MiB L3, which a 256 MiB read would not empty)."""
    return FLUSH_BYTES if device != "cpu" else max(FLUSH_BYTES, 2 * largest_cpu_cache_bytes())


def fingerprint() -> dict:
    """What these numbers were measured on."""
    cpu_model = platform.processor() or "unknown"
    flags = sorted(f for f in cpu_flags() if f.startswith(("amx", "avx512")))
    try:
        text = Path("/proc/cpuinfo").read_text()
        line = next((ln for ln in text.splitlines() if ln.startswith("model name")), None)
        if line is not None and cpu_model in ("unknown", "x86_64", ""):
            cpu_model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    config = torch.__config__.show()
    onednn = next((part.split("v", 1)[1].split()[0] for part in config.split("(") if "MKL-DNN v" in part
                   or "oneDNN v" in part), None)
    info = {"cpu_model": cpu_model, "cpu_flags": flags, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "onednn": onednn,
            "amx_tile": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
            "cpu_experts": describe_cpu_experts(cpu_experts_backend()),  # the CPU expert path the rows timed
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return info


# Fingerprint fields that change what an op costs; when or with which Python it was measured does not.
MACHINE_FIELDS = ("cpu_model", "cpu_flags", "cpus", "torch", "onednn", "cpu_experts", "cuda")


def _recorded(profile_dir: str | Path, key: str) -> dict | None:
    """The object a profile directory's `profile.json` records under `key` (None when it records none, or the
    file cannot be read)."""
    try:
        meta = json.loads((Path(profile_dir) / "profile.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    recorded = meta.get(key) if isinstance(meta, dict) else None
    return recorded if isinstance(recorded, dict) else None


def recorded_fingerprint(profile_dir: str | Path) -> dict:
    """The fingerprint a profile directory recorded (empty for a profile without one, or one that cannot be
    read: it then differs from every machine)."""
    return _recorded(profile_dir, "fingerprint") or {}


def recorded_readings(profile_dir: str | Path) -> list[dict | None] | None:
    """The machine-speed readings a profile directory recorded before and after its measurements (None when it
    recorded none, or cannot be read)."""
    speed = _recorded(profile_dir, "speed")
    return None if speed is None else [speed.get("before"), speed.get("after")]


def recorded_speed(profile_dir: str | Path) -> dict[str, float] | None:
    """The mean of the machine-speed readings a profile directory recorded before and after its measurements
    (None when it recorded none, or cannot be read)."""
    readings = recorded_readings(profile_dir)
    return None if readings is None else mean_reading(readings)


def machine_differences(recorded: dict, here: dict | None = None) -> list[str]:
    """How the machine a profile was measured on differs from this one: 'field: recorded -> here' for each
    of MACHINE_FIELDS that differs (a field the profile did not record counts as differing). A profile
    from another machine prices that machine's kernels, so a validation with it checks nothing here."""
    here = fingerprint() if here is None else here
    return [f"{k}: {recorded.get(k, 'not recorded')!r} -> {here.get(k)!r}" for k in MACHINE_FIELDS
            if recorded.get(k, "not recorded") != here.get(k)]


def device_timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Seconds one call of a function takes on `device`: CUDA events around it on a GPU, the host clock on the CPU."""
    if device == "cuda":
        def timed(fn: Callable[[], object]) -> float:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1e3
    else:
        def timed(fn: Callable[[], object]) -> float:
            t0 = time.perf_counter_ns()
            fn()
            return (time.perf_counter_ns() - t0) / 1e9
    return timed


def _cold_copies(layer: LayerWeights, budget_bytes: int) -> list[LayerWeights]:
    """Copies of one expert's weights, enough that consecutive calls never reuse cached weights."""
    one = layer.w1[:1].numel() * 3 * layer.w1.element_size()
    n = int(max(2, min(8, np.ceil(budget_bytes / max(one, 1)))))
    return [LayerWeights(attn={}, attn_norm=layer.attn_norm, ffn_norm=layer.ffn_norm, w1=layer.w1[:1].clone(),
                         w3=layer.w3[:1].clone(), w2=layer.w2[:1].clone()) for _ in range(n)]


def profile(spec: ModelSpec, out: str | Path, devices: tuple[str, ...] = ("cpu",), rounds: int = 3,
            max_tokens: int = 1024, progress: bool = True, seed: int = 0,
            threads: tuple[int, ...] | None = None, max_requests: int | None = None,
            max_kv: int | None = None, between_rounds: Callable[[int], object] | None = None,
            weights: ModelWeights | None = None) -> Path:
    """Measure the grid on each device (CPU rows once per torch thread count in `threads`, default the
    current one) and write one `profile.json` and `timings.csv` into `out` (atomically per file): a plan
    with CPU and GPU ops reads both devices' rows from one profile. `max_requests` / `max_kv` cap the
    attention grids at the first grid value that covers them (the plans to be priced need no more; the
    largest decode-attention points cost minutes on a small CPU). `between_rounds(r)` is called after each
    timed round r of each device and thread count (on the measuring thread): a paired validation runs its plans
    there, so drift hits both alike. `weights`: the caller's weights of the model's first layers at least (a paired
    validation's), used on the CPU instead of drawing the profiled layers' again."""
    if spec.stored_at_bits:  # refused before any folder is made
        raise SimInputError(f"model {spec.name}: the executor has no kernels for weights stored at "
                            "weight_bits_per_param / expert_bits_per_param, so it cannot profile them")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    current = torch.get_num_threads()
    threads = threads or (current,)
    rows: list[dict] = []
    done: list[str] = []
    speed_before = speed_probe()  # the machine's speed around the measurements (drift between them shows)

    def write(failed: dict[str, str] | None = None) -> None:
        """The profile of the devices measured so far: written after each device, so a later device that fails
        or runs out of time (a lent GPU's window) leaves the earlier ones usable (ops of a device without rows
        are priced by the roofline)."""
        write_atomic_text(out / "timings.csv", pd.DataFrame(rows).to_csv(index=False))
        meta = {"version": PROFILE_VERSION, "model_signature": model_signature(spec), "model": spec.name,
                "dtype": "bfloat16", "devices": list(done), "threads": list(threads), "rounds": rounds,
                "fingerprint": fingerprint(), "speed": {"before": speed_before, "after": speed_probe()},
                # where the grids stop (look-ups past them scale the edge by the work): null is the whole grid
                "grid": {"max_tokens": max_tokens, "max_requests": max_requests, "max_kv": max_kv},
                "flush_bytes": {d: flush_bytes(d) for d in devices}}
        if len(done) < len(devices):
            meta["not_measured"] = [d for d in devices if d not in done]
        if failed:
            meta["failed"] = failed
        write_atomic_text(out / "profile.json", json.dumps(meta, indent=2))

    try:
        for device in devices:
            start = len(rows)
            try:
                for n in threads if device == "cpu" else (current,):
                    torch.set_num_threads(n)
                    rows.extend({**row, "threads": n} for row in _measure(
                        spec, device, rounds, max_tokens, progress, seed, max_requests, max_kv, between_rounds,
                        weights if device == "cpu" else None))
            except Exception as exc:  # noqa: BLE001 - keep what the other devices measured, then report it
                del rows[start:]  # a device's rows are whole or absent
                if done:
                    write({device: f"{type(exc).__name__}: {exc}"[:300]})
                raise
            done.append(device)
            write()
    finally:
        torch.set_num_threads(current)
    return out


def covering(grid: tuple[int, ...], limit: int | None) -> tuple[int, ...]:
    """The grid values up to the first one >= `limit` (all of them without a limit): lookups stay bracketed."""
    if limit is None:
        return grid
    first_above = next((i for i, v in enumerate(grid) if v >= limit), len(grid) - 1)
    return grid[:first_above + 1]


def _measure(spec: ModelSpec, device: str, rounds: int, max_tokens: int, progress: bool, seed: int,
             max_requests: int | None = None, max_kv: int | None = None,
             between_rounds: Callable[[int], object] | None = None,
             given: ModelWeights | None = None) -> list[dict]:
    one = truncated(spec, min(spec.num_layers, spec.first_dense_layers + 1))
    weights = first_layers(given, spec, one.num_layers) if given is not None else None
    if weights is None:
        weights = random_weights(one, seed=seed, device=device)
    moe = weights.layers[-1]
    dtype = weights.dtype
    timed = device_timer(device)
    tokens = [t for t in TOKEN_GRID if t <= max_tokens]
    cold = _cold_copies(moe, 512 * 2**20)
    quantized = {} if device != "cpu" else {  # each cold copy with its own quantised runner, packed at warm-up
        p: [dataclasses.replace(lw, cpu_experts=CpuExperts(lw.w1, lw.w3, lw.w2, p)) for lw in cold]
        for p in QUANTIZED_EXPERT_KINDS if p != "int8" or onednn_int8()}
    points: list[tuple[str, tuple, Callable[[], object], int]] = []  # kind, grid point, timed call, ops per call
    for t in tokens:
        x = torch.randn(t, spec.hidden_size, dtype=dtype, device=device) * 0.02
        ids = torch.ones(t, spec.top_k, dtype=torch.int64, device=device)
        ids[:, 0] = 0  # every token routed to expert 0 first, the others elsewhere
        gates = torch.full((t, spec.top_k), 1.0 / spec.top_k, device=device)
        y = torch.zeros(t, spec.hidden_size, dtype=torch.float32, device=device)
        # tokens grouped by expert once, outside the timed call, as the executor groups a scope's tokens once for
        # all its expert ops (without it each call would find its tokens again: a host sync on a GPU)
        routed = K.RoutedTokens(x, ids, spec.num_experts)
        points.append(("expert", (t, 0), lambda x=x, ids=ids, g=gates, y=y, r=routed: [K.expert_scatter(
            lw, 0, x, ids, g, y, routed=r) for lw in cold], len(cold)))
        points.append(("qkv", (t, 0), lambda x=x: K.qkv(spec, moe, x, torch.arange(x.shape[0], device=device)), 1))
        attn_out = torch.randn(t, moe.attn["wo"].shape[1], dtype=dtype, device=device)  # made before the clock
        # the interpreter's own O-projection op (its per-request work is the overhead_o_proj rows)
        points.append(("o_proj", (t, 0), lambda a=attn_out, h=x: K.o_proj_op(moe, h, a), 1))
        points.append(("router", (t, 0), lambda x=x: x @ moe.router.T, 1))
        points.append(("lm_head", (t, 0), lambda x=x: K.lm_head(weights, x), 1))
        for precision, copies in quantized.items():  # the same expert op with INT8 / INT4 weights
            points.append((QUANTIZED_EXPERT_KINDS[precision], (t, 0), lambda x=x, ids=ids, g=gates, y=y, c=copies,
                           r=routed: [K.expert_scatter(lw, 0, x, ids, g, y, routed=r) for lw in c], len(copies)))
    for b in covering(ATTENTION_BATCH, max_requests):
        for kv in covering(ATTENTION_KV, max_kv):
            points.append(("attention", (b, kv), _attention_point(spec, moe, b, kv, dtype, device), 1))
    for b in covering(PREFILL_BATCH, max_requests):
        for length in covering(PREFILL_LEN, max_kv):
            points.append(("attention_prefill", (b, length), _prefill_point(spec, moe, b, length, dtype, device), 1))
    samples: dict[tuple[str, tuple], list[float]] = {(k, p): [] for k, p, _, _ in points}
    # Kind by kind, each kind's block led by one untimed call of its first point: every timed call follows a call
    # of its own kind, as an op in a plan mostly follows ops like it. What runs before a call moves its time: on
    # the 2-vCPU AMD VM a bf16 expert call of 64 tokens took 27 ms after another and 33 ms after an INT4 one
    # (which allocates and frees its dequantised weights), and the grid once put INT4 before every bf16 point.
    kinds = dict.fromkeys(kind for kind, _, _, _ in points)  # in the grid's order
    blocks = [[p for p in points if p[0] == kind] for kind in kinds]
    flush = _cache_flush(device)

    def settled(fn: Callable[[], object]) -> None:
        """An untimed call, finished before the next timed one starts (on a GPU, queued work would overlap it)."""
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    def measure() -> None:
        for _, _, fn, _ in points:  # warm-up: oneDNN builds its primitives on first use
            fn()
        # shown in logs too (disable=None hides it off a terminal): a round of a full grid takes minutes
        for r in tqdm(range(rounds), desc="profile rounds", disable=not progress, leave=False):
            for block in blocks:
                settled(block[0][2])
                for kind, point, fn, calls in block:
                    if kind in COLD_CACHE_KINDS:
                        settled(flush)
                    samples[(kind, point)].append(timed(fn) / calls)
            if between_rounds is not None:
                between_rounds(r)

    # The executor runs every op in a worker thread (one per stream); measure in one too, since torch's
    # intra-op thread pool behaves differently there than on the main thread.
    _in_worker(measure)
    rows = [{"device": device, "kind": kind, "tokens": point[0], "kv": point[1],
             "median_s": float(np.median(v)), "p10_s": float(np.percentile(v, 10)),
             "p90_s": float(np.percentile(v, 90)), "repeats": len(v)} for (kind, point), v in samples.items()]
    rows.append(bandwidth_row(device))
    rows.extend(_in_worker(lambda: _overhead_rows(device)))  # on a worker thread too: on the main thread a loaded
    # 2-vCPU VM measured 6.8 ms a request where the worker took 0.10 ms, 60-300x the executor's own cost
    if device == "cuda":
        rows.extend(_copy_rows(rounds))
    return rows


def _in_worker(fn: Callable[[], T]) -> T:
    """`fn()` run on a worker thread, as the executor runs its ops (errors re-raised here)."""
    out: list[T] = []
    errors: list[BaseException] = []
    worker = threading.Thread(target=lambda: _guard(lambda: out.append(fn()), errors), name="profile")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return out[0]


def _cache_flush(device: str) -> Callable[[], object]:
    """An untimed read of `flush_bytes(device)` of its memory: afterwards no cache holds the next call's weights,
    as in a plan where the experts' weights stream through between two calls of a kind that reuses its own. A
    read, not a write: the experts leave clean lines, and dirty ones would add write-backs to the timed call. A max,
    not a sum: torch sums int32 into int64 without vectorising (256 MiB: 168 ms on the 2-vCPU Xeon VM, against
    12.5 ms for the max, which reads the same bytes), and a grid flushes before every call of four kinds."""
    buf = torch.ones(flush_bytes(device) // 4, dtype=torch.int32, device=device)
    return lambda: buf.max()


def _guard(fn: Callable[[], None], errors: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as exc:  # re-raised on the calling thread
        errors.append(exc)


def _attention_point(spec: ModelSpec, lw: LayerWeights, batch: int, kv: int, dtype: torch.dtype,
                     device: str) -> Callable[[], object]:
    """Decode attention exactly as the executor runs it: per request, over a cache of `kv` entries."""
    cache = K.KVCache(spec, kv + 1, dtype, device)
    filler = K.qkv(spec, lw, torch.randn(kv, spec.hidden_size, dtype=dtype, device=device) * 0.02,
                   torch.arange(kv, device=device))
    parts = (filler["c"], filler["k_rope"]) if spec.attention == "mla" else (filler["k"], filler["v"])
    cache.append(0, 0, *parts)
    new = K.qkv(spec, lw, torch.randn(1, spec.hidden_size, dtype=dtype, device=device) * 0.02,
                torch.tensor([kv], device=device))
    length = dict(cache.length)

    def run() -> None:
        for _ in range(batch):
            cache.length.update(length)  # every call attends over the same kv entries
            K.attention(spec, lw, new, cache, 0, 0)

    return run


def _prefill_point(spec: ModelSpec, lw: LayerWeights, batch: int, length: int, dtype: torch.dtype,
                   device: str) -> Callable[[], object]:
    """Prefill attention as the executor runs it: per request, causal over its own `length` prompt tokens."""
    positions = torch.arange(length, device=device)
    new = K.qkv(spec, lw, torch.randn(length, spec.hidden_size, dtype=dtype, device=device) * 0.02, positions)

    def run() -> None:
        cache = K.KVCache(spec, length, dtype, device)
        for r in range(batch):
            K.attention(spec, lw, new, cache, r, 0)

    return run


def bandwidth_row(device: str) -> dict:
    """Copy of 512 MiB (read + write counted): the device's achievable memory bandwidth."""
    n = 256 * 2**20
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    timed = device_timer(device)
    dst.copy_(src)
    times = [timed(lambda: dst.copy_(src)) for _ in range(5)]
    med = float(np.median(times))
    return {"device": device, "kind": "memcpy", "tokens": 4 * n, "kv": 0, "median_s": med,
            "p10_s": float(np.percentile(times, 10)), "p90_s": float(np.percentile(times, 90)), "repeats": 5}


def _overhead_rows(device: str = "cpu", gpu_plan: bool | None = None) -> list[dict]:
    """The executor's own cost per request in an op's scope (Python loops, splits, small tensor ops, per-request
    moves), measured by running a plan of a tiny model whose math is negligible, at several batch sizes, and
    fitting time = a + b x requests per op kind; b is stored as `overhead_<kind>` for `device`. The CPU's rows
    come from a cpu-only plan; a GPU's from a gpu-only plan whose GPU streams run on `device`, each op followed
    by a synchronize (its launches and host work are the cost; the math is negligible). `gpu_plan` forces the
    gpu-only plan (a test runs it on the CPU; its rows are labelled `cuda`)."""
    from executor.interpret import PlanInterpreter
    from sim.policies import PlanContext, make_policy
    from sim.specs import load_system
    from sim.topology import UnitKind, topology_of
    from sim.workload import Workload
    from traces import SynthConfig, generate_trace

    tiny = ModelSpec(name="overhead-probe", num_layers=2, hidden_size=32, vocab_size=64, num_attention_heads=2,
                     num_kv_heads=1, head_dim=16, num_experts=4, top_k=2, expert_intermediate_size=16)
    weights = random_weights(tiny, seed=0)
    system = load_system("a100-80g-8452y")
    topo = topology_of(system)
    on_gpu = device != "cpu" if gpu_plan is None else gpu_plan
    device_of = {s: device if on_gpu and topo.streams[s].kind is UnitKind.GPU else "cpu" for s in topo.stream_order()}
    weights_on = {device: weights.to(device)} if device != "cpu" else None
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    samples: dict[str, list[tuple[int, float]]] = {}
    for requests in OVERHEAD_REQUESTS:
        prompts, gens = np.full(requests, 2), np.full(requests, 3)
        trace = generate_trace(SynthConfig(tiny.name, 2, 4, 2, "uniform", 0.0, 0), prompts, gens)
        plan = make_policy("gpu-only" if on_gpu else "cpu-only", {}).build(
            PlanContext(tiny, system, Workload(prompts, gens), trace))
        for _ in range(2):  # the second pass is timed
            interp = PlanInterpreter(plan, weights, trace, weights_on=weights_on, device_of=device_of)
            times = []
            for op in plan.ops:
                t0 = time.perf_counter_ns()
                interp.step(op)
                sync()
                times.append((op, (time.perf_counter_ns() - t0) / 1e9))
        for op, t in times:
            samples.setdefault(str(op.kind), []).append((requests, t))  # one scope: every request
    rows = []
    for kind, pts in samples.items():
        x = np.array([p[0] for p in pts], dtype=float)
        y = np.array([p[1] for p in pts])
        slope = float(np.polyfit(x, y, 1)[0]) if len(set(x)) > 1 else 0.0
        rows.append({"device": "cuda" if on_gpu else "cpu", "kind": f"overhead_{kind}", "tokens": 0, "kv": 0,
                     "median_s": max(slope, 0.0), "p10_s": np.nan, "p90_s": np.nan, "repeats": len(pts)})
    return rows


COPY_SIZES = (64 * 2**10, 256 * 2**10, 2**20, 16 * 2**20, 256 * 2**20, 2**30)


def _copy_rows(rounds: int) -> list[dict]:
    """Host-device copies by size: pinned and pageable host memory, both directions (CUDA events). Pinned copies
    are issued as the executor issues them (`non_blocking`), so the end event follows the DMA, not a host sync."""
    timed = device_timer("cuda")
    rows = []
    for nbytes in COPY_SIZES:
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        for pinned in (True, False):
            host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)  # written: untouched pages read as zeros
            name = "pinned" if pinned else "pageable"
            for kind, fn in ((f"copy_h2d_{name}", lambda d=dev, h=host, nb=pinned: d.copy_(h, non_blocking=nb)),
                             (f"copy_d2h_{name}", lambda d=dev, h=host, nb=pinned: h.copy_(d, non_blocking=nb))):
                fn()
                times = [timed(fn) for _ in range(max(rounds, 3))]
                rows.append({"device": "cuda", "kind": kind, "tokens": nbytes, "kv": 0,
                             "median_s": float(np.median(times)), "p10_s": float(np.percentile(times, 10)),
                             "p90_s": float(np.percentile(times, 90)), "repeats": len(times)})
    return rows



