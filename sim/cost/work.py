"""FLOPs and bytes of each op kind, derived from the model spec (the inputs of every cost model)."""

from __future__ import annotations

import functools
from typing import NamedTuple

from sim.specs import ModelSpec


class Work(NamedTuple):
    """FLOPs an op performs and bytes it moves through memory (or across a link, for copies); `gemm_flops`, the
    part of `flops` that runs as dense GEMMs inside an op that is not one (MLA's absorption or decompression
    inside attention: priced at the unit's GEMM rate, the rest of attention at its vector rate)."""

    flops: int
    bytes: int
    gemm_flops: int = 0


def absorb_flops(model: ModelSpec, q_tokens: int, kv_read: int, prefill: bool) -> int:
    """FLOPs of MLA's up-projection inside an attention op (0 for GQA): per query token in decode (absorbed),
    per key read in prefill (decompressed). The cost model derives it from an op the same way (its tokens and
    kv_tokens), so one definition serves plans and analytic estimates."""
    up = model.attention_up_params
    return 2 * up * (kv_read if prefill else q_tokens) if up else 0


class OpWork:
    """Work of the ops of one model; `bytes` counts weights read plus activations in and out. Each op kind's
    work is memoised per argument (a plan asks for the same micro-batch sizes at every layer and step)."""

    _MEMOISED = ("embed", "qkv", "attention", "o_proj", "router", "expert", "shared_expert", "dense_ffn", "lm_head")

    def __init__(self, model: ModelSpec):
        self.m = model
        self.bpp = model.bytes_per_param
        for name in self._MEMOISED:  # instance attributes shadow the methods: one cache per kind (C-level look-up)
            setattr(self, name, functools.cache(getattr(self, name)))

    def _gemm(self, params: int, tokens: int, width_in: int, width_out: int) -> Work:
        """Weights as stored (`ModelSpec.weight_param_bytes`), activations in the model's dtype."""
        acts = tokens * (width_in + width_out) * self.bpp
        return Work(2 * tokens * params, self.m.weight_param_bytes(params) + acts)

    def embed(self, tokens: int) -> Work:
        """A row of the token table read and the hidden state written per token, plus a row of the learned position
        table read where the model has one (OPT)."""
        tables = 2 if self.m.learned_position_embeddings else 1
        return Work(0, self.m.weight_param_bytes(tables * tokens * self.m.hidden_size)
                    + tokens * self.m.hidden_size * self.bpp)

    def qkv(self, tokens: int) -> Work:
        """OP0's projections; MLA's up-projection of the latent is attention's (`ModelSpec.attention_up_params`)."""
        m = self.m
        return self._gemm(m.qkv_params - m.attention_up_params, tokens, m.hidden_size, m.qkv_out_width)

    def attention(self, q_tokens: int, kv_attended: int, kv_read: int, prefill: bool = False) -> Work:
        """`kv_attended`: keys summed over queries (FLOPs); `kv_read`: cache entries streamed from memory;
        `prefill`: a prompt's attention (MLA's form differs by phase: `ModelSpec.attention_flops`). MLA's
        up-projection runs here as GEMMs over its weights: absorbed into each query in decode, decompressing each
        of the `kv_read` keys in prefill (`absorb_flops`)."""
        m = self.m
        act = q_tokens * (m.qkv_out_width + m.attn_out_width) * self.bpp
        nbytes = kv_read * m.kv_bytes_per_token_layer + act
        gemm = absorb_flops(m, q_tokens, kv_read, prefill)
        if gemm:
            nbytes += m.weight_param_bytes(m.attention_up_params)
        return Work(m.attention_flops(q_tokens, kv_attended, prefill) + gemm, nbytes, gemm)

    def o_proj(self, tokens: int) -> Work:
        return self._gemm(self.m.o_proj_params, tokens, self.m.attn_out_width, self.m.hidden_size)

    def router(self, tokens: int) -> Work:
        if not self.m.has_router:  # a dense (one-expert) model: the op stays as a placeholder with no work
            return Work(0, 0)
        return self._gemm(self.m.router_params, tokens, self.m.hidden_size, self.m.num_experts)

    def expert(self, tokens: int) -> Work:
        m = self.m  # the weights at the experts' precision; activations in the model's dtype
        return Work(2 * tokens * m.expert_params, m.expert_bytes + tokens * 2 * m.hidden_size * self.bpp)

    def shared_expert(self, tokens: int) -> Work:
        return self._gemm(self.m.shared_expert_params, tokens, self.m.hidden_size, self.m.hidden_size)

    def dense_ffn(self, tokens: int) -> Work:
        return self._gemm(self.m.dense_ffn_params, tokens, self.m.hidden_size, self.m.hidden_size)

    def lm_head(self, tokens: int) -> Work:
        return self._gemm(self.m.output_projection_params, tokens, self.m.hidden_size, self.m.vocab_size)

    # ---- transfer sizes -------------------------------------------------------------------------------------
    def hidden_bytes(self, tokens: int) -> int:
        return tokens * self.m.hidden_size * self.bpp

    def qkv_out_bytes(self, tokens: int) -> int:
        return tokens * self.m.qkv_out_width * self.bpp

    def attn_out_bytes(self, tokens: int) -> int:
        return tokens * self.m.attn_out_width * self.bpp

    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.m.kv_bytes_per_token_layer
