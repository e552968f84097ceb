"""The math of one decoder layer, op by op, in torch: what the executor runs for each plan op kind.

Inputs are a request's tokens (T rows); attention reads and extends that request's KV cache. Routing is
forced: callers pass the expert ids (from the trace); gate weights are the softmax of the router logits over
the chosen experts (or the trace's gate weights when it has them).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from executor.cpu_experts import CpuExperts, gated_ffn
from executor.weights import LayerWeights, ModelWeights
from sim.plan import shard_bounds
from sim.specs import ModelSpec
from sim.workload import Workload
from traces.limits import check_memory

ROPE_THETA = 10000.0
# Attention's scores for one call: heads x queries x keys fp32 values, with the mask and softmax about three such
# arrays (a 12,000-token prompt of a 4-head model took 5.8 GB in one call); query rows are taken in chunks that
# keep one array under this size (a Mixtral prefill of 800 tokens, 82 MB, stays one call).
ATTENTION_SCORES_BYTES = 256 * 2**20


def token_ids(request: int | torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Deterministic stand-in token ids (routing comes from the trace, so the text does not matter); `request`
    is one request's id or each position's."""
    return (request * 7919 + positions * 104729 + 12345) % vocab


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over the last dimension of x [T, heads, d] at `positions` [T]."""
    half = x.shape[-1] // 2
    inv = 1.0 / (ROPE_THETA ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    ang = positions.to(torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class KVCache:
    """Per request and layer: the cached keys and values (GQA) or latent and rope key (MLA), preallocated."""

    def __init__(self, spec: ModelSpec, max_len: int, dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.spec, self.max_len, self.dtype, self.device = spec, max_len, dtype, device
        self.store: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.length: dict[tuple[int, int], int] = {}

    def _slot(self, request: int, layer: int, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """The request's cache buffers at `layer`, allocated on `device` (where its first entries are made, so a
        GPU attention's first call does not move a host allocation inside it) on first use."""
        key = (request, layer)
        if key not in self.store:
            s = self.spec
            if s.attention == "mla":
                shapes = [(self.max_len, s.kv_lora_rank), (self.max_len, s.qk_rope_head_dim)]
            else:
                shapes = [(self.max_len, s.num_kv_heads, s.head_dim)] * 2
            self.store[key] = [torch.zeros(shape, dtype=self.dtype, device=device or self.device) for shape in shapes]
            self.length[key] = 0
        return self.store[key]

    def append(self, request: int, layer: int, *parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append T new entries; return the whole cache so far (views). The cache follows the device of the
        new entries (a plan that moves attention between phases moves its cache too)."""
        slot = self._slot(request, layer, parts[0].device)
        if slot[0].device != parts[0].device:
            slot[:] = [buf.to(parts[0].device) for buf in slot]
        start = self.length[(request, layer)]
        end = start + parts[0].shape[0]
        if end > self.max_len:
            raise ValueError(f"KV cache of request {request} overflows {self.max_len} entries")
        for buf, new in zip(slot, parts, strict=True):
            buf[start:end] = new
        self.length[(request, layer)] = end
        return tuple(buf[:end] for buf in slot)


def qkv(spec: ModelSpec, lw: LayerWeights, h: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """OP0: norm and input projections (with rope) for T tokens of one request."""
    x = rms_norm(h, lw.attn_norm)
    a, n = lw.attn, spec.num_attention_heads
    if spec.attention == "mla":
        nope, rp = spec.qk_nope_head_dim, spec.qk_rope_head_dim
        q = x @ a["wq"].T if "wq" in a else rms_norm(x @ a["wq_a"].T, a["q_norm"]) @ a["wq_b"].T
        q = q.view(-1, n, nope + rp)
        q = torch.cat([q[..., :nope], rope(q[..., nope:], positions)], dim=-1)
        kv = x @ a["wkv_a"].T
        latent = rms_norm(kv[:, :spec.kv_lora_rank], a["kv_norm"])
        k_rope = rope(kv[:, None, spec.kv_lora_rank:], positions)[:, 0]
        return {"q": q, "c": latent, "k_rope": k_rope}
    d, kvh = spec.head_dim, spec.num_kv_heads
    q = rope((x @ a["wq"].T).view(-1, n, d), positions)
    k = rope((x @ a["wk"].T).view(-1, kvh, d), positions)
    v = (x @ a["wv"].T).view(-1, kvh, d)
    return {"q": q, "k": k, "v": v}


def attention(spec: ModelSpec, lw: LayerWeights, new: dict[str, torch.Tensor], cache: KVCache, request: int,
              layer: int) -> torch.Tensor:
    """OP1: append this request's new K/V and attend causally over its cache. Returns [T, heads x v_dim].

    MLA runs as the simulator prices it (`ModelSpec.attention_flops`), as serving runtimes run it: a decode query
    (one row) absorbed, its nope part taken into the latent by the up-projection's key half and the latent output
    back out by its value half, over the cached latent and rope key (one shared head); a prompt over keys and values
    decompressed from the latent."""
    q = new["q"]
    if spec.attention != "mla":
        k, v = cache.append(request, layer, new["k"], new["v"])
        return _attend(q, k, v).reshape(q.shape[0], -1)
    latent, k_rope = cache.append(request, layer, new["c"], new["k_rope"])
    n, nope, vd = spec.num_attention_heads, spec.qk_nope_head_dim, spec.v_head_dim
    scale = (nope + spec.qk_rope_head_dim) ** -0.5  # the decompressed head's, whatever form runs
    if q.shape[0] == 1:
        key_up, value_up = absorbed_up(spec, lw)
        q_latent = torch.bmm(q[0, :, None, :nope], key_up)[:, 0]  # [heads, rank]: a GEMV per head
        return torch.bmm(_absorbed_attend(torch.cat([q_latent, q[0, :, nope:]], dim=-1), latent, k_rope, scale),
                         value_up).reshape(1, -1)
    kv = (latent @ lw.attn["wkv_b"].T).view(-1, n, nope + vd)
    k = torch.cat([kv[..., :nope], k_rope[:, None, :].expand(-1, n, -1)], dim=-1)
    return _attend(q, k, kv[..., nope:], scale).reshape(q.shape[0], -1)


def _absorbed_attend(queries: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode token's absorbed MLA attention: its heads' queries [heads, rank + rope] over the cached
    [latent, rope key] rows, every key visible; returns [heads, 1, rank], the latent output per head. The heads
    share one key set, so they go in as query rows of a single head (no GQA broadcast, which CUDA's fused kernels
    do not take at this 576-wide head), and the keys serve as the values too (no padded copy of the latent): the
    output's first `rank` columns are the latent values' (exact; 2-8x faster on the CPU at 1024-4096 keys than
    the 16-head GQA call with padded values)."""
    keys = torch.cat([latent, k_rope], dim=-1)[None, None]
    out = F.scaled_dot_product_attention(queries[None, None], keys, keys, scale=scale)
    return out[0, 0, :, None, :latent.shape[-1]]


_ABSORB_LOCK = threading.Lock()


def absorbed_up(spec: ModelSpec, lw: LayerWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA's up-projection (`wkv_b`, per head: nope key rows, then value rows, over the latent) as absorbed decode
    multiplies by it: the key half [heads, nope, rank] and the value half transposed [heads, rank, v], contiguous
    (strided halves made every call copy 4 MB on DeepSeek-V2-Lite), made once per layer weights."""
    if lw.absorbed_up is None:
        with _ABSORB_LOCK:
            if lw.absorbed_up is None:
                n, nope = spec.num_attention_heads, spec.qk_nope_head_dim
                up = lw.attn["wkv_b"].reshape(n, nope + spec.v_head_dim, spec.kv_lora_rank)
                lw.absorbed_up = (up[:, :nope].contiguous(), up[:, nope:].transpose(1, 2).contiguous())
    return lw.absorbed_up


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention of q [T, heads, d] over k [L, kv_heads, d] and v [L, kv_heads, dv], the queries being the
    last T of the L positions (query row i sees keys up to L - T + i); returns [T, heads, dv].

    Inputs go to `scaled_dot_product_attention` as 4-D [1, heads, rows, dim] tensors with grouped K/V heads left
    grouped (`enable_gqa`), narrower values zero-padded to the key width, and no mask where the causal shape says it
    (a whole prompt: `is_causal`; one query over its whole cache: none): torch 2.13 runs its fused (flash) kernels
    only so; 3-D inputs or unequal head widths fall back to the unfused math kernel, 4-15x slower in prefill and
    7-18x in decode on a Xeon AMX VM (docs/executor.md, "Attention: torch's fused kernel")."""
    n, vd = q.shape[1], v.shape[-1]
    if vd < k.shape[-1]:  # the fused kernels need equal head widths; zero columns add zeros to the output
        v = F.pad(v, (0, k.shape[-1] - vd))
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
    rows, keys = q.shape[0], k.shape[0]
    offset = keys - rows  # the first query's position
    grouped = k.shape[1] != n
    chunk = max(1, ATTENTION_SCORES_BYTES // (4 * n * keys))  # query rows per call (each row is independent)
    outs = []
    for lo in range(0, rows, chunk):
        hi = min(rows, lo + chunk)
        seen = offset + hi  # keys the chunk's last query sees; later keys are nobody's in this chunk
        kc, vc, qc = k4[:, :, :seen], v4[:, :, :seen], q4[:, :, lo:hi]
        if hi - lo == 1:  # one query over every key before it
            out = F.scaled_dot_product_attention(qc, kc, vc, scale=scale, enable_gqa=grouped)
        elif seen == hi - lo:  # the chunk's queries are its keys: the plain causal triangle
            out = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=grouped)
        else:
            pos = torch.arange(offset + lo, offset + hi, device=q.device)
            mask = torch.arange(seen, device=q.device)[None, :] <= pos[:, None]
            out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=grouped)
        outs.append(out[0, :, :, :vd])
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.transpose(0, 1)


def check_run_memory(spec: ModelSpec, workload: Workload, dtype: torch.dtype, what: str) -> None:
    """Refuse, before running, a run whose weights, full KV cache and largest attention call exceed the memory
    limit (`--max-gib`): weights alone were checked, and a long prompt's cache and scores were not."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    longest = int((workload.prompt_lens + workload.gen_lens).max())
    cache = workload.batch * spec.num_layers * longest * spec.kv_values_per_token_layer * itemsize
    scores = 3 * min(ATTENTION_SCORES_BYTES, 4 * spec.num_attention_heads * longest * longest)
    check_memory(spec.total_params * itemsize + cache + scores,
                 f"{what} ({spec.total_params:,} parameters, a KV cache of {workload.batch} x {longest} "
                 f"tokens x {spec.num_layers} layers)")


def o_proj(lw: LayerWeights, attn_out: torch.Tensor) -> torch.Tensor:
    """OP2: output projection (the caller adds the residual)."""
    return attn_out @ lw.attn["wo"].T


def o_proj_op(lw: LayerWeights, h: torch.Tensor, attn_out: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The O-projection op over a scope's tokens: the projection plus the residual `h`, the FFN norm of that,
    and the experts' fp32 accumulator: (h_attn, x, y). What the interpreter runs and the profile times."""
    h_attn = h + o_proj(lw, attn_out)
    x = rms_norm(h_attn, lw.ffn_norm)
    return h_attn, x, torch.zeros(x.shape, dtype=torch.float32, device=x.device)


def router_weights(lw: LayerWeights, x_norm: torch.Tensor, ids: torch.Tensor,
                   gates: torch.Tensor | None = None) -> torch.Tensor:
    """Gate weights of the forced top-k `ids` [T, k]: the trace's, or the softmax of their router logits."""
    if gates is not None:
        return gates.to(x_norm.dtype)
    logits = (x_norm @ lw.router.T).float()
    return torch.softmax(torch.gather(logits, 1, ids.long()), dim=-1).to(x_norm.dtype)


def expert(lw: LayerWeights, e: int, x: torch.Tensor) -> torch.Tensor:
    """OP3 for one routed expert: gated FFN (SiLU(x W1) * x W3) W2 over the tokens routed to it."""
    return gated_ffn(x, lw.w1[e], lw.w3[e], lw.w2[e])


_CPU_EXPERTS_LOCK = threading.Lock()


def cpu_experts(lw: LayerWeights) -> CpuExperts:
    """The layer's CPU expert runner: the one set on it (`use_cpu_experts`), else a bf16 one on the default
    backend, made once."""
    if lw.cpu_experts is None:
        with _CPU_EXPERTS_LOCK:
            if lw.cpu_experts is None:
                lw.cpu_experts = CpuExperts(lw.w1, lw.w3, lw.w2)
    return lw.cpu_experts


def use_cpu_experts(mw: ModelWeights, precision: str = "bf16", backend: str | None = None) -> ModelWeights:
    """Run every MoE layer's CPU experts at `precision` on `backend` (see executor.cpu_experts); returns mw."""
    for lw in mw.layers:
        if lw.w1 is not None and lw.w1.device.type == "cpu":
            lw.cpu_experts = CpuExperts(lw.w1, lw.w3, lw.w2, precision, backend)
    return mw


class RoutedTokens:
    """A scope's (token, slot) pairs grouped by expert once (stable, so each expert keeps the row-major order
    `nonzero` gives), and the tokens gathered once in that order: every expert op slices its rows from here."""

    def __init__(self, x: torch.Tensor, ids: torch.Tensor, num_experts: int):
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts).tolist()
        self.starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self.token, self.slot = order // k, order % k
        self.x = x[self.token]

    def rows(self, e: int) -> slice:
        return slice(self.starts[e], self.starts[e + 1]) if e + 1 < len(self.starts) else slice(0, 0)


