"""`ndp-experts`: routed experts computed where their weights live, on a near-memory DIMM tier.

Needs a system with an `ndp` tier (e.g. `a100-80g-8452y-ndp8`). Non-expert weights and the KV cache stay in
VRAM and attention, the router and any shared expert run on the GPU (as Hermes-base does for the layers whose
weights are on the GPU). Every routed expert's weights live on the NDP DIMMs (part of host DRAM). Prefill's
compute-heavy experts run on the GPU by default, each layer's experts streamed over PCIe into a double buffer
once and run by every prefill micro-batch, layer by layer (Hermes runs prompting on the GPU); in decode the
weights never cross PCIe: per layer and micro-batch, after the router, the hidden states of the routed tokens
go down (GPU -> host memory, where the DIMMs read them), the tier runs each expert with tokens (at the DIMMs'
rank-parallel bandwidth, not the host channels', and their compute: on Hermes' DIMMs, 4.1 TFLOP/s against 655
GB/s, a bf16 expert is compute-bound above about 6 tokens), and the results come back up before the next layer.
Copy sizes count routed assignments. This is the cold tier of TriMoE's hot/warm/cold split with no hot or warm
experts; it exists to exercise the NDP unit of the topology (`sim/topology.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.errors import SimInputError
from sim.plan import Payload, Phase, Plan
from sim.policies.base import MicroBatchOptions, PlanContext, Policy, require_fits
from sim.policies.layers import (
    D2H,
    GPU,
    H2D,
    NDP,
    At,
    Deps,
    LayerEmitter,
    activation_workspace_bytes,
    all_slices,
    group_requests,
    prefill_slices,
)


@dataclass(frozen=True)
class NdpExpertsOptions(MicroBatchOptions):
    """prefill: gpu | ndp (where prefill's experts run: on the GPU with each layer's experts streamed over PCIe
    into a double buffer, as Hermes runs prompting on the GPU, or on the DIMMs); prefill_tokens: prompt tokens per
    prefill micro-batch; decode_micro_batch: requests per decode micro-batch (0 = the whole batch)."""

    policy_name = "ndp-experts"
    prefill: str = "gpu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefill not in ("gpu", "ndp"):
            raise SimInputError(f"policy ndp-experts: prefill must be gpu or ndp, got {self.prefill!r}")


class NdpExpertsPolicy(Policy):
    name = "ndp-experts"
    label = "NDP-DIMM experts"
    color = "#1abc9c"
    summary = "near-memory DIMMs: routed experts computed on the DIMMs that hold them, the rest on the GPU"
    Options = NdpExpertsOptions
    # GPU prefill experts in a fused MoE call (assumed, as stream-experts)
    expert_kernels = "fused"
    example_options = ({}, {"decode_micro_batch": "4", "prefill_tokens": "16"}, {"prefill": "ndp"})
    example_system = "a100-80g-8452y-ndp8"
    compared = False  # needs a system with an NDP tier

    def build(self, ctx: PlanContext) -> Plan:
        o: NdpExpertsOptions = self.options
        m, wl, system = ctx.model, ctx.workload, ctx.system
        if system.ndp is None:
            raise SimInputError(f"policy {self.name}: system {system.name} has no NDP tier; give a system with "
                                f"`ndp` (e.g. {self.example_system})")
        prefill_groups, decode_groups, max_tokens = group_requests(ctx, o.prefill_tokens, o.decode_micro_batch)
        expert_weights = m.routed_expert_bytes
        # routed tokens' hidden states down and results up: sized by decode micro-batches unless prefill runs on
        # the DIMMs too
        ndp_tokens = max_tokens if o.prefill == "ndp" else max(g.size for g in decode_groups)
        states = ndp_tokens * m.top_k * m.hidden_size * m.bytes_per_param
        require_fits("NDP", system.ndp.name, self.name, {"expert_weights": expert_weights, "ndp_buffers": 2 * states},
                     system.ndp.capacity_bytes)
        layer_experts = m.num_experts * m.expert_bytes
        static = {
            "gpu": {"weights": m.non_expert_bytes,
                    "kv_cache": wl.kv_tokens_total * m.kv_bytes_per_token,
                    "workspace": activation_workspace_bytes(ctx, max_tokens), "returned_states": states,
                    "expert_buffers": 2 * layer_experts if o.prefill == "gpu" else 0,
                    # layer-major prefill holds every prompt token's residual stream between layers
                    "hidden_states": wl.prompt_tokens * m.hidden_size * m.bytes_per_param
                    if o.prefill == "gpu" and len(prefill_groups) > 1 else 0},
            "cpu": {"expert_weights": expert_weights, "ndp_buffers": 2 * states},
        }
        require_fits("GPU", system.gpu.name, self.name, static["gpu"], system.gpu_usable_bytes)
        require_fits("DRAM", system.name, self.name, static["cpu"], system.dram_usable_bytes)
        b = ctx.builder()
        em = LayerEmitter(ctx, b)
        token_bytes = m.hidden_size * m.bytes_per_param
        fetches: list[int] = []  # per MoE layer, in order: its experts' fetch into one of the two buffers
        users: list[list[int]] = []  # per fetch, the expert ops that read its buffer

        def fetch_layer(layer: int) -> None:
            """Prefill on the GPU: the layer's experts cross PCIe once, into the buffer the layer before last used,
            and every prefill micro-batch runs on them."""
            if not m.is_moe_layer(layer):
                return
            free = tuple(users[-2]) if len(users) >= 2 else ()
            fetches.append(em.xfer(H2D, At(Phase.PREFILL, 0, layer, -1), layer_experts, Payload.EXPERT_WEIGHTS,
                                   free))
            users.append([fetches[-1]])

        def routed(s, at: At, counts, router: int, shared: int) -> Deps:
            experts = [int(e) for e in counts.nonzero()[0]]
            if o.prefill == "gpu" and s.phase is Phase.PREFILL:
                ran = em.experts(GPU, at, counts, experts, (router, fetches[-1]))
                users[-1].append(ran)
                return ran, shared
            tokens = int(counts.sum())
            down = em.xfer(D2H, at, tokens * token_bytes, Payload.ACTIVATIONS, (router,), tokens)
            ran = em.experts(NDP, at, counts, experts, (down,))
            return em.xfer(H2D, at, tokens * token_bytes, Payload.ACTIVATIONS, (ran,), tokens), shared

        if o.prefill == "gpu":
            em.layer_by_layer(prefill_slices(ctx, prefill_groups), routed, fetch_layer)
            em.through_layers(all_slices(ctx, [], decode_groups), routed)
        else:
            em.through_layers(all_slices(ctx, prefill_groups, decode_groups), routed)
        return Plan(self.name, self.knobs(), m, system, wl, b.result(), static,
                    {"prefill": prefill_groups, "decode": decode_groups}, decode_scale=ctx.decode_scale,
                    expert_kernels=self.expert_kernels)
