"""Expert-aware stratification (EAS) and the hot-expert map it produces.

EAS, as in the CoX-MoE paper: cluster the workload's requests by a per-request feature vector (a prompt
embedding, or the topic feature of a synthetic trace), sample prototypes from each cluster in proportion to its
size, probe their prefill routing, and take the most-activated experts per layer as the VRAM-resident set E_R.
The result is a `HotExpertMap` file that the `coxmoe` policy reads with `--policy-opt hot_map=PATH`.

Map file (`.npz`, loaded with `allow_pickle=False`): `header` (UTF-8 JSON bytes: format, version, model,
num_layers, num_experts, resident, method, extra), `ranking` int32 [L, E] (experts hottest first per layer) and
`load` float64 [L, E] (the probe's token counts, or the scores that gave the ranking).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import TraceError
from traces.format import RoutingTrace, concatenated_ranges, is_version, read_npz, write_npz_atomic

MAP_FORMAT = "cox-moe-hot-expert-map"
MAP_VERSION = 1


@dataclass(frozen=True, eq=False)
class HotExpertMap:
    """Experts ranked hottest first per MoE layer; the first `resident` of each row are E_R."""

    model: str
    ranking: np.ndarray
    load: np.ndarray
    resident: int
    method: str = "eas"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        r, ld = self.ranking, self.load
        if r.ndim != 2 or ld.shape != r.shape:
            raise TraceError(f"hot-expert map: ranking {r.shape} and load {ld.shape} must both be [layers, experts]")
        E = r.shape[1]
        if not np.array_equal(np.sort(r, axis=1), np.broadcast_to(np.arange(E), r.shape)):
            raise TraceError("hot-expert map: each ranking row must be a permutation of the expert ids")
        # it prices the search's E_M / E_C split (coxmoe), which divides by each layer's sum
        with np.errstate(over="ignore"):  # an overflowing sum is the error named below, not a warning
            sums_finite = bool(np.isfinite(ld.sum(axis=1)).all())
        if not np.isfinite(ld).all() or (ld < 0).any() or not sums_finite:
            raise TraceError("hot-expert map: load must be finite and non-negative, with finite sums per layer")
        if not 0 <= self.resident <= E:
            raise TraceError(f"hot-expert map: resident {self.resident} outside [0, {E}]")

    @property
    def num_layers(self) -> int:
        return int(self.ranking.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.ranking.shape[1])

    def resident_sets(self, count: int | None = None) -> np.ndarray:
        """The `count` (default: `resident`) hottest experts per layer: int [L, count]."""
        return self.ranking[:, : self.resident if count is None else count]


def ranking_from_load(load: np.ndarray) -> np.ndarray:
    """Experts hottest first per layer; ties go to the lower id so rankings are deterministic."""
    return np.argsort(-np.asarray(load, dtype=np.float64), axis=1, kind="stable").astype(np.int32)


def save_map(hot: HotExpertMap, path: str | Path) -> Path:
    """Write atomically so a failed run never leaves a half-written map."""
    path = Path(path)
    if path.suffix != ".npz":
        raise TraceError(f"hot-expert map files end in .npz, got {path.name}")
    header = {"format": MAP_FORMAT, "version": MAP_VERSION, "model": hot.model, "num_layers": hot.num_layers,
              "num_experts": hot.num_experts, "resident": hot.resident, "method": hot.method, "extra": hot.extra}
    return write_npz_atomic(path, {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                                   "ranking": hot.ranking.astype(np.int32), "load": hot.load.astype(np.float64)})


def load_map(path: str | Path) -> HotExpertMap:
    """Load and check a hot-expert map; any problem is one TraceError naming the file."""
    path = Path(path)
    arrays = read_npz(path, {"header", "ranking", "load"}, (), "hot-expert map")
    ranking, load = arrays["ranking"], arrays["load"]
    try:
        meta = json.loads(arrays["header"].astype(np.uint8).tobytes().decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise TraceError(f"{path}: cannot read hot-expert map ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != MAP_FORMAT or \
            not is_version(meta.get("version"), MAP_VERSION):
        raise TraceError(f"{path}: not a v{MAP_VERSION} cox-moe hot-expert map")
    if not np.issubdtype(ranking.dtype, np.integer):
        raise TraceError(f"{path}: ranking must be integer, got {ranking.dtype}")
    if ranking.size and (int(ranking.min()) < 0 or int(ranking.max()) > np.iinfo(np.int32).max):
        raise TraceError(f"{path}: ranking ids must be expert ids (0 to 2^31 - 1), got "
                         f"{int(ranking.min())}..{int(ranking.max())}")
    if load.dtype.kind not in "iuf":
        raise TraceError(f"{path}: load must be numeric, got {load.dtype}")
    resident, extra = meta.get("resident", 0), meta.get("extra") or {}
    if isinstance(resident, bool) or not isinstance(resident, int) or resident < 0:
        raise TraceError(f"{path}: header resident must be an integer >= 0, got {str(resident)[:40]!r}")
    if not isinstance(extra, dict):
        raise TraceError(f"{path}: header extra must be a JSON object, got {type(extra).__name__}")
    declared = (meta.get("num_layers"), meta.get("num_experts"))
    if declared != (None, None) and declared != tuple(ranking.shape[:2]) and ranking.ndim == 2:
        raise TraceError(f"{path}: header declares {declared[0]} layers x {declared[1]} experts, its arrays hold "
                         f"{ranking.shape[0]} x {ranking.shape[1]}")
    try:
        return HotExpertMap(model=str(meta.get("model", "unknown")), ranking=ranking.astype(np.int32),
                            load=load.astype(np.float64), resident=resident,
                            method=str(meta.get("method", "unknown")), extra=dict(extra))
    except TraceError as exc:
        raise TraceError(f"{path}: {str(exc).removeprefix('hot-expert map: ')}") from None


# ---- stratified probing ---------------------------------------------------------------------------------------
def cluster_requests(features: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """k-means labels of the per-request feature rows (scikit-learn); one cluster means plain random sampling."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or not np.isfinite(features).all():
        raise TraceError(f"features must be a finite [requests, dims] array, got shape {features.shape}")
    if not 1 <= clusters <= features.shape[0]:
        raise TraceError(f"clusters must be in [1, {features.shape[0]}] (the number of requests), got {clusters}")
    if clusters == 1:
        return np.zeros(features.shape[0], dtype=np.int64)
    from sklearn.cluster import KMeans  # imported here: only EAS needs it

    return KMeans(n_clusters=clusters, n_init=4, random_state=seed).fit_predict(features).astype(np.int64)


