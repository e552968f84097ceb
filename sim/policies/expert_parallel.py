"""`expert-parallel`: a multi-GPU machine holds the whole model in VRAM, experts split across its GPUs.

Attention, dense layers and the KV cache live on the first GPU (`gpu`); each MoE layer's routed experts are
split into contiguous blocks, one per GPU (expert e on GPU floor(e x G / E)), as DeepSpeed-MoE and Megatron
place experts (expert parallelism). Per layer and micro-batch, after the router, the tokens routed to another
GPU's experts travel there (over the peer link when the system has one, else through host memory: D2H then
that GPU's H2D), its experts run, and the results come back before the next layer. Token counts are routed
assignments (a token sent to two experts of one GPU is counted twice: an upper bound on the bytes).

This policy exists to exercise the topology (`sim/topology.py`): a second GPU is a stream, a memory pool and a
resource group, and a peer link a pair of copy streams, with no change to the engine or the cost model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.errors import SimInputError
from sim.plan import Payload, Plan
from sim.policies.base import MicroBatchOptions, PlanContext, Policy, require_fits
from sim.policies.layers import (
    EXPERT_CHUNK_TOKENS,
    GPU,
    At,
    Deps,
    LayerEmitter,
    activation_workspace_bytes,
    all_slices,
    group_requests,
)
from sim.topology import topology_of


@dataclass(frozen=True)
class ExpertParallelOptions(MicroBatchOptions):
    """prefill_tokens: prompt tokens per prefill micro-batch; decode_micro_batch: requests per decode
    micro-batch (0 = the whole batch)."""

    policy_name = "expert-parallel"


def expert_blocks(num_experts: int, gpus: tuple[str, ...]) -> list[np.ndarray]:
    """Expert ids of each GPU: contiguous blocks, sizes differing by at most one."""
    owner = np.arange(num_experts) * len(gpus) // num_experts
    return [np.flatnonzero(owner == g) for g in range(len(gpus))]


class ExpertParallelPolicy(Policy):
    name = "expert-parallel"
    label = "Expert-parallel (multi-GPU)"
    color = "#16a085"
    summary = "multi-GPU: everything in VRAM, experts split across the GPUs, tokens sent over peer links"
    Options = ExpertParallelOptions
    # expert-parallel serving runs fused MoE calls per GPU (vLLM fused_moe)
    expert_kernels = "fused"
    example_options = ({}, {"decode_micro_batch": "3", "prefill_tokens": "20"})
    example_system = "2x-h100-sxm-nvlink-8480"
    compared = False  # needs a system with two or more GPUs

    def build(self, ctx: PlanContext) -> Plan:
        o: ExpertParallelOptions = self.options
        m, wl, system = ctx.model, ctx.workload, ctx.system
        gpus = system.gpu_names
        if len(gpus) < 2:
            raise SimInputError(f"policy {self.name}: system {system.name} has one GPU; give a system with "
                                f"extra_gpus (e.g. {self.example_system})")
        if not m.num_experts > 1:
            raise SimInputError(f"policy {self.name}: model {m.name} has no routed experts to split")
        topo = topology_of(system)
        blocks = expert_blocks(m.num_experts, gpus)
        prefill_groups, decode_groups, max_tokens = group_requests(ctx, o.prefill_tokens, o.decode_micro_batch)
        expert_bytes = m.expert_bytes * m.num_moe_layers
        # Hidden states of the routed tokens a micro-batch sends to another GPU and receives back, and on that GPU
        # its experts' intermediates, tiled like every expert GEMM (activation_workspace_bytes).
        routed_max = max_tokens * m.top_k
        states = routed_max * m.hidden_size * m.bytes_per_param
        intermediates = min(routed_max, EXPERT_CHUNK_TOKENS) * 2 * m.expert_intermediate_size * m.bytes_per_param
        peer = {f"p2p_gpu_{name}" in topo.streams for name in gpus[1:]}
        static: dict[str, dict[str, int]] = {
            "gpu": {"weights": m.non_expert_bytes
                    + blocks[0].size * expert_bytes,
                    "kv_cache": wl.kv_tokens_total * m.kv_bytes_per_token,
                    "workspace": activation_workspace_bytes(ctx, max_tokens),
                    "returned_states": states},
            # without a peer link, states are staged through pinned host buffers (out and back)
            "cpu": {} if all(peer) else {"staging": 2 * states},
        }
        for g, name in enumerate(gpus[1:], start=1):
            static[name] = {"expert_weights": blocks[g].size * expert_bytes,
                            "workspace": 2 * states + intermediates}
        gpu_models = {"gpu": system.gpu.name, **{e.name: e.gpu.name for e in system.extra_gpus}}
        for pool, parts in static.items():
            label = "DRAM" if pool == "cpu" else "GPU" if pool == "gpu" else pool.upper()
            require_fits(label, gpu_models.get(pool, system.name), self.name, parts, topo.pools[pool])
        b = ctx.builder()
        em = LayerEmitter(ctx, b)
        slices = all_slices(ctx, prefill_groups, decode_groups)
        token_bytes = m.hidden_size * m.bytes_per_param

        def routed(s, at: At, counts, router: int, shared: int) -> Deps:
            ran = em.experts(GPU, at, counts, blocks[0].tolist(), (router,))
            done = [max(ran, shared)]
            for g, name in enumerate(gpus[1:], start=1):
                tokens = int(counts[blocks[g]].sum())
                if not tokens:
                    continue
                there = self._send(em, topo, at, "gpu", name, tokens, tokens * token_bytes, router)
                ran = em.experts(name, at, counts, blocks[g].tolist(), (there,))
                done.append(self._send(em, topo, at, name, "gpu", tokens, tokens * token_bytes, ran))
            return tuple(done) if len(done) > 1 else done[0]

        em.through_layers(slices, routed)
        return Plan(self.name, self.knobs(), m, system, wl, b.result(), static,
                    {"prefill": prefill_groups, "decode": decode_groups}, decode_scale=ctx.decode_scale,
                    expert_kernels=self.expert_kernels)

    @staticmethod
    def _send(em: LayerEmitter, topo, at: At, src: str, dst: str, tokens: int, nbytes: int, dep: int) -> int:
        """Hidden states from one GPU to another: over their peer link, else staged through host memory."""
        direct = f"p2p_{src}_{dst}"
        if direct in topo.streams:
            return em.xfer(direct, at, nbytes, Payload.ACTIVATIONS, (dep,), tokens)
        down = "d2h" if src == "gpu" else f"d2h_{src}"
        up = "h2d_act" if dst == "gpu" else f"h2d_{dst}"  # the main GPU's activation queue, as every policy's
        staged = em.xfer(down, at, nbytes, Payload.ACTIVATIONS, (dep,), tokens)
        return em.xfer(up, at, nbytes, Payload.ACTIVATIONS, (staged,), tokens)
