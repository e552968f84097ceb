"""CPU attention against the CPU's GEMM rates: what the cost model's CPU attention rates should be.

Runs the executor's own OP1 (`executor.kernels.attention`, torch's fused CPU kernel) on a GQA model's attention
shape (default Mixtral-8x7B: 32 query heads, 8 KV heads of 128) and reports, for prompts of several lengths, the
prefill rate in the simulator's FLOPs (`ModelSpec.attention_flops` over the causal pairs) and, for one decode query
per request over several cache lengths, the rate its KV bytes stream at; beside them, in the same process, a bf16
GEMM (1024 x 4096 x 4096) and the DRAM copy bandwidth. With `--isa-cap` it runs itself again in a child process whose
oneDNN is capped at AVX512_CORE_BF16 (no AMX), so the same numbers come with the matrix engine switched off.

    python benchmarks/cpu_attention_rate.py [--model M] [--lengths 128 256 512 1024 2048] [--repeats 5] [--isa-cap]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
from timing import call_times  # benchmarks/timing.py (run as a script, benchmarks/ is on sys.path)

import executor.kernels as K
from executor.profile import bandwidth_row, fingerprint
from experiments.cli.common import ScriptParser, positive_int, run_script
from sim.errors import SimInputError
from sim.specs import ModelSpec, load_model

CAP = "AVX512_CORE_BF16"
DECODE_REQUESTS = 16


def _best(fn: Callable[[], object], repeats: int) -> float:
    return min(call_times(fn, repeats))


def _new_tokens(spec: ModelSpec, rows: int) -> dict[str, torch.Tensor]:
    """Random query, key and value rows of a grouped-query model (what OP0 hands OP1; no weights needed)."""
    heads = {"q": spec.num_attention_heads, "k": spec.num_kv_heads, "v": spec.num_kv_heads}
    return {name: torch.randn(rows, n, spec.head_dim, dtype=torch.bfloat16) for name, n in heads.items()}


def measure(model: str, lengths: list[int], repeats: int, gemm_size: int = 1024) -> dict:
    """GEMM, copy, prefill and decode attention rates on this process's oneDNN ISA."""
    spec = load_model(model)
    if spec.attention != "gqa":
        raise SimInputError(f"model {model} has {spec.attention} attention; only GQA models "
                            "are measured (their OP1 needs no weights)")
    x = torch.randn(gemm_size, 4096, dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    gemm = 2 * gemm_size * 4096 * 4096 / _best(lambda: x @ w.T, repeats)
    copy = bandwidth_row("cpu")
    out = {"model": model, "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA", "none"), "gemm_rows": gemm_size,
           "gemm_flops_per_s": gemm,
           "copy_bytes_per_s": copy["tokens"] / copy["median_s"], "prefill": [], "decode": []}
    kv_bytes_per_token = spec.kv_values_per_token_layer * 2
    for s in lengths:
        new = _new_tokens(spec, s)

        def prefill(new: dict = new, s: int = s) -> None:
            K.attention(spec, None, new, K.KVCache(spec, s, torch.bfloat16), 0, 0)

        seconds = _best(prefill, repeats)
        flops = spec.attention_flops(s, s * (s + 1) // 2, prefill=True)
        out["prefill"].append({"tokens": s, "seconds": seconds, "flops_per_s": flops / seconds})
        cache = K.KVCache(spec, s + 1, torch.bfloat16)
        cache.append(0, 0, new["k"], new["v"])
        query = {key: t[-1:] for key, t in new.items()}

        def decode(cache: K.KVCache = cache, query: dict = query, s: int = s) -> None:
            for _ in range(DECODE_REQUESTS):
                cache.length[(0, 0)] = s
                K.attention(spec, None, query, cache, 0, 0)

        seconds = _best(decode, repeats) / DECODE_REQUESTS
        out["decode"].append({"kv_tokens": s, "seconds": seconds,
                              "kv_bytes_per_s": (s + 1) * kv_bytes_per_token / seconds})
    return out


def _print(result: dict) -> None:
    gemm = result["gemm_flops_per_s"]
    print(f"oneDNN ISA cap: {result['isa_cap']}; bf16 GEMM {result['gemm_rows']}x4096x4096 "
          f"{gemm / 1e12:.3f} TFLOP/s; "
          f"DRAM copy {result['copy_bytes_per_s'] / 1e9:.1f} GB/s")
    for row in result["prefill"]:
        print(f"  prefill {row['tokens']:5d} tokens: {row['flops_per_s'] / 1e12:.3f} TFLOP/s "
              f"({row['flops_per_s'] / gemm:.2f} of the GEMM), {row['seconds'] * 1e3:.2f} ms")
    for row in result["decode"]:
        print(f"  decode over {row['kv_tokens']:5d} keys: {row['kv_bytes_per_s'] / 1e9:.2f} GB/s of KV "
              f"({row['kv_bytes_per_s'] / result['copy_bytes_per_s']:.2f} of the copy), "
              f"{row['seconds'] * 1e6:.0f} us a request")


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mixtral-8x7b", help="a GQA model preset (default mixtral-8x7b)")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--isa-cap", action="store_true", help=f"also measure with oneDNN capped at {CAP}")
    parser.add_argument("--json", action="store_true", help="print the measurement as JSON only")
    args = parser.parse_args()
    result = measure(args.model, args.lengths, args.repeats)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{fingerprint()['cpu_model']}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    _print(result)
    if args.isa_cap:
        cmd = [sys.executable, __file__, "--json", "--model", args.model, "--repeats", str(args.repeats), "--lengths",
               *map(str, args.lengths)]
        child = subprocess.run(cmd, env={**os.environ, "ONEDNN_MAX_CPU_ISA": CAP}, capture_output=True, text=True,
                               check=True)
        capped = json.loads(child.stdout.strip().splitlines()[-1])
        _print(capped)
        ratios = [a["flops_per_s"] / b["flops_per_s"] for a, b in zip(result["prefill"], capped["prefill"],
                                                                      strict=True)]
        print(f"prefill attention with / without AMX: {', '.join(f'{r:.2f}' for r in ratios)} "
              f"(median {statistics.median(ratios):.2f}); GEMM "
              f"{result['gemm_flops_per_s'] / capped['gemm_flops_per_s']:.2f}")


if __name__ == "__main__":
    run_script(main, "cpu_attention_rate")
