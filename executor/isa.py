"""Which kernel oneDNN picks for the executor's bf16 GEMMs, and how fast it runs here.

oneDNN names its ISA in verbose output (`ONEDNN_VERBOSE=1`): `brg_matmul:avx10_1_512_amx` (or
`avx512_core_amx` in older releases) means AMX; `avx512_core_bf16` means AVX-512 BF16 without AMX. The check
runs in a subprocess because the variable must be set before oneDNN initialises. It also reports whether
intel-extension-for-pytorch is importable next to this torch (its last release needs torch 2.8, so usually
not), since the executor uses stock torch either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

PROBE = r"""
import json, time, torch
import torch.nn.functional as F
torch.manual_seed(0)
m, k, n = {m}, {k}, {n}
x = torch.randn(m, k, dtype=torch.bfloat16)
w = torch.randn(n, k, dtype=torch.bfloat16)
for _ in range(3):
    F.linear(x, w)
times = []
for _ in range({reps}):
    t0 = time.perf_counter(); F.linear(x, w); times.append(time.perf_counter() - t0)
times.sort()
print("RESULT " + json.dumps({{"median_s": times[len(times) // 2], "flops": 2 * m * k * n,
                              "amx_tile": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())}}))
"""


def onednn_isa(m: int = 256, k: int = 4096, n: int = 4096, reps: int = 5, timeout_s: float = 120.0) -> dict:
    """Run a bf16 F.linear under ONEDNN_VERBOSE; return the ISA line, the kernel, AMX yes/no and TFLOP/s."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(m=m, k=k, n=n, reps=reps)], capture_output=True,
                          text=True, env=env, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"oneDNN probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    isa = next((line.split("isa:", 1)[1].strip() for line in proc.stdout.splitlines() if "isa:" in line), None)
    kernels = sorted({part for line in proc.stdout.splitlines() if ",exec," in line
                      for part in line.split(",") if part.startswith(("brg", "gemm", "jit", "ref"))})
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    uses_amx = any("amx" in kernel for kernel in kernels)
    # torch sends bf16 GEMMs to oneDNN only on CPUs with AVX-512; elsewhere (an AVX2-only EPYC) oneDNN is silent.
    return {"isa": isa, "onednn_used": bool(kernels), "kernels": kernels, "uses_amx": uses_amx,
            "amx_tile_supported": result["amx_tile"],
            "shape": [m, k, n], "median_s": result["median_s"],
            "tflops": result["flops"] / result["median_s"] / 1e12}


def ipex_status() -> dict:
    """Whether intel-extension-for-pytorch imports next to this torch (checked in a subprocess)."""
    code = "import intel_extension_for_pytorch as ipex, torch; print(ipex.__version__)"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        return {"available": False, "reason": "import timed out"}
    if proc.returncode == 0:
        return {"available": True, "version": proc.stdout.strip()}
    last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
    if "No module named" in last:
        last = "not installed (optional; its last release, 2.8, requires torch 2.8)"
    return {"available": False, "reason": last}


def gemm_sweep(rows: tuple[int, ...] = (16, 64, 256, 1024), k: int = 4096, n: int = 4096) -> dict:
    """bf16 GEMM TFLOP/s over the token count (rows); the best is this machine's measured ceiling, and each
    shape is reported as a fraction of it."""
    points = {m: onednn_isa(m=m, k=k, n=n, reps=5)["tflops"] for m in rows}
    ceiling = max(points.values())
    return {"k": k, "n": n, "tflops": points, "ceiling_tflops": ceiling,
            "fraction_of_ceiling": {m: v / ceiling for m, v in points.items()}}


def report(sweep: bool = True) -> dict:
    t0 = time.perf_counter()
    out = {"onednn": onednn_isa(), "ipex": ipex_status()}
    if sweep:
        out["sweep"] = gemm_sweep()
    out["wall_s"] = time.perf_counter() - t0
    return out
