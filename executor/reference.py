"""A plain sequential forward pass, the yardstick every executed plan must match.

Each request runs alone, layer by layer; each token's MoE output is the sum over its forced top-k experts,
expert by expert, token by token. No micro-batching, no placement, no coalescing: if a plan computes
something else, the comparison shows it.
"""

from __future__ import annotations

import numpy as np
import torch

from executor import kernels as K
from executor.weights import LayerWeights, ModelWeights
from sim.workload import Workload
from traces import RoutingTrace

Outputs = dict[tuple[int, str, int], torch.Tensor]


def layer_forward(mw: ModelWeights, lw: LayerWeights, layer: int, h: torch.Tensor, request: int,
                  positions: torch.Tensor, rows: np.ndarray, trace: RoutingTrace, cache: K.KVCache) -> torch.Tensor:
    spec = mw.spec
    new = K.qkv(spec, lw, h, positions)
    h_attn = h + K.o_proj(lw, K.attention(spec, lw, new, cache, request, layer))
    x = K.rms_norm(h_attn, lw.ffn_norm)
    if not spec.is_moe_layer(layer):
        return h_attn + K.ffn(lw.dense, x)
    li = spec.moe_index(layer)
    ids = torch.from_numpy(trace.experts[rows, li].astype(np.int64))
    gates = None if trace.gate_weights is None else torch.from_numpy(trace.gate_weights[rows, li])
    w = K.router_weights(lw, x, ids, gates)
    y = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            y[t] += w[t, j].float() * K.expert(lw, int(ids[t, j]), x[t:t + 1])[0].float()
    if lw.shared:
        y += K.ffn(lw.shared, x).float()
    return h_attn + y.to(h.dtype)


def reference_forward(mw: ModelWeights, trace: RoutingTrace, workload: Workload) -> Outputs:
    """Last-layer hidden states of every request's tokens: prefill (step 0) and every decode step."""
    spec = mw.spec
    K.check_run_memory(spec, workload, mw.dtype, "the reference forward pass")
    cache = K.KVCache(spec, int((workload.prompt_lens + workload.gen_lens).max()), mw.dtype)
    out: Outputs = {}
    batch = workload.batch
    for r in range(batch):
        s = int(workload.prompt_lens[r])
        positions = torch.arange(s)
        rows = trace.prefill_rows(np.array([r]))
        h = K.embed(mw, r, positions)
        for layer, lw in enumerate(mw.layers):
            h = layer_forward(mw, lw, layer, h, r, positions, rows, trace, cache)
        out[(r, "prefill", 0)] = h
    for step in range(1, workload.max_gen_len):
        for r in range(batch):
            if workload.gen_lens[r] <= step:
                continue
            positions = torch.tensor([int(workload.prompt_lens[r]) + step - 1])
            rows = trace.decode_rows(step, np.array([r]))
            h = K.embed(mw, r, positions)
            for layer, lw in enumerate(mw.layers):
                h = layer_forward(mw, lw, layer, h, r, positions, rows, trace, cache)
            out[(r, "decode", step)] = h
    return out
