"""A policy's side of the search: its analytic model (roofline seconds of ops and copies, expected tokens per
expert) and the `SearchSpace` it hands `sim/search.py`, which ranks, simulates and picks."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sim.cost import RooflineCostModel, Work
from sim.errors import SimInputError
from sim.plan import OpKind, Payload, Plan, Stream
from sim.policies.base import PlanContext
from sim.specs import ModelSpec


@dataclass
class Candidate:
    """A fully specified option set and the analytic model's estimate of its total time."""

    options: Any
    analytic_s: float
    detail: dict[str, Any] = field(default_factory=dict)


class Analytic:
    """Seconds of ops and copies on this system, from the same roofline as the simulator's default costs."""

    def __init__(self, ctx: PlanContext, expert_kernels: str = "per_expert"):
        self.cm = RooflineCostModel(ctx.system)
        self.cm.use_model(ctx.model)
        self.cm.use_expert_kernels(expert_kernels)  # the policy's runtime (Policy.expert_kernels)

    def t(self, kind: OpKind, stream: Stream, work: Work) -> float:
        return self.cm.seconds(kind, stream, work.flops, work.bytes, gemm_flops=work.gemm_flops)

    def copy(self, stream: Stream, nbytes: int, payload: Payload = Payload.NONE) -> float:
        return self.cm.seconds(OpKind.COPY, stream, 0, nbytes, payload) if nbytes else 0.0

    def expert_times(self, stream: Stream, model: ModelSpec, tokens: np.ndarray) -> np.ndarray:
        """Roofline seconds of one expert per element of `tokens` (rounded; 0 where no token is routed)."""
        t = np.rint(np.asarray(tokens, dtype=np.float64))
        bpp = model.bytes_per_param
        flops = 2.0 * t * model.expert_params
        nbytes = model.expert_bytes + t * 2 * model.hidden_size * bpp
        compute, memory, fixed = self.cm.roofs(OpKind.EXPERT, stream, 1, 1)
        # roofs() is linear in flops and bytes apart from the fixed overhead
        c, m = flops * compute, nbytes * memory
        out = np.maximum(c, m) + (1.0 - self.cm.overlap(OpKind.EXPERT, stream)) * np.minimum(c, m) + fixed
        return np.where(t >= 1, out, 0.0)


def expected_counts(ctx: PlanContext) -> tuple[np.ndarray, np.ndarray]:
    """Tokens per expert per MoE layer: over the whole prefill, and per decode step on average."""
    tr, wl = ctx.trace, ctx.workload
    if wl.batch == tr.num_requests:
        prefill, decode = (c.astype(np.float64) for c in tr.phase_counts)
    else:
        requests = np.arange(wl.batch)
        prefill = tr.prefill_counts(requests).astype(np.float64)
        rows = [tr.decode_rows(t, requests) for t in range(1, wl.max_gen_len)]
        decode = tr.expert_counts(np.concatenate(rows) if rows else np.zeros(0, np.int64)).astype(np.float64)
    return prefill, decode / max(wl.max_gen_len - 1, 1)


@dataclass
class SearchSpace:
    """What a searching policy hands the search (`sim/search.py`): its candidates, each a full option set with
    its analytic estimate; how to build one as a plan; whether any knob was left to the search (if not, the one
    candidate is built as given); how many of the best-ranked to re-score by simulation; when no candidate
    fits, a check that raises an error naming the overflowing memory; and optionally each candidate's `family`:
    candidates of one family differ only in knobs the analytic model ranks as the simulation does, so the
    re-scoring simulates the best of each family first instead of near-copies of the winner."""

    candidates: list[Candidate]
    build: Callable[[PlanContext, Any], Plan]
    searched: bool
    rescore: int
    explain_empty: Callable[[], None] | None = None
    family: Callable[[Any], Hashable] | None = None
    anchor: Candidate | None = None  # re-scored whatever its rank (a policy's safe choice the others must beat)
    # re-scored candidates within this share of the fastest count as tied, and the smallest plan (fewest ops) of
    # them wins; 0: the fastest, always
    tie_share: float = 0.0
    # a candidate's plan size (e.g. its micro-batches); with it, a family's leader is the smallest of the family's
    # candidates whose estimate is within `tie_share` of the family's best (the analytic model's own ties)
    size: Callable[[Any], float] | None = None

    def rescore_order(self) -> list[Candidate]:
        """Candidates in the order the re-scoring tries them: by analytic estimate, the best of each family
        first (when families are given; with `size`, the smallest within `tie_share` of the family's best), then
        the others; the anchor, if not among the first `rescore`, takes the last of those places."""
        ranked = sorted(self.candidates, key=lambda c: c.analytic_s)
        if self.family is not None:
            families: dict[Hashable, list[Candidate]] = {}
            for cand in ranked:
                families.setdefault(self.family(cand.options), []).append(cand)
            leaders = [self._leader(members) for members in families.values()]
            leaders.sort(key=lambda c: families[self.family(c.options)][0].analytic_s)  # by the family's best
            chosen = {id(c) for c in leaders}
            ranked = leaders + [c for c in ranked if id(c) not in chosen]
        if self.anchor is not None and self.anchor in ranked:
            slot = max(self.rescore, 1) - 1
            if ranked.index(self.anchor) > slot:
                ranked.remove(self.anchor)
                ranked.insert(slot, self.anchor)
        return ranked


    def _leader(self, members: list[Candidate]) -> Candidate:
        """A family's re-scored candidate: its best estimate, or with `size` the smallest plan among those the
        estimate cannot tell from the best (within `tie_share`)."""
        if self.size is None or self.tie_share <= 0:
            return members[0]
        best = members[0].analytic_s
        tied = [c for c in members if c.analytic_s <= best * (1 + self.tie_share)]
        return min(tied, key=lambda c: (self.size(c.options), c.analytic_s))


def options_dict(options: Any) -> dict[str, Any]:
    return asdict(options)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise SimInputError(message)
