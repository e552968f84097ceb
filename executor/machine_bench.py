"""Microbenchmarks of the machine itself (not of the executor's kernels): what the cost model's constants are.

`python -m executor.machine_bench --out FILE.json` measures, on whatever this machine has:
- GEMMs by shape (`x @ w.T`, bf16) on the GPU (on the CPU with `--gemm-device cpu`): LLMCompass's A100 sweep
  (M from 64 to 32768 at N = K = 12288; N = K from 64 to 32768 at M = 8192), so the same shapes can be compared
  across GPUs, and Mixtral-8x7B's shapes (QKV, O-projection, expert up/gate and down) at M from 1 to 4096. Each
  call is timed alone with CUDA events around it, as an eager framework launches it (launch gaps included), over
  enough weight copies that the L2 never holds the next call's operands; the median call is kept;
- device-to-device copy bandwidth; host-device copies by size, pinned and pageable, each direction, and both
  directions at once (the link's duplex);
- host DRAM shared between PCIe DMA and CPU work: a pinned host-to-device copy loop and a CPU copy loop, each
  alone and then both at once, each reporting the bandwidth it got.
Each result names how it was measured. These are the numbers `experiments/validation/gpu_ops.yaml` and the link
and CPU presets quote as "measured on the lent H200 machine".
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from executor.profile import device_timer, fingerprint
from sim.atomic_files import write_atomic_text

# [M, N, K]: LLMCompass ae/figure5/ab (the A100 set in gpu_ops.yaml), then Mixtral-8x7B's op shapes.
LLMCOMPASS_SHAPES = ([(m, 12288, 12288) for m in (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)]
                     + [(8192, n, n) for n in (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)])
MIXTRAL_NK = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "expert_up": (14336, 4096), "expert_down": (4096, 14336)}
MIXTRAL_M = (1, 4, 16, 64, 256, 1024, 4096)
COPY_SIZES = (2**16, 2**20, 16 * 2**20, 256 * 2**20, 2**30)
ROTATE_BYTES = 512 * 2**20  # operands rotated per shape: several times any GPU's L2 (H200: 60 MB)


MAX_COPIES = 64  # operand copies per shape: small shapes need many to leave L2 (16 of 8192 x 256 x 256 fit in 50 MB)
WARM_UP_S = 1.0


def _warm_up_gpu(seconds: float = WARM_UP_S) -> None:
    """Large GEMMs for about `seconds`, so the first shapes are timed at working clocks, not idle ones."""
    x = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(8):
            x @ x
        torch.cuda.synchronize()


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def gemm_sweep(shapes: list[tuple[int, int, int]], device: str, repeats: int = 5,
               rotate_bytes: int = ROTATE_BYTES) -> list[dict]:
    """Seconds per `x @ w.T` call ([M x K] x [K x N], bf16) for each shape: median over `repeats` passes over the
    rotated operand copies, each call timed alone after one untimed pass."""
    timed = device_timer(device)
    rows = []
    if device == "cuda":
        _warm_up_gpu()
    for m, n, k in shapes:
        one = 2 * (m * k + n * k + m * n)
        copies = max(1, min(MAX_COPIES, math.ceil(rotate_bytes / one)))
        xs = [torch.randn(m, k, dtype=torch.bfloat16, device=device) for _ in range(copies)]
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device=device) for _ in range(copies)]
        outs = [torch.empty(m, n, dtype=torch.bfloat16, device=device) for _ in range(copies)]
        calls = [lambda x=x, w=w, o=o: torch.matmul(x, w.T, out=o) for x, w, o in zip(xs, ws, outs, strict=True)]
        for call in calls:  # untimed: cuBLAS / oneDNN pick and build their kernels
            call()
        times = [timed(call) for _ in range(repeats) for call in calls]
        seconds = _median(times)
        # back to back: a pass over the copies timed whole, per call (launches overlap the previous kernel)
        def one_pass(pass_calls: list[Callable[[], object]] = calls) -> None:
            for call in pass_calls:
                call()

        burst = _median([timed(one_pass) / len(calls) for _ in range(repeats)])
        rows.append({"m": m, "n": n, "k": k, "seconds": seconds, "tflops": 2 * m * n * k / seconds / 1e12,
                     "seconds_back_to_back": burst, "calls": len(times), "copies": copies})
        del xs, ws, outs, calls
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def d2d_copy(nbytes: int = 2**30, repeats: int = 10) -> dict:
    """Device-to-device copy bandwidth, bytes read plus written."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = _median([device_timer("cuda")(lambda: dst.copy_(src)) for _ in range(repeats)])
    return {"bytes": nbytes, "seconds": seconds, "gb_per_s": 2 * nbytes / seconds / 1e9}


