"""Summary statistics of a routing trace: popularity, entropy, reuse and LRU expert-cache hit rates."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from traces.format import RoutingTrace
from traces.limits import check_memory


@dataclass(frozen=True)
class TraceStats:
    """Per-layer statistics (lists indexed by MoE layer) and their means."""

    num_requests: int
    num_tokens: int
    num_layers: int
    num_experts: int
    top_k: int
    popularity: list[list[float]]          # share of the layer's selections per expert
    entropy_bits: list[float]              # entropy of the popularity vector
    max_entropy_bits: float                # log2(num_experts): uniform routing
    hottest_share: list[float]
    coldest_share: list[float]
    reuse_rate: list[float]                # mean share of a token's top-k also chosen by the previous token
    same_top1_rate: list[float]            # P(first choice equals the previous token's first choice)
    lru_hit_rate: list[list[float]]        # [layer][c-1]: hit rate of a per-layer LRU cache of c experts
    lru_tokens: int                        # routed tokens the LRU simulation replayed
    cross_layer_affinity: list[float]      # [layer l, for l < L-1]: share of tokens whose first choice at l+1 is
    #                                        the one most often following their first choice at l (a prefetcher's
    #                                        best single guess; about the hottest share when layers are independent)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean_entropy_bits"] = float(np.mean(self.entropy_bits))
        data["mean_reuse_rate"] = float(np.mean(self.reuse_rate))
        data["mean_lru_hit_rate"] = np.mean(np.asarray(self.lru_hit_rate), axis=0).tolist()
        return data


REUSE_CHUNK_BYTES = 64 * 2**20  # the [n, L, k, k] comparison of one chunk of tokens


def _reuse(trace: RoutingTrace, chunk: int = 1 << 14) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: mean share of a token's top-k chosen by the previous token (same request), and the rate
    at which the first choice repeats. Tokens go in chunks to bound the [n, L, k, k] comparison (fewer tokens a
    chunk where L k^2 is large: top-2048 made it 8.6 GiB)."""
    trace.require_prompt_rows("reuse statistics")
    L, k = trace.header.num_layers, trace.header.top_k
    chunk = max(1, min(chunk, REUSE_CHUNK_BYTES // (L * k * k)))
    follows = np.ones(trace.num_tokens, dtype=bool)
    follows[trace.token_offsets[:-1]] = False  # the first token of each request has no predecessor
    idx = np.flatnonzero(follows)
    overlap = np.zeros(L, dtype=np.float64)
    top1 = np.zeros(L, dtype=np.float64)
    for s in range(0, idx.size, chunk):
        rows = idx[s:s + chunk]
        cur, prev = trace.experts[rows], trace.experts[rows - 1]  # [n, L, k]
        shared = (cur[..., :, None] == prev[..., None, :]).any(axis=-1).sum(axis=-1)  # [n, L]
        overlap += shared.sum(axis=0) / k
        top1 += (cur[..., 0] == prev[..., 0]).sum(axis=0)
    n = max(idx.size, 1)
    return overlap / n, top1 / n


def lru_hit_rates(trace: RoutingTrace, max_tokens: int = 50_000) -> tuple[np.ndarray, int]:
    """Hit rate [layers, E] of an LRU cache of c = 1..E experts per layer, replaying each request's tokens.

    An access hits a cache of c experts when fewer than c distinct other experts were used since that expert's
    last use (the LRU stack distance); experts chosen together by one token count as used after each other,
    so a cache smaller than top_k cannot hold a whole token's set. Requests are
    replayed in order until `max_tokens` routed tokens are covered, vectorised across requests.
    """
    trace.require_prompt_rows("LRU hit rates")
    L, E = trace.header.num_layers, trace.header.num_experts
    lens = trace.routed_lens
    take = int(np.searchsorted(np.cumsum(lens), max_tokens, side="right"))
    take = max(1, min(take, trace.num_requests))
    lens = lens[:take]
    offsets = trace.token_offsets[:take]
    # the last-use table and its per-position copy (int64 each), and the [a, L, k, E] comparison
    check_memory(take * L * E * (16.0 + trace.header.top_k), f"the LRU replay of {take:,} requests x {L} layers x "
                 f"{E} experts")
    hist = np.zeros((L, E + 1), dtype=np.int64)  # distance E means "never seen": a miss at every size
    last = np.full((take, L, E), -1, dtype=np.int64)
    rows_l = np.arange(L)[None, :, None]
    positions = tqdm(range(int(lens.max())), desc="LRU replay", unit="pos", disable=None, leave=False)
    for pos in positions:
        active = np.flatnonzero(lens > pos)
        ids = trace.experts[offsets[active] + pos].astype(np.int64)  # [a, L, k]
        lst = last[active]                                             # [a, L, E]
        seen = np.take_along_axis(lst, ids, axis=2)                    # [a, L, k]
        # distinct other experts used at or after this one's last use (its own entry counts once: -1)
        newer = (lst[:, :, None, :] >= seen[..., None]).sum(axis=-1) - 1
        dist = np.where(seen < 0, E, newer)
        for layer in range(L):
            hist[layer] += np.bincount(dist[:, layer, :].ravel(), minlength=E + 1)
        a_idx = np.arange(active.size)[:, None, None]
        lst[a_idx, rows_l, ids] = pos
        last[active] = lst
    cum = np.cumsum(hist, axis=1)[:, :E]  # cum[:, c-1] = accesses with distance < c
    total = hist.sum(axis=1, keepdims=True)
    return cum / np.maximum(total, 1), int(lens.sum())


def cross_layer_affinity(trace: RoutingTrace) -> np.ndarray:
    """Per adjacent layer pair: share of tokens whose next-layer first choice is the most frequent successor of
    their first choice (see TraceStats.cross_layer_affinity)."""
    trace.require_prompt_rows("cross-layer affinity")
    L, E = trace.header.num_layers, trace.header.num_experts
    top1 = trace.experts[:, :, 0].astype(np.int64)
    out = np.zeros(max(L - 1, 0))
    n = max(trace.num_tokens, 1)
    for layer in range(L - 1):
        # the pairs that occur, with their counts (an E x E table was 32 GiB at 65,536 experts): sorted by key, so
        # by first choice; the most frequent successor of each first choice is its run's largest count
        keys, counts = np.unique(top1[:, layer] * E + top1[:, layer + 1], return_counts=True)
        if keys.size:
            starts = np.flatnonzero(np.r_[True, np.diff(keys // E) != 0])
            out[layer] = np.maximum.reduceat(counts, starts).sum() / n
    return out


def trace_stats(trace: RoutingTrace, lru_max_tokens: int = 50_000) -> TraceStats:
    trace.require_prompt_rows("routing statistics")
    h = trace.header
    L, E = h.num_layers, h.num_experts
    counts = trace.expert_counts(np.arange(trace.num_tokens))
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(shares > 0, shares * np.log2(shares), 0.0), axis=1)
    reuse, top1 = _reuse(trace)
    lru, lru_tokens = lru_hit_rates(trace, lru_max_tokens)
    return TraceStats(
        num_requests=trace.num_requests, num_tokens=trace.num_tokens, num_layers=L, num_experts=E,
        top_k=h.top_k, popularity=shares.round(6).tolist(), entropy_bits=ent.round(6).tolist(),
        max_entropy_bits=float(np.log2(E)), hottest_share=shares.max(axis=1).round(6).tolist(),
        coldest_share=shares.min(axis=1).round(6).tolist(), reuse_rate=reuse.round(6).tolist(),
        same_top1_rate=top1.round(6).tolist(), lru_hit_rate=lru.round(6).tolist(), lru_tokens=lru_tokens,
        cross_layer_affinity=cross_layer_affinity(trace).round(6).tolist(),
    )


def format_stats(stats: TraceStats) -> str:
    """A short human-readable summary (the JSON form carries every per-layer number)."""
    d = stats.to_dict()
    lines = [
        f"requests {stats.num_requests}, routed tokens {stats.num_tokens}, "
        f"{stats.num_layers} MoE layers x {stats.num_experts} experts, top-{stats.top_k}",
        f"entropy: mean {d['mean_entropy_bits']:.3f} bits (uniform {stats.max_entropy_bits:.3f})",
        f"hottest expert share: median {np.median(stats.hottest_share):.3f}, "
        f"coldest: median {np.median(stats.coldest_share):.3f} (uniform {1 / stats.num_experts:.3f})",
        f"reuse of previous token's experts: mean {d['mean_reuse_rate']:.3f}; "
        f"same first choice: mean {np.mean(stats.same_top1_rate):.3f}",
        "next layer's first choice predicted from this layer's: mean "
        f"{np.mean(stats.cross_layer_affinity) if stats.cross_layer_affinity else 0:.3f}",
        f"LRU hit rate per cache size (experts per layer, over {stats.lru_tokens} tokens):",
    ]
    hits = d["mean_lru_hit_rate"]
    shown = list(range(len(hits))) if len(hits) <= 16 else sorted({0, 1, 3, 7, 15, 31, 63, len(hits) - 1})
    lines.append("  " + "  ".join(f"{c + 1}:{hits[c]:.3f}" for c in shown if c < len(hits)))
    return "\n".join(lines)
