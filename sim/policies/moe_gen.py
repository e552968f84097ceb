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

from dataclasses import dataclass

from sim.errors import SimInputError
from sim.policies.coxmoe import CoxMoeOptions, CoxMoePolicy

PINNED = {"prefill_placement": "ggg", "decode_placement": "gcg", "attention": "auto", "split": "gpu",
          "split_tokens": "off", "restratify": "off", "hot_map": "", "kv_cache": "gpu",
          "attention_split": 0.0, "attention_split_unit": "micro_batch"}
# What ATTN_MODE 1 (GPU attention over a streamed host KV cache) and 2 (hybrid: a share of the requests attends on
# the CPU, the rest on the GPU over the streamed cache) change in the pinned design.
GPU_ATTENTION = {"decode_placement": "ggg", "kv_cache": "cpu"}


@dataclass(frozen=True)
class MoEGenOptions(CoxMoeOptions):
    """CoX-MoE's knobs with MoE-Gen's design pinned (prefill ggg, every expert on the GPU, coalesced):
    attn_mode (MoE-Gen's ATTN_MODE: 0 = decode attention on the CPU, decode gcg; 1 = on the GPU over the KV cache
    streamed from host memory, decode ggg; 2 = hybrid, the first ceil(split_ratio_w x batch) requests on the CPU as
    one batch and the rest as in 1), split_ratio_w (MoE-Gen's SPLIT_RATIO_W; 0.5 here, the value the release's
    fallback names), coalesce (on: every
    expert once per step over the whole batch in both phases, as the paper describes; decode: so in decode, while
    prefill runs OP3 per micro-batch, as the release runs its prefill model over MoE micro-batches),
    prefill_micro_batch / decode_micro_batch (attention's batch; -1 =
    search), resident_experts (-1 = as many as spare VRAM holds), rescore."""

    policy_name = "moe-gen"
    prefill_placement: str = "ggg"
    decode_placement: str = "gcg"
    split: str = "gpu"
    attn_mode: int = 0
    split_ratio_w: float = 0.5

    def __post_init__(self) -> None:
        if self.attn_mode not in (0, 1, 2):
            raise SimInputError(f"policy moe-gen: attn_mode must be 0 (CPU attention), 1 (GPU attention over a "
                                f"streamed KV cache) or 2 (hybrid), got {self.attn_mode}")
        if not 0.0 < float(self.split_ratio_w) < 1.0:
            raise SimInputError(f"policy moe-gen: split_ratio_w (the CPU's share of decode attention at attn_mode 2) "
                                f"must be in (0, 1), got {self.split_ratio_w}")
        pinned = dict(PINNED)
        if self.attn_mode:
            mode = dict(GPU_ATTENTION)
            if self.attn_mode == 2:  # the first ceil(w B) requests attend on the CPU as one batch
                if self.attention_split not in (PINNED["attention_split"], float(self.split_ratio_w)):
                    raise SimInputError(f"policy moe-gen: at attn_mode 2 the CPU's share of decode attention is "
                                        f"split_ratio_w ({self.split_ratio_w}); got attention_split="
                                        f"{self.attention_split} as well (set split_ratio_w only)")
                mode.update(attention_split=float(self.split_ratio_w), attention_split_unit="requests")
            pinned.update(mode)
            for name, value in mode.items():  # the mode's design where the knob was left at its default
                if getattr(self, name) == PINNED[name]:
                    object.__setattr__(self, name, value)
        super().__post_init__()
        if self.coalesce not in ("on", "decode"):
            raise SimInputError(f"policy moe-gen: coalesce must be on or decode (MoE-Gen runs each expert over the "
                                f"whole decode batch), got {self.coalesce!r}")
        for name, value in pinned.items():
            if getattr(self, name) != value:
                raise SimInputError(f"policy moe-gen: {name} is fixed to {value!r} by MoE-Gen's design, got "
                                    f"{getattr(self, name)!r} at attn_mode={self.attn_mode} (use coxmoe to vary it)")


class MoEGenPolicy(CoxMoePolicy):
    name = "moe-gen"
    label = "MoE-Gen"
    color = "#6c3483"
    summary = ("MoE-Gen: module-based batching; attention in micro-batches on the CPU's KV cache, every expert on "
               "the GPU once per whole batch, weights streamed")
    Options = MoEGenOptions
    example_options = ({}, {"decode_micro_batch": "4", "prefill_micro_batch": "3", "resident_experts": "1"})