def host_copies(sizes: tuple[int, ...] = COPY_SIZES, repeats: int = 5) -> list[dict]:
    """Host-device copies by size, pinned and pageable, each direction (CUDA events around each copy)."""
    timed = device_timer("cuda")
    rows = []
    for nbytes in sizes:
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        for pinned in (True, False):
            host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
            for direction, fn in (("h2d", lambda d=dev, h=host: d.copy_(h, non_blocking=True)),
                                  ("d2h", lambda d=dev, h=host: h.copy_(d, non_blocking=True))):
                fn()
                seconds = _median([timed(fn) for _ in range(repeats)])
                rows.append({"direction": direction, "pinned": pinned, "bytes": nbytes, "seconds": seconds,
                             "gb_per_s": nbytes / seconds / 1e9})
    return rows


def duplex(nbytes: int = 2**30, repeats: int = 5) -> dict:
    """Pinned H2D and D2H of `nbytes` each, alone and at once on two CUDA streams: each direction's bandwidth."""
    h_src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
    h_dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d_dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    d_src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def both() -> tuple[float, float]:
        torch.cuda.synchronize()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        with torch.cuda.stream(s1):
            marks[0].record()
            d_dst.copy_(h_src, non_blocking=True)
            marks[1].record()
        with torch.cuda.stream(s2):
            marks[2].record()
            h_dst.copy_(d_src, non_blocking=True)
            marks[3].record()
        torch.cuda.synchronize()
        return marks[0].elapsed_time(marks[1]) / 1e3, marks[2].elapsed_time(marks[3]) / 1e3

    timed = device_timer("cuda")
    alone_h2d = _median([timed(lambda: d_dst.copy_(h_src, non_blocking=True)) for _ in range(repeats)])
    alone_d2h = _median([timed(lambda: h_dst.copy_(d_src, non_blocking=True)) for _ in range(repeats)])
    both()
    pairs = [both() for _ in range(repeats)]
    return {"bytes": nbytes, "h2d_alone_gb_per_s": nbytes / alone_h2d / 1e9,
            "d2h_alone_gb_per_s": nbytes / alone_d2h / 1e9,
            "h2d_with_d2h_gb_per_s": nbytes / _median([p[0] for p in pairs]) / 1e9,
            "d2h_with_h2d_gb_per_s": nbytes / _median([p[1] for p in pairs]) / 1e9}


def _loop_rate(fn: Callable[[], object], nbytes: int, seconds: float, stop: threading.Event | None = None,
               sync: Callable[[], object] | None = None) -> float:
    """Bytes per second `fn` moves when called back to back for `seconds` (or until `stop`)."""
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and not (stop is not None and stop.is_set()):
        fn()
        if sync is not None:
            sync()
        done += nbytes
    return done / (time.perf_counter() - t0)


