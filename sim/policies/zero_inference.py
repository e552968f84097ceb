"""`zero-inference`: DeepSpeed ZeRO-Inference (ZeRO-3 parameter offload), as MoE-Lightning benchmarked it.

Every parameter lives in pinned host memory and is gathered onto the GPU when its module runs, then released:
MoE-Lightning's script (`benchmark/hf_ds/hf_moe.py` in its FlexGen fork: ZeRO stage 3, `offload_param` to the
CPU with `pin_memory`, `stage3_param_persistence_threshold` 0, `stage3_prefetch_bucket_size` hidden_size^2
elements) keeps nothing resident, and its prefetch bucket (32 MiB for Mixtral) is a small part of a layer
(2.7 GiB), so a layer's weights cross PCIe after the previous layer's work and before its own: copies and
compute do not overlap. Hugging Face `generate` runs the whole batch at once (no micro-batches), attention on
the GPU over a KV cache in VRAM, prompts padded as the workload gives them. Every expert's weights are gathered
at every layer visit, whatever the routing: Fiddler's logs of the same setup (ZeRO-3 offload of Mixtral-8x7B,
batch 1-16) take the same time per generated token at batch 1 as at 16 (3.9 s on an RTX 6000 Ada, 93 GB of
weights at PCIe 4.0 rates), where gathering only the routed experts would take a quarter of it at batch 1.

Per step and layer: gather the attention, norm and router weights, run QKV, attention, O projection and the
router; gather the layer's experts, run those with tokens (the shared expert or dense FFN with the layer). The
embedding and the LM head are gathered at every step too. No knob: the published runs fix only the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.plan import OpKind, Payload, Plan
from sim.policies.base import OptionsBase, PlanContext, Policy, require_fits
from sim.policies.layers import GPU, H2D, At, BatchSlice, LayerEmitter, activation_workspace_bytes, all_slices


@dataclass(frozen=True)
class ZeroInferenceOptions(OptionsBase):
    """No knobs: the batch runs as one, every weight streamed from pinned host memory as its module runs."""

    policy_name = "zero-inference"


class ZeroInferencePolicy(Policy):
    name = "zero-inference"
    label = "ZeRO-Inference"
    color = "#b7950b"
    compared = False  # a published baseline for validation; the paper grid does not run it
    summary = "DeepSpeed ZeRO-3 parameter offload: every weight gathered over PCIe as its module runs"
    Options = ZeroInferenceOptions
    # Hugging Face's MixtralSparseMoeBlock loop over experts
    expert_kernels = "per_expert"

    def build(self, ctx: PlanContext) -> Plan:
        m, wl, sysm = ctx.model, ctx.workload, ctx.system
        requests = np.arange(wl.batch)
        widest_layer = max((m.layer_bytes(layer) for layer in range(m.num_layers)), default=0)
        gpu = {"layer_weights": widest_layer + m.weight_param_bytes(max(m.embedding_params, m.lm_head_params)),
               "kv_cache": wl.kv_tokens_total * m.kv_bytes_per_token,
               "workspace": activation_workspace_bytes(ctx, max(wl.prompt_tokens, 1))}
        cpu = {"weights": m.weight_bytes}
        require_fits("GPU", sysm.gpu.name, self.name, gpu, sysm.gpu_usable_bytes)
        require_fits("DRAM", sysm.name, self.name, cpu, sysm.dram_usable_bytes)
        emit = _Gather(ctx, ctx.builder())
        for s in all_slices(ctx, [requests], [requests]):
            emit.b.settle()  # earlier steps' ops are not read back
            emit.step(s)
        return Plan(self.name, self.knobs(), m, sysm, wl, emit.b.result(), {"gpu": gpu, "cpu": cpu},
                    {"prefill": [requests], "decode": [requests]}, decode_scale=ctx.decode_scale,
                    expert_kernels=self.expert_kernels)


class _Gather(LayerEmitter):
    """One step of the whole batch: every module's weights copied in right before it runs."""

    def gather(self, at: At, params: int, after: int, nbytes: int | None = None) -> int:
        """Copy a module's weights in: `params` as stored (`ModelSpec.weight_param_bytes`), or `nbytes` given
        (experts' precision)."""
        size = self.m.weight_param_bytes(params) if nbytes is None else nbytes
        return self.xfer(H2D, at, size, Payload.EXPERT_WEIGHTS, (after,))

    previous = -1  # the last step's LM head: the next step's first gather waits for it, as every gather waits

    def step(self, s: BatchSlice) -> None:
        m, phase, step = self.m, s.phase, s.step
        last = self.gather(At(phase, step, -1, s.mb), m.embedding_params, self.previous)
        last = self.embed(phase, step, s.mb, s.tokens, last)
        for layer in range(m.num_layers):
            at = At(phase, step, layer, s.mb)
            moe = m.is_moe_layer(layer)
            module = m.attention_params + m.norm_params_per_layer + (
                m.router_params + m.shared_expert_params if moe else m.dense_ffn_params)
            weights = self.gather(at, module, last)
            q = self.op(OpKind.QKV, GPU, at, s.tokens, (weights, last))
            a = self.attention(GPU, at, s, (q,))
            o = self.op(OpKind.O_PROJ, GPU, at, s.tokens, (a,))
            if not moe:
                last = self.op(OpKind.DENSE_FFN, GPU, at, s.tokens, (o,))
                continue
            router = done = self.op(OpKind.ROUTER, GPU, at, s.tokens, (o,))
            if m.shared_expert_intermediate_size:
                done = self.op(OpKind.SHARED_EXPERT, GPU, at, s.tokens, (router,))
            counts = s.layer_counts(self.ctx, layer)
            experts = self.gather(at, 0, done, m.num_experts * m.expert_bytes)
            ran = self.experts(GPU, at, counts, np.flatnonzero(counts).tolist(), (router, experts))
            last = ran if ran >= 0 else done
        # the final norm and the output projection (a tied head is the embedding's table, gathered again for it)
        head = self.gather(At(phase, step, m.num_layers, s.mb),
                           m.output_projection_params + m.final_norm_params, last)
        self.previous = self.lm_head(phase, step, s.mb, int(s.requests.size), (last, head))

