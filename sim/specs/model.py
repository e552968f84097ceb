"""MoE model specification and the parameter, byte and FLOP counts derived from it.

A `ModelSpec` holds the architecture numbers of a Hugging Face config; every size the simulator needs (weights
per op, KV bytes per token, FLOPs of an op on t tokens) is derived here, in one place, so policies, the cost
model and the executor agree.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from sim.errors import SimInputError
from sim.specs.config import SPEC_CONFIG
from traces.limits import check_experts

AttentionKind = Literal["gqa", "mla"]
# Weights of the routed experts: the model's own dtype, INT8 with a 16-bit scale per output channel, or 4-bit with a
# 16-bit scale per group of INT4_GROUP_SIZE input weights (GPTQ / AWQ / Marlin layout). Accuracy is out of scope.
ExpertPrecision = Literal["native", "int8", "int4"]
EXPERT_PRECISIONS = ("native", "int8", "int4")
INT4_GROUP_SIZE = 128
SCALE_BYTES = 2
MIN_STORAGE_BITS, MAX_STORAGE_BITS = 1.0, 32.0  # `*_bits_per_param`: from ternary-ish formats to fp32
# Largest values a model may declare (about 100x today's largest models): beyond them a number is a typo, and
# loops over layers or arrays sized by these counts would run away.
MODEL_MAXIMA = {"num_layers": 4096, "hidden_size": 1 << 20, "vocab_size": 1 << 24, "num_attention_heads": 1 << 14,
                "num_kv_heads": 1 << 14, "head_dim": 1 << 14, "expert_intermediate_size": 1 << 22,
                "q_lora_rank": 1 << 16, "kv_lora_rank": 1 << 16, "qk_nope_head_dim": 1 << 14,
                "qk_rope_head_dim": 1 << 14, "v_head_dim": 1 << 14, "shared_expert_intermediate_size": 1 << 24,
                "dense_intermediate_size": 1 << 24, "learned_position_embeddings": 1 << 24, "bytes_per_param": 16,
                "published_total_params": 1 << 50}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only MoE transformer (counts are plain integers; bytes come from dtype)."""

    __pydantic_config__ = SPEC_CONFIG  # checked by sim.specs.schema at the boundary

    name: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    attention: AttentionKind = "gqa"
    # MLA (DeepSeek-V2/V3); zero for GQA models. q_lora_rank 0 means a plain q projection.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Always-on experts in every MoE layer: their summed intermediate size (0 if none).
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    # Leading layers with a dense FFN instead of experts (DeepSeek's first_k_dense_replace).
    first_dense_layers: int = 0
    dense_intermediate_size: int = 0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: Literal["none", "per_head", "full"] = "none"
    router_bias: bool = False
    # Dense FFNs of OPT-style models: two matrices (up, down) with a ReLU instead of SwiGLU's three; a dense model
    # is a one-expert MoE without a router (num_experts 1, top_k 1).
    ffn_gated: bool = True
    # Biases on every projection and LayerNorms with a bias (OPT); qkv_bias alone is Qwen2's q/k/v biases.
    linear_bias: bool = False
    # Rows of a learned position-embedding table (OPT: max_position_embeddings + its offset of 2); 0 for RoPE.
    learned_position_embeddings: int = 0
    bytes_per_param: int = 2
    expert_precision: ExpertPrecision = "native"
    # Storage bits per weight, scales included (GGUF's bits-per-weight figure: Q4_K 4.5, Q6_K 6.5625, Q8_0 8.5),
    # for files whose weights are quantised in a format the precisions above do not name. Non-expert weights
    # (attention, shared experts, dense FFNs, routers, norms, embeddings, LM head): 0 keeps the model's dtype;
    # routed experts: 0 keeps `expert_precision`'s layout (which still picks their CPU GEMM rate). Only bytes
    # change: activations and the KV cache stay in the model's dtype, and compute is priced as before.
    weight_bits_per_param: float = 0.0
    expert_bits_per_param: float = 0.0
    published_total_params: int = 0
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        positive = ["num_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_kv_heads",
                    "num_experts", "top_k", "expert_intermediate_size", "bytes_per_param"]
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise SimInputError(f"model {self.name}: {name} must be positive, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise SimInputError(f"model {self.name}: top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if self.num_kv_heads > self.num_attention_heads or self.num_attention_heads % self.num_kv_heads:
            raise SimInputError(f"model {self.name}: num_attention_heads {self.num_attention_heads} must be a "
                                f"multiple of num_kv_heads {self.num_kv_heads}")
        check_experts(self.num_experts, f"model {self.name}", self.top_k)
        for name, high in MODEL_MAXIMA.items():
            if int(getattr(self, name)) > high:
                raise SimInputError(f"model {self.name}: {name} must be at most {high:,}, got {getattr(self, name):,}")
        non_negative = ["head_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                        "v_head_dim", "shared_expert_intermediate_size", "first_dense_layers",
                        "dense_intermediate_size", "published_total_params"]
        for name in non_negative:
            if int(getattr(self, name)) < 0:
                raise SimInputError(f"model {self.name}: {name} must be >= 0, got {getattr(self, name)}")
        if self.attention not in ("gqa", "mla"):
            raise SimInputError(f"model {self.name}: attention must be 'gqa' or 'mla', got {self.attention!r}")
        if self.attention == "gqa" and self.head_dim <= 0:
            raise SimInputError(f"model {self.name}: head_dim must be positive for GQA")
        if self.attention == "mla" and min(self.kv_lora_rank, self.qk_rope_head_dim, self.v_head_dim) <= 0:
            raise SimInputError(f"model {self.name}: MLA needs kv_lora_rank, qk_rope_head_dim and v_head_dim")
        if self.attention == "mla" and (self.qkv_bias or self.linear_bias or self.qk_norm != "none"):
            # MLA's parameter counts and layouts have no place for them (they were accepted and ignored, until a
            # policy laid the weights out as GQA's and failed on an unrelated pool)
            raise SimInputError(f"model {self.name}: qkv_bias, linear_bias and qk_norm describe GQA attention; an "
                                "MLA model takes none of them")
        if self.bytes_per_param not in (1, 2, 4):
            raise SimInputError(f"model {self.name}: bytes_per_param must be 1, 2 or 4 (8-, 16- or 32-bit weights), "
                                f"got {self.bytes_per_param}")
        if not 0 <= self.first_dense_layers < self.num_layers:
            raise SimInputError(f"model {self.name}: first_dense_layers must be in [0, num_layers)")
        if self.learned_position_embeddings < 0:
            raise SimInputError(f"model {self.name}: learned_position_embeddings must be >= 0")
        if self.first_dense_layers and self.dense_intermediate_size <= 0:
            raise SimInputError(f"model {self.name}: dense layers need dense_intermediate_size")
        if self.expert_precision not in EXPERT_PRECISIONS:
            raise SimInputError(f"model {self.name}: expert_precision must be one of {', '.join(EXPERT_PRECISIONS)}, "
                                f"got {self.expert_precision!r}")
        for name in ("weight_bits_per_param", "expert_bits_per_param"):
            bits = float(getattr(self, name))
            if not (bits == 0 or MIN_STORAGE_BITS <= bits <= MAX_STORAGE_BITS):
                raise SimInputError(f"model {self.name}: {name} must be 0 (unset) or in [{MIN_STORAGE_BITS:g}, "
                                    f"{MAX_STORAGE_BITS:g}] bits, got {bits!r}")

    # ---- layer structure -------------------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense_layers

    def moe_index(self, layer: int) -> int:
        """Index of a model layer among the MoE layers (the trace's layer axis)."""
        return layer - self.first_dense_layers

    # ---- parameter counts per op ----------------------------------------------------------------------
    @property
    def qkv_params(self) -> int:
        """OP0: every input projection of attention (incl. MLA's low-rank paths, q/k norms and biases)."""
        h = self.hidden_size
        if self.attention == "gqa":
            q = self.num_attention_heads * self.head_dim
            kv = self.num_kv_heads * self.head_dim
            params = h * (q + 2 * kv)
            if self.qkv_bias or self.linear_bias:
                params += q + 2 * kv
            if self.qk_norm == "per_head":
                params += 2 * self.head_dim
            elif self.qk_norm == "full":
                params += q + kv
            return params
        qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
        n = self.num_attention_heads
        if self.q_lora_rank:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * n * qk_head
        else:
            q = h * n * qk_head
        kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv_b = self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_a + kv_b

    @property
    def attention_up_params(self) -> int:
        """MLA's up-projection of the cached latent to per-head keys and values (`kv_b`; 0 for GQA). Stored with the
        QKV weights but applied by attention, where the cache is: decode absorbs it (queries into the latent,
        the latent output back to values: 2 x these FLOPs a query token), prefill decompresses every key with it
        (2 x these FLOPs a key), as vLLM's MLA backend does; so its work is the attention op's, on the attention's
        device (OpWork.attention)."""
        if self.attention != "mla":
            return 0
        return self.kv_lora_rank * self.num_attention_heads * (self.qk_nope_head_dim + self.v_head_dim)

    @property
    def o_proj_params(self) -> int:
        """OP2: attention output projection."""
        v = self.v_head_dim if self.attention == "mla" else self.head_dim
        return self.num_attention_heads * v * self.hidden_size + (self.hidden_size if self.linear_bias else 0)

    @property
    def attention_params(self) -> int:
        return self.qkv_params + self.o_proj_params

    @property
    def norm_params_per_layer(self) -> int:
        return (4 if self.linear_bias else 2) * self.hidden_size

    @property
    def has_router(self) -> bool:
        """A one-expert model is dense: every token goes to its FFN, no gate is computed."""
        return self.num_experts > 1

    @property
    def ffn_matrices(self) -> int:
        """Weight matrices of one FFN: gate, up and down (SwiGLU) or up and down (ReLU, OPT)."""
        return 3 if self.ffn_gated else 2

    def _ffn_params(self, intermediate: int) -> int:
        bias = intermediate + self.hidden_size if self.linear_bias else 0
        return self.ffn_matrices * self.hidden_size * intermediate + bias

    @property
    def router_params(self) -> int:
        if not self.has_router:
            return 0
        return self.hidden_size * self.num_experts + (self.num_experts if self.router_bias else 0)

    @property
    def expert_params(self) -> int:
        """One routed expert (or a dense model's FFN): its projections and any biases."""
        return self._ffn_params(self.expert_intermediate_size)

    @property
    def shared_expert_params(self) -> int:
        """The shared expert: an FFN of the model's kind (gated or not, biases where its linear layers have them),
        plus its sigmoid gate's row where it has one; none without a shared expert."""
        if not self.shared_expert_intermediate_size:
            return 0
        gate = self.hidden_size if self.shared_expert_gate else 0
        return self._ffn_params(self.shared_expert_intermediate_size) + gate

    @property
    def dense_ffn_params(self) -> int:
        return self._ffn_params(self.dense_intermediate_size)

    @property
    def embedding_params(self) -> int:
        return (self.vocab_size + self.learned_position_embeddings) * self.hidden_size

    @property
    def output_projection_params(self) -> int:
        """The LM head's matrix, vocab x hidden, whether it is its own or the tied embedding table."""
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """The LM head's own parameters: none where it reuses the embedding table."""
        return 0 if self.tie_word_embeddings else self.output_projection_params

    def layer_params(self, layer: int) -> int:
        base = self.attention_params + self.norm_params_per_layer
        if not self.is_moe_layer(layer):
            return base + self.dense_ffn_params
        return base + self.router_params + self.num_experts * self.expert_params + self.shared_expert_params

    @cached_property
    def total_params(self) -> int:
        """Every parameter (kept once computed: searches ask it per candidate, and it sums every layer)."""
        layers = sum(self.layer_params(i) for i in range(self.num_layers))
        return layers + self.embedding_params + self.lm_head_params + self.final_norm_params

    @property
    def final_norm_params(self) -> int:
        """The norm after the last layer (with a bias where the model's linear layers have one)."""
        return (2 if self.linear_bias else 1) * self.hidden_size

    @property
    def routed_expert_params(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_params

    @property
    def non_expert_params(self) -> int:
        """Everything except routed experts (attention, norms, routers, shared experts, dense FFNs, embeddings)."""
        return self.total_params - self.routed_expert_params

    # ---- bytes ---------------------------------------------------------------------------------------
    @property
    def stored_at_bits(self) -> bool:
        """Whether weights are sized by `weight_bits_per_param` / `expert_bits_per_param` (a format no kernel of
        the executor, hence no profile, runs)."""
        return bool(self.weight_bits_per_param or self.expert_bits_per_param)

    def weight_param_bytes(self, params: int) -> int:
        """Bytes of `params` non-expert weights as stored: `weight_bits_per_param` where set, else the dtype."""
        if self.weight_bits_per_param:
            return math.ceil(params * self.weight_bits_per_param / 8)
        return params * self.bytes_per_param

    def _matrix_bytes(self, rows: int, cols: int) -> int:
        """One expert weight matrix (`rows` outputs x `cols` inputs) at the experts' precision, scales included."""
        if self.expert_bits_per_param:
            return math.ceil(rows * cols * self.expert_bits_per_param / 8)
        if self.expert_precision == "int8":
            return rows * cols + SCALE_BYTES * rows
        if self.expert_precision == "int4":
            return -(-rows * cols // 2) + SCALE_BYTES * rows * -(-cols // INT4_GROUP_SIZE)
        return rows * cols * self.bytes_per_param

    @property
    def expert_bytes(self) -> int:
        """One routed expert's weights at `expert_precision` or `expert_bits_per_param` (biases stay in the model's
        dtype)."""
        if self.expert_precision == "native" and not self.expert_bits_per_param:
            return self.expert_params * self.bytes_per_param
        h, i = self.hidden_size, self.expert_intermediate_size
        matrices = (self.ffn_matrices - 1) * self._matrix_bytes(i, h) + self._matrix_bytes(h, i)
        bias = (i + h) * self.bytes_per_param if self.linear_bias else 0
        return matrices + bias

    @property
    def routed_expert_bytes(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_bytes

    @property
    def non_expert_bytes(self) -> int:
        return self.weight_param_bytes(self.non_expert_params)

    @property
    def weight_bytes(self) -> int:
        """Every weight of the model: routed experts at their precision, the rest as stored."""
        return self.non_expert_bytes + self.routed_expert_bytes

    def layer_bytes(self, layer: int) -> int:
        """One decoder layer's weights (a MoE layer's routed experts at their precision)."""
        if not self.is_moe_layer(layer):
            return self.weight_param_bytes(self.layer_params(layer))
        other = self.layer_params(layer) - self.num_experts * self.expert_params
        return self.weight_param_bytes(other) + self.num_experts * self.expert_bytes

    @property
    def kv_values_per_token_layer(self) -> int:
        """KV-cache values one token adds at one layer (MLA caches the compressed latent and the rope key)."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """KV-cache bytes one token adds at one layer, at the model's precision."""
        return self.kv_values_per_token_layer * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_layer * self.num_layers

    @property
    def qkv_out_width(self) -> int:
        """Values per token that OP0 hands to attention (q plus the new cache entry)."""
        if self.attention == "mla":
            q = self.num_attention_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
            return q + self.kv_lora_rank + self.qk_rope_head_dim
        return (self.num_attention_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def attn_out_width(self) -> int:
        v = self.v_head_dim if self.attention == "mla" else self.head_dim
        return self.num_attention_heads * v

    # ---- attention FLOPs -----------------------------------------------------------------------------
    def attention_flops(self, q_tokens: int, kv_tokens_attended: int, prefill: bool = False) -> int:
        """FLOPs of score and value products: `kv_tokens_attended` sums, over query tokens, the keys each sees.
        MLA runs as serving runtimes run it: in decode absorbed (scores over the latent + rope, values over the
        latent: little data, more FLOPs), in prefill as plain multi-head attention over K and V decompressed by
        the latent's up-projection (scores over nope + rope, values over v_head_dim: the compute-friendly form;
        vLLM's MLA backend, `vllm.model_executor.layers.attention.mla_attention`). The up-projection's own FLOPs
        are not these: `sim.cost.work.absorb_flops` adds them to the attention op."""
        del q_tokens
        n = self.num_attention_heads
        if self.attention == "mla" and prefill:
            per = 2 * (self.qk_nope_head_dim + self.qk_rope_head_dim) + 2 * self.v_head_dim
        elif self.attention == "mla":
            per = 2 * (self.kv_lora_rank + self.qk_rope_head_dim) + 2 * self.kv_lora_rank
        else:
            per = 4 * self.head_dim
        return n * per * kv_tokens_attended

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