def dram_sharing(nbytes: int = 512 * 2**20, seconds: float = 2.0, cuda: bool = True) -> dict:
    """Host DRAM as one resource: a CPU copy loop (`nbytes` read + `nbytes` written per call, all torch threads)
    and, with CUDA, a pinned host-to-device copy loop (`nbytes` read from DRAM per call), each alone and then
    both at once in two threads. GB/s each got; the CPU copy counts bytes read plus written."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    cpu_copy = lambda: dst.copy_(src)  # noqa: E731
    cpu_copy()
    out = {"cpu_copy_bytes": nbytes, "seconds_per_phase": seconds, "threads": torch.get_num_threads(),
           "cpu_copy_alone_gb_per_s": 2 * _loop_rate(cpu_copy, nbytes, seconds) / 1e9}
    if not cuda:
        return out
    host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d = lambda: dev.copy_(host, non_blocking=True)  # noqa: E731
    h2d()
    torch.cuda.synchronize()

    def wait() -> None:  # a blocking event: the waiting thread sleeps instead of spinning on a core the copy needs
        done = torch.cuda.Event(blocking=True)
        done.record()
        done.synchronize()

    out["h2d_alone_gb_per_s"] = _loop_rate(h2d, nbytes, seconds, sync=wait) / 1e9
    rates: dict[str, float] = {}
    stop = threading.Event()

    def dma() -> None:
        rates["h2d"] = _loop_rate(h2d, nbytes, seconds * 10, stop, sync=wait)

    worker = threading.Thread(target=dma)
    worker.start()
    time.sleep(0.05)
    rates["cpu"] = 2 * _loop_rate(cpu_copy, nbytes, seconds)
    stop.set()
    worker.join()
    out["h2d_with_cpu_copy_gb_per_s"] = rates["h2d"] / 1e9
    out["cpu_copy_with_h2d_gb_per_s"] = rates["cpu"] / 1e9
    return out


def machine() -> dict:
    """What was measured: the profile's fingerprint (CPU model and flags, threads, torch, oneDNN, GPU name, time)
    plus the CUDA version and the GPU's memory and multiprocessors."""
    info = {**fingerprint(), "cuda_version": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_bytes=p.total_memory, sms=p.multi_processor_count)
    return info


def run(gemm_device: str, quick: bool = False, save: Callable[[dict], None] | None = None) -> dict:
    """Every benchmark this machine can run (quick: small shapes and sizes, for tests). Each part that fails is
    recorded as its error and the others still run; `save(result)` is called after each part, so a run cut short
    keeps what it measured."""
    cuda = torch.cuda.is_available()
    shapes = LLMCOMPASS_SHAPES + [(m, n, k) for n, k in MIXTRAL_NK.values() for m in MIXTRAL_M]
    if quick:
        shapes = [(m, n, k) for m, n, k in shapes if m * n * k <= 64 * 4096 * 4096 and n <= 4096]
    big = (16 if quick else 1024) * 2**20
    parts: list[tuple[str, Callable[[], object]]] = [
        ("gemm", lambda: gemm_sweep(shapes, gemm_device, repeats=2 if quick else 5,
                                    rotate_bytes=2**20 if quick else ROTATE_BYTES))]
    if cuda:
        parts += [("d2d_copy", lambda: d2d_copy(big)),
                  ("host_copies", lambda: host_copies(tuple(c for c in COPY_SIZES if c <= big))),
                  ("duplex", lambda: duplex(big))]
    parts.append(("dram_sharing", lambda: dram_sharing(nbytes=big // 2, seconds=0.2 if quick else 2.0, cuda=cuda)))
    result: dict = {"machine": machine(), "gemm_device": gemm_device, "errors": {}}
    for name, part in parts:
        try:
            result[name] = part()
        except Exception as exc:  # noqa: BLE001 - one broken part must not cost the others their numbers
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
        if save is not None:
            save(result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--gemm-device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="small shapes only (a smoke test)")
    args = p.parse_args(argv)
    device = args.gemm_device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("machine_bench: --gemm-device cuda: torch sees no CUDA device")
        return 2
    out = Path(args.out)
    result = run(device, quick=args.quick, save=lambda r: write_atomic_text(out, json.dumps(r, indent=1)))
    for name, error in result["errors"].items():
        print(f"machine_bench: {name} failed: {error}")
    for r in result.get("gemm", []):
        print(f"gemm M={r['m']} N={r['n']} K={r['k']}: {r['seconds'] * 1e6:.1f} us, {r['tflops']:.1f} TFLOP/s")
    for key in ("d2d_copy", "duplex", "dram_sharing"):
        if key in result:
            print(key, json.dumps(result[key]))
    for r in result.get("host_copies", []):
        print(f"{r['direction']} {'pinned' if r['pinned'] else 'pageable'} {r['bytes']}: {r['gb_per_s']:.1f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