def expert_scatter(lw: LayerWeights, e: int, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor,
                   y: torch.Tensor, shard: int = 0, shards: int = 1, routed: RoutedTokens | None = None,
                   lock: threading.Lock | None = None) -> int:
    """One expert op as the executor runs it: find the scope's tokens routed to `e` (ids [N, k]; `routed`, when
    given, has them grouped already), take shard `shard` of `shards` of them (contiguous, sizes as
    np.array_split), run the expert on them (on the CPU through `cpu_experts`), add the gate-weighted outputs
    into the fp32 accumulator y [N, h] (under `lock` when given). Returns the tokens."""
    if routed is None:
        t, j = torch.nonzero(ids == e, as_tuple=True)
        xs = None
    else:
        rows = routed.rows(e)
        t, j, xs = routed.token[rows], routed.slot[rows], routed.x[rows]
    if shards > 1:
        lo, hi = shard_bounds(t.numel(), shard, shards)
        t, j = t[lo:hi], j[lo:hi]
        xs = None if xs is None else xs[lo:hi]
    if t.numel():
        if xs is None:
            xs = x[t]
        out = cpu_experts(lw)(e, xs) if xs.device.type == "cpu" else expert(lw, e, xs)
        weighted = out.float() * gates[t, j].float()[:, None]
        if lock is None:
            y.index_add_(0, t, weighted)
        else:
            with lock:
                y.index_add_(0, t, weighted)
    return int(t.numel())


def ffn(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The shared expert or a dense FFN (the shared one optionally scaled by its sigmoid gate)."""
    y = gated_ffn(x, weights["w1"], weights["w3"], weights["w2"])
    if "gate" in weights:
        y = y * torch.sigmoid(x @ weights["gate"].T)
    return y


def embed(mw: ModelWeights, request: int, positions: torch.Tensor) -> torch.Tensor:
    return mw.embed[token_ids(request, positions, mw.spec.vocab_size)]


def lm_head(mw: ModelWeights, h_last: torch.Tensor) -> torch.Tensor:
    return rms_norm(h_last, mw.final_norm) @ mw.lm_head.T
