"""`moe-gen`: MoE-Gen (Xu et al., arXiv 2503.09716): module-based batching on one GPU.

MoE-Gen's mechanism, as its README and a summary of the paper describe it (shared/reference/systems.md s2.2): tokens
accumulate in host memory and each module runs on its own batch size, attention in GPU-sized micro-batches and every
expert once on the tokens of the whole batch, with the batch sizes chosen so GPU compute overlaps the PCIe traffic;
the KV cache lives in host memory and decode attention runs on the CPU; every expert runs on the GPU, its weights
streamed over PCIe once per large batch. In this simulator's terms that is CoX-MoE's plan family with its placement
and expert split pinned: prefill `ggg`, decode `gcg` (attention on the CPU over a host-memory KV cache), OP3
coalesced over the whole batch, no CPU experts (split `gpu`: non-resident experts are fetched, E_M), spare VRAM
holding the hottest experts (E_R). The search picks the micro-batches and E_R by the same analytic model and
re-scoring, which is MoE-Gen's own criterion (the sizes at which compute hides the copies). `attn_mode` is MoE-Gen's
ATTN_MODE: 0 as above (the paper's CPU attention); 1, its release's default, decode attention on the GPU over the
host-memory KV cache, each attention micro-batch's entries copied into one of three GPU buffers first and the new
entries written back (CoX-MoE's `kv_cache=cpu`; decode `ggg`); 2, hybrid: the first ceil(`split_ratio_w` x batch)
requests attend on the CPU over the same host cache as one batch, the rest as in 1 (CoX-MoE's `attention_split` by
requests with `kv_cache=cpu`). `coalesce=decode` is the release's prefill, its model run over MoE micro-batches (OP3
per prefill micro-batch). Not modelled: its DAG engine's exact scheduling, its streaming of attention weights, and
its re-fetch of the experts for every prefill micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sim.errors import SimInputError
from sim.policies.analytic import Candidate, SearchSpace
from sim.policies.base import PlanContext
from sim.policies.coxmoe import CoxMoeOptions, CoxMoePolicy

# MoE-Gen's design whatever the attention mode.
PINNED = {"prefill_placement": "ggg", "attention": "auto", "split": "gpu", "split_tokens": "off", "restratify": "off",
          "hot_map": ""}
# The decode side of ATTN_MODE 0 (CPU attention over the host KV cache) and of 1 and 2 (GPU attention over that
# cache streamed to the GPU; 2 also puts a share of the requests on the CPU, `attention_split`, by requests).
CPU_ATTENTION = {"decode_placement": "gcg", "kv_cache": "gpu"}
GPU_ATTENTION = {"decode_placement": "ggg", "kv_cache": "cpu"}


# The CPU shares the search tries at attn_mode 2 when split_ratio_w is left to it.
SPLIT_SHARES = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class MoEGenOptions(CoxMoeOptions):
    """CoX-MoE's knobs with MoE-Gen's design pinned (prefill ggg, every expert on the GPU, coalesced): attn_mode
    (MoE-Gen's ATTN_MODE: -1 = the search picks; 0 = decode attention on the CPU, decode gcg; 1 = on the GPU over the
    KV cache streamed from host memory, decode ggg; 2 = hybrid, the first ceil(split_ratio_w x batch) requests on
    the CPU as one batch and the rest as in 1), split_ratio_w (MoE-Gen's SPLIT_RATIO_W, the CPU's share at
    attn_mode 2; -1 = the search tries 0.25, 0.5 and 0.75), coalesce (on: every expert once per step over the whole
    batch in both phases, as the paper describes; decode: so in decode, while prefill runs OP3 per micro-batch, as
    the release runs its prefill model over MoE micro-batches), prefill_micro_batch / decode_micro_batch
    (attention's batch; -1 = search), resident_experts (-1 = as many as spare VRAM holds), expert_kernels (default
    per_expert: the release runs Hugging Face's loop over experts), rescore."""

    policy_name = "moe-gen"
    rescore: int = 3  # per attention mode (five of them: 15 simulations)
    prefill_placement: str = "ggg"
    decode_placement: str = "gcg"
    split: str = "gpu"
    attn_mode: int = -1
    split_ratio_w: float = -1.0
    # Hugging Face's loop over experts, each wrapped with a stream sync (EfficientMoE/MoE-Gen
    # moe_gen/models/Wrapper.py @2561b09)
    expert_kernels: str = "per_expert"

    def __post_init__(self) -> None:
        if self.attn_mode not in (-1, 0, 1, 2):
            raise SimInputError(f"policy moe-gen: attn_mode must be -1 (search), 0 (CPU attention), 1 (GPU attention "
                                f"over a streamed KV cache) or 2 (hybrid), got {self.attn_mode}")
        w = float(self.split_ratio_w)
        if w != -1.0 and not 0.0 < w < 1.0:
            raise SimInputError(f"policy moe-gen: split_ratio_w (the CPU's share of decode attention at attn_mode 2) "
                                f"must be in (0, 1), or -1 to search it, got {self.split_ratio_w}")
        if self.attention_split not in (0.0, w):
            raise SimInputError(f"policy moe-gen: the CPU's share of decode attention is split_ratio_w (at attn_mode "
                                f"2), got attention_split={self.attention_split} (set split_ratio_w only)")
        side = GPU_ATTENTION if self.gpu_side else CPU_ATTENTION
        for name, value in side.items():  # the mode's decode side where the knob was left at its default
            if getattr(self, name) == CPU_ATTENTION[name]:
                object.__setattr__(self, name, value)
        if self.attn_mode == 2 and w != -1.0:  # the first ceil(w B) requests attend on the CPU as one batch
            object.__setattr__(self, "attention_split", w)
            object.__setattr__(self, "attention_split_unit", "requests")
        super().__post_init__()
        if self.coalesce not in ("on", "decode"):
            raise SimInputError(f"policy moe-gen: coalesce must be on or decode (MoE-Gen runs each expert over the "
                                f"whole decode batch), got {self.coalesce!r}")
        for name, value in {**PINNED, **side}.items():
            if getattr(self, name) != value:
                raise SimInputError(f"policy moe-gen: {name} is fixed to {value!r} by MoE-Gen's design, got "
                                    f"{getattr(self, name)!r} at attn_mode={self.attn_mode} (use coxmoe to vary it)")

    @property
    def gpu_side(self) -> bool:
        """Whether decode attention runs on the GPU over the streamed cache: modes 1 and 2, or a search whose knobs
        already say so (decode ggg, kv_cache cpu or a split by requests narrow it to those modes)."""
        if self.attn_mode >= 0:
            return self.attn_mode > 0
        return (self.decode_placement == "ggg" or self.kv_cache == "cpu"
                or self.attention_split_unit == "requests" or self.attention_split > 0.0)

    @property
    def searched(self) -> bool:
        return self.attn_mode == -1 or self.attn_mode == 2 and self.split_ratio_w == -1.0 or super().searched

    def modes(self) -> list[MoEGenOptions]:
        """The attention modes (and CPU shares) these knobs leave open, each as a full option set."""
        w = float(self.split_ratio_w)
        hybrid = [(2, x) for x in (SPLIT_SHARES if w == -1.0 else (w,))]
        if self.attn_mode == -1:
            pairs = [*([] if self.gpu_side else [(0, -1.0)]), (1, -1.0), *hybrid]
        else:
            pairs = hybrid if self.attn_mode == 2 else [(self.attn_mode, w)]
        return [replace(self, attn_mode=m, split_ratio_w=x, attention_split=0.0) for m, x in pairs]


def _mode(opts: MoEGenOptions) -> tuple[int, float]:
    return opts.attn_mode, float(opts.split_ratio_w)


@dataclass
class _ModeSearch(SearchSpace):
    """Several modes' searches as one: the re-scoring takes each mode's own order in turn, rank by rank (every
    mode's first, then every mode's second, ...), so each mode is re-scored as deeply as its own search would be
    and the pick is never worse than the best single mode's."""

    orders: list[list[Candidate]] = field(default_factory=list)

    def rescore_order(self) -> list[Candidate]:
        depth = max((len(order) for order in self.orders), default=0)
        return [order[rank] for rank in range(depth) for order in self.orders if rank < len(order)]


class MoEGenPolicy(CoxMoePolicy):
    name = "moe-gen"
    label = "MoE-Gen"
    color = "#6c3483"
    summary = ("MoE-Gen: module-based batching; attention on the CPU, on the GPU over a streamed host KV cache, or "
               "split (its ATTN_MODE, searched), every expert on the GPU once per whole batch, weights streamed")
    Options = MoEGenOptions
    example_options = ({}, {"decode_micro_batch": "4", "prefill_micro_batch": "3", "resident_experts": "1"},
                       {"attn_mode": "2", "split_ratio_w": "0.5", "coalesce": "decode", "decode_micro_batch": "2"})

    def search_space(self, ctx: PlanContext) -> SearchSpace:
        """CoX-MoE's search within each attention mode the knobs leave open, merged: the re-scoring simulates the
        `rescore` best of every mode (each mode's own order, distinct decode configurations first), rank by rank;
        the analytic model sums a hybrid step's CPU and GPU attention, so it cannot rank the modes alone."""
        o: MoEGenOptions = self.options
        if o.attn_mode == 2 and ctx.workload.batch < 2:
            raise SimInputError(f"policy moe-gen: attn_mode 2 (hybrid) puts ceil(split_ratio_w x batch) requests on "
                                f"the CPU and the rest on the GPU: batch {ctx.workload.batch} has no request to split")
        variants = o.modes()
        if len(variants) == 1 and variants[0] == o:
            return super().search_space(ctx)
        spaces, refused = {}, []
        for v in variants:  # a mode the workload cannot take (a split of a single request) leaves the others
            try:
                spaces[_mode(v)] = CoxMoePolicy.search_space(type(self)(v), ctx)
            except SimInputError as exc:
                refused.append(exc)
        if not spaces:
            raise refused[0]
        candidates = [c for space in spaces.values() for c in space.candidates]
        first = next(iter(spaces.values()))
        return _ModeSearch(candidates, lambda c, opts: spaces[_mode(opts)].build(c, opts), searched=True,
                           rescore=o.rescore * len(variants), explain_empty=first.explain_empty,
                           orders=[space.rescore_order() for space in spaces.values()])