def stratified_sample(labels: np.ndarray, sample: int, rng: np.random.Generator) -> np.ndarray:
    """`sample` request ids drawn without replacement, each cluster's share proportional to its size
    (largest-remainder rounding, so shares sum exactly to `sample`). Returned sorted."""
    labels = np.asarray(labels)
    if not 1 <= sample <= labels.size:
        raise TraceError(f"probe sample must be in [1, {labels.size}] (the number of requests), got {sample}")
    ids, sizes = np.unique(labels, return_counts=True)
    exact = sizes * sample / labels.size
    share = np.floor(exact).astype(np.int64)
    short = sample - int(share.sum())
    share[np.argsort(-(exact - share), kind="stable")[:short]] += 1
    picks = [rng.choice(np.flatnonzero(labels == c), size=int(n), replace=False)
             for c, n in zip(ids, share, strict=True) if n]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


def pick_prototypes(features: np.ndarray | None, count: int, *, clusters: int, sample: int,
                    seed: int = 0) -> np.ndarray:
    """The EAS prototypes among `count` requests: k-means on `features` (None: one cluster), then a sample
    split across clusters in proportion to their sizes. Sorted request ids."""
    if features is None:
        features, clusters = np.zeros((count, 1)), 1
    features = np.asarray(features)
    if features.shape[0] != count:
        raise TraceError(f"features have {features.shape[0]} rows but there are {count} requests")
    labels = cluster_requests(features, clusters, seed)
    return stratified_sample(labels, sample, np.random.default_rng(seed))


