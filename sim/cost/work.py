"""FLOPs and bytes of each op kind, derived from the model spec (the inputs of every cost model)."""

from __future__ import annotations

import functools
from typing import NamedTuple

from sim.specs import ModelSpec


class Work(NamedTuple):
    """FLOPs an op performs and bytes it moves through memory (or across a link, for copies)."""

    flops: int
    bytes: int


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
        return Work(2 * tokens * params, (params + tokens * (width_in + width_out)) * self.bpp)

    def embed(self, tokens: int) -> Work:
        return Work(0, 2 * tokens * self.m.hidden_size * self.bpp)

    def qkv(self, tokens: int) -> Work:
        return self._gemm(self.m.qkv_params, tokens, self.m.hidden_size, self.m.qkv_out_width)

    def attention(self, q_tokens: int, kv_attended: int, kv_read: int, prefill: bool = False) -> Work:
        """`kv_attended`: keys summed over queries (FLOPs); `kv_read`: cache entries streamed from memory;
        `prefill`: a prompt's attention (MLA's form differs by phase: `ModelSpec.attention_flops`)."""
        act = q_tokens * (self.m.qkv_out_width + self.m.attn_out_width) * self.bpp
        return Work(self.m.attention_flops(q_tokens, kv_attended, prefill),
                    kv_read * self.m.kv_bytes_per_token_layer + act)

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
        params = self.m.vocab_size * self.m.hidden_size  # tied or not, the head is vocab x hidden
        return self._gemm(params, tokens, self.m.hidden_size, self.m.vocab_size)

    # ---- transfer sizes -------------------------------------------------------------------------------------
    def hidden_bytes(self, tokens: int) -> int:
        return tokens * self.m.hidden_size * self.bpp

    def qkv_out_bytes(self, tokens: int) -> int:
        return tokens * self.m.qkv_out_width * self.bpp

    def attn_out_bytes(self, tokens: int) -> int:
        return tokens * self.m.attn_out_width * self.bpp

    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.m.kv_bytes_per_token_layer
