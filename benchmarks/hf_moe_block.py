"""The executor's CPU expert paths against Hugging Face transformers' Mixtral expert block and this machine's
ceiling, same shapes, same routing, same weights, in one run.

    pip install -e ".[bench]"      # transformers (optional: without it the HF column reads n/a)
    python benchmarks/hf_moe_block.py [--tokens 16 64 256 1024] [--repeats 5]

For each token count, every path computes one Mixtral-8x7B MoE layer's experts (8 x 4096 x 14336) on the same
hidden states with the same forced top-2 routing (Mixtral's measured per-layer popularity, layer 0):
- `bf16`: the executor's default CPU path (executor/cpu_experts.py: weights prepacked for oneDNN, gate and up
  fused, tokens grouped by expert once);
- `plain`: the executor's generic path (three row-major GEMMs per expert, the reference's math);
- `packed`: the prepacked path at every call, shown when `COXMOE_CPU_PACKED_TOKENS` narrows `bf16` to a band; the
  run ends by saying at which sizes the packed weights beat the plain ones, and the band to set;
- `int8`: per-channel INT8 weights, per-token dynamic INT8 activations, oneDNN's u8 x s8 GEMM (AMX-INT8 where
  present);
- `HF`: transformers' `MixtralExperts` (bf16); `ipex`: the IPEX backend, only when it is importable;
- `ceiling`: this machine's best time for the block's work, max(FLOPs / the measured bf16 GEMM ceiling, bytes the
  block must read / the measured DRAM copy bandwidth), both measured at the start of the run; beside it a pure
  read's bandwidth and the rate stock torch's bf16 GEMM streams expert weights at with 4 tokens an expert (what
  bounds the small-batch sizes with these kernels).
Outputs are checked against the plain path (bf16 paths within 5% of the output's largest value, int8's relative
error printed); times are medians of interleaved repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from timing import call_times  # benchmarks/timing.py (run as a script, benchmarks/ is on sys.path)

from executor import cpu_experts as C
from executor import kernels as K
from executor.profile import bandwidth_row
from executor.weights import LayerWeights
from experiments.cli.common import ScriptParser, positive_int, run_script
from sim.specs import load_model
from traces import SynthConfig, generate_trace

CEILING_M = 1024  # tokens of the GEMM that measures the bf16 ceiling (the largest the block's experts see)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(call_times(fn, repeats))


def gemm_ceiling(h: int, f: int, repeats: int = 3) -> float:
    """The best bf16 GEMM rate (FLOP/s) of an expert-shaped [M x h] x [h x 2f] product, weights prepacked and
    hot, over the plain and the prepacked kernel (so the ceiling never flatters the executor)."""
    x = torch.randn(CEILING_M, h, dtype=torch.bfloat16)
    w = torch.randn(2 * f, h, dtype=torch.bfloat16) * 0.02
    flops = 2 * CEILING_M * h * 2 * f
    best = _median_time(lambda: torch.nn.functional.linear(x, w), repeats)
    if C.onednn_bf16():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, CEILING_M)
        best = min(best, _median_time(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                                      repeats))
    return flops / best


def int8_gemm_ceiling(h: int, f: int, repeats: int = 3) -> float:
    """The INT8 rate (ops/s) of the same expert-shaped product through the executor's INT8 kernel (oneDNN's u8 x s8
    linear), weights prepacked and hot: with the bf16 ceiling, the most INT8 can gain on this machine."""
    w = torch.randn(2 * f, h, dtype=torch.bfloat16) * 0.02
    packed = C._Int8Packed(w[:f], w[f:], torch.zeros(1, f, dtype=torch.bfloat16))
    u8, _ = C.quantize_rows_u8(torch.randn(CEILING_M, h, dtype=torch.bfloat16))
    seconds = _median_time(lambda: packed._gemm(u8, packed.w13, packed.s13, packed.zp13), repeats)
    return 2 * CEILING_M * h * 2 * f / seconds


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second a pure read of 1 GiB moves (an fp32 dot product of a buffer with itself): the DRAM roof
    for weights that are only read, beside the copy's read + write rate the ceiling uses."""
    buf = torch.ones(2**28, dtype=torch.float32)
    return buf.numel() * 4 / _median_time(lambda: torch.dot(buf, buf), repeats)


