"""`moe-gen`: MoE-Gen (Xu et al., arXiv 2503.09716): module-based batching on one GPU.

MoE-Gen's mechanism, as its README and a summary of the paper describe it (shared/reference/systems.md s2.2):
tokens accumulate in host memory and each module runs on its own batch size, attention in GPU-sized
micro-batches and every expert once on the tokens of the whole batch, with the batch sizes chosen so GPU compute
overlaps the PCIe traffic; the KV cache lives in host memory and decode attention runs on the CPU; every expert
runs on the GPU, its weights streamed over PCIe once per large batch. In this simulator's terms that is CoX-MoE's
plan family with its placement and expert split pinned: prefill `ggg`, decode `gcg` (attention on the CPU over a
host-memory KV cache), OP3 coalesced over the whole batch, no CPU experts (split `gpu`: non-resident experts are
fetched, E_M), spare VRAM holding the hottest experts (E_R). The search picks the micro-batches and E_R by the
same analytic model and re-scoring, which is MoE-Gen's own criterion (the sizes at which compute hides the
copies). Not modelled: MoE-Gen's partial CPU offload of attention (a fraction of the requests on the CPU, the
rest on the GPU over a streamed KV cache; its appendix puts the break-even near 60% on the CPU) and its DAG
engine's exact scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.errors import SimInputError
from sim.policies.coxmoe import CoxMoeOptions, CoxMoePolicy

PINNED = {"prefill_placement": "ggg", "decode_placement": "gcg", "attention": "auto", "split": "gpu",
          "coalesce": "on", "split_tokens": "off", "restratify": "off", "hot_map": ""}


@dataclass(frozen=True)
class MoEGenOptions(CoxMoeOptions):
    """CoX-MoE's knobs with MoE-Gen's design pinned (prefill ggg, decode gcg, every expert on the GPU, coalesced):
    prefill_micro_batch / decode_micro_batch (attention's batch; -1 = search), resident_experts (-1 = as many as
    spare VRAM holds), rescore."""

    policy_name = "moe-gen"
    prefill_placement: str = "ggg"
    decode_placement: str = "gcg"
    split: str = "gpu"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value in PINNED.items():
            if getattr(self, name) != value:
                raise SimInputError(f"policy moe-gen: {name} is fixed to {value!r} by MoE-Gen's design, got "
                                    f"{getattr(self, name)!r} (use coxmoe to vary it)")


class MoEGenPolicy(CoxMoePolicy):
    name = "moe-gen"
    label = "MoE-Gen"
    color = "#6c3483"
    summary = ("MoE-Gen: module-based batching; attention in micro-batches on the CPU's KV cache, every expert on "
               "the GPU once per whole batch, weights streamed")
    Options = MoEGenOptions
    example_options = ({}, {"decode_micro_batch": "4", "prefill_micro_batch": "3", "resident_experts": "1"})
