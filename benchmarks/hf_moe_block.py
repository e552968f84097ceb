"""The executor's CPU expert path against Hugging Face transformers' Mixtral expert block, same shapes, same
routing, same weights, on this machine, in one run.

    pip install -e ".[bench]"      # transformers (optional: the project itself never needs it)
    python benchmarks/hf_moe_block.py [--tokens 16 64 256] [--repeats 5]

For each token count: both paths compute one Mixtral-8x7B MoE layer's experts (8 x 4096 x 14336, bf16) on the
same hidden states with the same forced top-2 routing (Mixtral's measured per-layer popularity, layer 0);
the outputs are checked to agree, and the median time of each is printed with the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from executor import kernels as K
from executor.weights import LayerWeights
from sim.specs import load_model
from traces import SynthConfig, generate_trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    try:
        import transformers
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError:
        raise SystemExit("transformers with MixtralExperts (3-D expert tensors, transformers >= 5) is needed: "
                         "pip install -e '.[bench]'") from None
    spec = load_model("mixtral-8x7b")
    h, f, e = spec.hidden_size, spec.expert_intermediate_size, spec.num_experts
    cfg = MixtralConfig(hidden_size=h, intermediate_size=f, num_local_experts=e, num_experts_per_tok=2)
    hf = MixtralExperts(cfg).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hf.gate_up_proj.copy_(torch.randn(e, 2 * f, h, generator=g, dtype=torch.bfloat16) * 0.02)
        hf.down_proj.copy_(torch.randn(e, h, f, generator=g, dtype=torch.bfloat16) * 0.02)
    # The executor's layout: gate (w1) and up (w3) [E, f, h], down (w2) [E, h, f]; views, no copies.
    lw = LayerWeights(attn={}, attn_norm=torch.ones(h), ffn_norm=torch.ones(h), w1=hf.gate_up_proj.data[:, :f],
                      w3=hf.gate_up_proj.data[:, f:], w2=hf.down_proj.data)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"Mixtral-8x7B expert block, bf16")
    print(f"{'tokens':>7} {'executor ms':>12} {'HF ms':>9} {'HF / executor':>14} {'max abs diff':>13}")
    for tokens in args.tokens:
        trace = generate_trace(SynthConfig("mixtral-8x7b", 1, e, 2, "table:mixtral-8x7b", 0.0, tokens),
                               np.array([tokens]), np.array([1]))
        ids = torch.from_numpy(trace.experts[:, 0, :].astype(np.int64))
        x = torch.randn(tokens, h, generator=g, dtype=torch.bfloat16) * 0.5
        gates = torch.softmax(torch.randn(tokens, 2, generator=g), dim=-1)

        def executor_path(x=x, ids=ids, gates=gates) -> torch.Tensor:
            y = torch.zeros(x.shape, dtype=torch.float32)
            for expert in torch.unique(ids).tolist():
                K.expert_scatter(lw, expert, x, ids, gates, y)
            return y

        def hf_path(x=x, ids=ids, gates=gates) -> torch.Tensor:
            with torch.no_grad():
                return hf(x, ids, gates.to(torch.bfloat16))

        ours, theirs = executor_path(), hf_path()
        diff = float((ours - theirs.float()).abs().max())
        assert diff < 0.05 * float(theirs.float().abs().max()) + 1e-3, f"outputs differ by {diff}"
        t_ours, t_hf = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            t0 = time.perf_counter()
            executor_path()
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hf_path()
            t_hf.append(time.perf_counter() - t0)
        a, b = statistics.median(t_ours), statistics.median(t_hf)
        print(f"{tokens:>7} {a * 1e3:>12.1f} {b * 1e3:>9.1f} {b / a:>14.2f} {diff:>13.4f}")


if __name__ == "__main__":
    main()
