"""What bounds a small-batch CPU expert: DRAM or the GEMM kernel? One prepacked bf16 Mixtral-8x7B expert at M rows,
eight different experts in turn (every call streams its 352 MB of weights from DRAM), against two roofs measured
in the same run: the DRAM copy bandwidth (the profile's own 512 MiB copy) and the rate of an M-row GEMM on a
4096 x 4096 weight that stays in cache (the kernel's own efficiency at that M, no DRAM in the way).

    python benchmarks/expert_hot_cold.py [--rows 16 64 256] [--repeats 3]
"""

from __future__ import annotations

import torch
from hf_moe_block import _median_time  # the sibling benchmark's timer (run as a script, benchmarks/ is on sys.path)

from executor import cpu_experts as C
from executor.profile import bandwidth_row
from experiments.cli.common import ScriptParser, positive_int, run_script

H, F, EXPERTS = 4096, 14336, 8


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive_int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    if not C.onednn_bf16():
        raise SystemExit("needs oneDNN bf16 (AVX512-BF16 or AMX): the prepacked path is what this measures")
    g = torch.Generator().manual_seed(0)
    experts = [C._Bf16Packed(*(torch.randn(*shape, generator=g, dtype=torch.bfloat16) * 0.02
                               for shape in ((F, H), (F, H), (H, F)))) for _ in range(EXPERTS)]
    small = torch.ops.mkldnn._reorder_linear_weight(torch.randn(H, H, generator=g, dtype=torch.bfloat16), 64)
    copy = bandwidth_row("cpu")
    bw = copy["tokens"] / copy["median_s"]
    weight_bytes = 3 * H * F * 2
    print(f"DRAM copy {bw / 1e9:.1f} GB/s; expert weights {weight_bytes / 1e6:.0f} MB")
    for m in args.rows:
        x = torch.randn(m, H, generator=g, dtype=torch.bfloat16)
        per_expert = _median_time(lambda x=x: [e(x) for e in experts], args.repeats) / EXPERTS
        hot = _median_time(lambda x=x: [torch.ops.mkldnn._linear_pointwise(x, small, None, "none", [], "")
                                     for _ in range(20)], args.repeats) / 20
        kernel = 2 * m * H * H / hot
        flops = 2 * m * 3 * H * F / per_expert
        stream = weight_bytes / per_expert
        bound = ("DRAM" if stream >= 0.8 * bw else "kernel" if flops >= 0.8 * kernel else
                 "neither (streaming and compute do not overlap)")
        print(f"M={m}: {per_expert * 1e3:.1f} ms an expert; streams {stream / 1e9:.1f} GB/s ({stream / bw:.0%} of the "
              f"copy), computes {flops / 1e12:.2f} TFLOP/s ({flops / kernel:.0%} of an M-row GEMM on cached weights, "
              f"{kernel / 1e12:.2f}); bound: {bound}")


if __name__ == "__main__":
    run_script(main, "expert_hot_cold")