def eas_map(trace: RoutingTrace, features: np.ndarray | None, *, clusters: int, sample: int, resident: int,
            seed: int = 0) -> HotExpertMap:
    """EAS over a trace: cluster on `features` (None: one cluster), probe the sampled requests' prefill routing,
    rank experts by the probe's per-layer counts."""
    picked = pick_prototypes(features, trace.num_requests, clusters=clusters, sample=sample, seed=seed)
    if features is None:
        clusters = 1
    load = trace.prefill_counts(picked).astype(np.float64)
    return map_from_probe(trace.header.model, load, trace.header.top_k, resident,
                          {"clusters": clusters, "sample": int(picked.size), "seed": seed})


def map_from_probe(model: str, load: np.ndarray, top_k: int, resident: int, extra: dict[str, Any]) -> HotExpertMap:
    """The EAS map of a probe's per-layer expert counts; `extra` gains the number of probed tokens."""
    extra = {**extra, "probed_tokens": int(load[0].sum()) // top_k}
    return HotExpertMap(model, ranking_from_load(load), load, resident, "eas", extra)


def random_map(trace: RoutingTrace, resident: int, seed: int = 0) -> HotExpertMap:
    """A random resident set per layer (the floor any placement must beat)."""
    rng = np.random.default_rng(seed)
    L, E = trace.header.num_layers, trace.header.num_experts
    ranking = np.stack([rng.permutation(E) for _ in range(L)]).astype(np.int32)
    return HotExpertMap(trace.header.model, ranking, np.zeros((L, E)), resident, "random", {"seed": seed})


def oracle_map(trace: RoutingTrace, resident: int) -> HotExpertMap:
    """The global-frequency oracle: ranks by the whole trace's counts (prefill and decode), unknowable offline."""
    prompt, generated = trace.phase_counts
    load = (prompt + generated).astype(np.float64)
    return HotExpertMap(trace.header.model, ranking_from_load(load), load, resident, "oracle", {})


def request_counts(trace: RoutingTrace, requests: np.ndarray) -> np.ndarray:
    """[layers, experts] selections of every routed token of `requests` (prompts and generated tokens), from either
    form of the trace (prompt rows or prompts as counts)."""
    requests = np.asarray(requests, dtype=np.int64)
    # each generated token fed back has its row
    rows = concatenated_ranges(trace.decode_offsets[requests], trace.gen_lens[requests].astype(np.int64) - 1)
    return trace.prefill_counts(requests) + trace.expert_counts(rows)


def hit_ratio(trace: RoutingTrace, hot: HotExpertMap, rows: np.ndarray | None = None,
              requests: np.ndarray | None = None) -> float:
    """Share of token-expert assignments (over `rows` of `trace.experts`, or every routed token of `requests`, by
    default of the whole trace, prompts included) whose expert is resident."""
    if (hot.num_layers, hot.num_experts) != (trace.header.num_layers, trace.header.num_experts):
        raise TraceError(f"map is for {hot.num_layers} layers x {hot.num_experts} experts, trace is "
                         f"{trace.header.num_layers} x {trace.header.num_experts}")
    if requests is not None:
        counts = request_counts(trace, requests)
    else:
        counts = sum(trace.phase_counts) if rows is None else trace.expert_counts(np.asarray(rows))
    resident = np.zeros(counts.shape, dtype=bool)
    np.put_along_axis(resident, hot.resident_sets().astype(np.int64), True, axis=1)
    total = counts.sum()
    return float(counts[resident].sum() / total) if total else 0.0