def kernel_streaming(w13: torch.Tensor, w2: torch.Tensor, rows: int = 4, repeats: int = 5) -> float:
    """Bytes per second stock torch's bf16 GEMM reads expert weights at when there is almost nothing to compute
    (`rows` tokens an expert, two experts' up/gate and down projections, plain row-major weights): what a block
    of that many tokens an expert can stream at best with these kernels."""
    x = torch.randn(rows, w13.shape[2], dtype=torch.bfloat16)
    g = torch.randn(rows, w2.shape[2], dtype=torch.bfloat16)
    experts = range(min(2, w13.shape[0]))
    nbytes = sum(w13[e].numel() + w2[e].numel() for e in experts) * 2
    return nbytes / _median_time(lambda: [(torch.nn.functional.linear(x, w13[e]),
                                           torch.nn.functional.linear(g, w2[e])) for e in experts], repeats)


def _hf_block(h: int, f: int, e: int, w13: torch.Tensor, w2: torch.Tensor):
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError:
        return None
    cfg = MixtralConfig(hidden_size=h, intermediate_size=f, num_local_experts=e, num_experts_per_tok=2)
    hf = MixtralExperts(cfg).to(torch.bfloat16)
    with torch.no_grad():
        hf.gate_up_proj.copy_(w13)
        hf.down_proj.copy_(w2)
    return hf


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--repeats", type=positive_int, default=5)
    args = parser.parse_args()
    spec = load_model("mixtral-8x7b")
    h, f, e = spec.hidden_size, spec.expert_intermediate_size, spec.num_experts
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(e, 2 * f, h, generator=g, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(e, h, f, generator=g, dtype=torch.bfloat16) * 0.02
    hf = _hf_block(h, f, e, w13, w2)
    with torch.no_grad():  # the executor's layout: gate (w1) and up (w3) [E, f, h], down (w2) [E, h, f]; views
        w1, w3 = w13[:, :f], w13[:, f:]

    def layer(backend: str, precision: str, packed_tokens: tuple[int, int] | None = None) -> LayerWeights:
        lw = LayerWeights(attn={}, attn_norm=torch.ones(h), ffn_norm=torch.ones(h), w1=w1, w3=w3, w2=w2)
        lw.cpu_experts = C.CpuExperts(w1, w3, w2, precision, backend, packed_tokens)
        return lw

    paths = {"bf16": layer("auto", "bf16"), "plain": layer("plain", "bf16")}
    # the packed layout at every call, to say where it beats the plain weights (the bf16 column is that path
    # unless $COXMOE_CPU_PACKED_TOKENS narrows it)
    packed = "bf16" if C.packed_tokens_band() == C.EVERY_CALL else "packed"
    if packed == "packed" and C.onednn_bf16():
        paths["packed"] = layer("onednn", "bf16", C.EVERY_CALL)
    wins: list[tuple[float, bool]] = []  # (mean tokens per expert call, packed faster than plain)
    if C.onednn_int8():
        paths["int8"] = layer("auto", "int8")
    if C._ipex() is not None:
        paths["ipex"] = layer("ipex", "bf16")
    copy = bandwidth_row("cpu")  # the profile's own DRAM measurement: a 512 MiB copy, read and write counted
    bw, peak = copy["tokens"] / copy["median_s"], gemm_ceiling(h, f)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU expert backend "
          f"{C.backend()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}, AMX tiles "
          f"{'yes' if getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)() else 'no'}")
    print(f"ceiling inputs, measured now: DRAM copy {bw / 1e9:.1f} GB/s (read + write), bf16 GEMM "
          f"{peak / 1e12:.3f} TFLOP/s ([{CEILING_M} x {h}] x [{h} x {2 * f}], hot prepacked weights)")
    print(f"pure read {read_bandwidth() / 1e9:.1f} GB/s; stock bf16 GEMM at 4 tokens an expert streams weights "
          f"at {kernel_streaming(w13, w2) / 1e9:.1f} GB/s (the most these kernels give few tokens per expert)")
    if "int8" in paths:
        peak8 = int8_gemm_ceiling(h, f)
        print(f"INT8 GEMM, same shape, hot: {peak8 / 1e12:.3f} TOPS: int8/bf16 can gain at most {peak8 / peak:.2f}x "
              "where the block is compute-bound")
    print("Mixtral-8x7B expert block (8 x 4096 x 14336), top-2; times in ms (medians); ratios are speed-ups")
    cols = ["tokens", *paths, "HF", "ceiling", "bound", "bf16/HF", "bf16/ceil", "int8/bf16", "int8 err"]
    print(" ".join(f"{c:>9}" for c in cols))
    for tokens in args.tokens:
        trace = generate_trace(SynthConfig("mixtral-8x7b", 1, e, 2, "table:mixtral-8x7b", 0.0, tokens),
                               np.array([tokens]), np.array([1]))
        ids = torch.from_numpy(trace.experts[:, 0, :].astype(np.int64))
        x = torch.randn(tokens, h, generator=g, dtype=torch.bfloat16) * 0.5
        gates = torch.softmax(torch.randn(tokens, 2, generator=g), dim=-1)

        def run(lw: LayerWeights, x=x, ids=ids, gates=gates) -> torch.Tensor:
            y = torch.zeros(x.shape, dtype=torch.float32)
            routed = K.RoutedTokens(x, ids, e)
            for expert in torch.unique(ids).tolist():
                K.expert_scatter(lw, expert, x, ids, gates, y, routed=routed)
            return y

        calls = {name: (lambda lw=lw: run(lw)) for name, lw in paths.items()}
        if hf is not None:
            calls["HF"] = lambda x=x, ids=ids, gates=gates: hf(x, ids, gates.to(torch.bfloat16))
        with torch.no_grad():
            want = calls["plain"]()
            scale, int8_err = float(want.abs().max()), float("nan")
            for name, fn in calls.items():
                got = fn().float()
                err = float((got - want).norm() / want.norm())
                if name != "int8" and float((got - want).abs().max()) > 0.05 * scale + 1e-3:
                    raise SystemExit(f"{name} disagrees with the plain path at {tokens} tokens")
                if name == "int8":
                    int8_err = err
            times: dict[str, list[float]] = {name: [] for name in calls}  # the check above was the warm-up
            for _ in range(args.repeats):  # interleaved, so drift hits every path alike
                for name, fn in calls.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        used = torch.unique(ids).numel()
        flops = 2 * 3 * h * f * ids.numel()
        nbytes = used * 3 * h * f * 2 + 2 * tokens * h * 2
        compute, memory = flops / peak, nbytes / bw
        ceiling = max(compute, memory)
        row = [f"{tokens:>9}", *(f"{med[n] * 1e3:>9.1f}" for n in paths),
               f"{med['HF'] * 1e3:>9.1f}" if "HF" in med else f"{'n/a':>9}", f"{ceiling * 1e3:>9.1f}",
               f"{'compute' if compute >= memory else 'DRAM':>9}",
               f"{med['HF'] / med['bf16']:>9.2f}" if "HF" in med else f"{'n/a':>9}",
               f"{ceiling / med['bf16']:>9.2f}",
               f"{med['bf16'] / med['int8']:>9.2f}" if "int8" in med else f"{'n/a':>9}",
               f"{int8_err:>9.4f}" if "int8" in med else f"{'n/a':>9}"]
        print(" ".join(row), flush=True)
        if C.onednn_bf16() and packed in med:
            wins.append((ids.numel() / used, med[packed] < med["plain"]))
    if wins:
        won = [t for t, w in wins if w]
        print(f"packed bf16 weights beat the plain ones at {len(won)} of {len(wins)} sizes (mean tokens per expert "
              f"call: {', '.join(f'{t:.0f}' + ('*' if w else '') for t, w in wins)}; * = packed faster)")
        if won and len(won) < len(wins):
            print(f"to use the packed copy only there: {C.ENV_PACKED_TOKENS}={int(min(won))}:{int(max(won))} "
                  "(check the band holds over a few runs; per-call token counts spread around these means)")


if __name__ == "__main__":
    run_script(main, "hf_moe_block")
