"""Build a `ModelSpec` from a Hugging Face `config.json` (read locally; no network)."""

from __future__ import annotations

from typing import Any

from sim.errors import SimInputError
from sim.specs.model import ModelSpec

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "dbrx", "opt")
OPT_POSITION_OFFSET = 2  # transformers' OPTLearnedPositionalEmbedding keeps 2 extra rows


def _get(cfg: dict[str, Any], key: str, model_type: str) -> Any:
    if key not in cfg:
        raise SimInputError(f"config.json ({model_type}): missing field {key}")
    return cfg[key]


def model_from_hf_config(cfg: dict[str, Any], name: str = "hf-model") -> ModelSpec:
    """Map the fields of the supported MoE families onto `ModelSpec`."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise SimInputError(f"config.json: model_type {model_type!r} not supported; supported: {', '.join(SUPPORTED)}")
    source = {"config": f"Hugging Face config.json (model_type {model_type})"}
    if model_type == "dbrx":
        attn = _get(cfg, "attn_config", model_type)
        ffn = _get(cfg, "ffn_config", model_type)
        heads = _get(cfg, "n_heads", model_type)
        hidden = _get(cfg, "d_model", model_type)
        return ModelSpec(
            name=name, num_layers=_get(cfg, "n_layers", model_type), hidden_size=hidden,
            vocab_size=_get(cfg, "vocab_size", model_type), num_attention_heads=heads,
            num_kv_heads=attn.get("kv_n_heads", heads), head_dim=hidden // heads,
            num_experts=ffn["moe_num_experts"], top_k=ffn["moe_top_k"],
            expert_intermediate_size=ffn["ffn_hidden_size"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), sources=source,
        )

    def g(key: str) -> Any:
        return _get(cfg, key, model_type)

    hidden = g("hidden_size")
    heads = g("num_attention_heads")
    common: dict[str, Any] = dict(
        name=name, num_layers=g("num_hidden_layers"), hidden_size=hidden, vocab_size=g("vocab_size"),
        num_attention_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), sources=source,
    )
    if model_type == "opt":
        # Dense: a one-expert model whose FFN is OPT's ReLU fc1/fc2 (see ModelSpec.has_router).
        if cfg.get("word_embed_proj_dim", hidden) != hidden:
            raise SimInputError("config.json (opt): word_embed_proj_dim differs from hidden_size (OPT-350m's "
                                "projected embeddings are not modelled)")
        return ModelSpec(**{**common, "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True))},
                         head_dim=hidden // heads, num_experts=1, top_k=1, expert_intermediate_size=g("ffn_dim"),
                         ffn_gated=False, linear_bias=bool(cfg.get("enable_bias", True)),
                         learned_position_embeddings=g("max_position_embeddings") + OPT_POSITION_OFFSET)
    if model_type == "mixtral":
        return ModelSpec(**common, head_dim=cfg.get("head_dim") or hidden // heads,
                         num_experts=g("num_local_experts"), top_k=g("num_experts_per_tok"),
                         expert_intermediate_size=g("intermediate_size"))
    if model_type in ("qwen2_moe", "qwen3_moe", "olmoe"):
        shared = cfg.get("shared_expert_intermediate_size", 0) or 0
        qk_norm = {"qwen3_moe": "per_head", "olmoe": "full"}.get(model_type, "none")
        return ModelSpec(**common, head_dim=cfg.get("head_dim") or hidden // heads,
                         num_experts=g("num_experts"), top_k=g("num_experts_per_tok"),
                         expert_intermediate_size=cfg.get("moe_intermediate_size") or g("intermediate_size"),
                         shared_expert_intermediate_size=shared, shared_expert_gate=bool(shared),
                         qkv_bias=model_type == "qwen2_moe", qk_norm=qk_norm)
    # deepseek_v2 / deepseek_v3: MLA, shared experts, leading dense layers.
    n_shared = cfg.get("n_shared_experts") or 0
    moe_inter = g("moe_intermediate_size")
    return ModelSpec(
        **common, attention="mla", head_dim=g("qk_nope_head_dim") + g("qk_rope_head_dim"),
        num_experts=g("n_routed_experts"), top_k=g("num_experts_per_tok"), expert_intermediate_size=moe_inter,
        q_lora_rank=cfg.get("q_lora_rank") or 0, kv_lora_rank=g("kv_lora_rank"),
        qk_nope_head_dim=g("qk_nope_head_dim"), qk_rope_head_dim=g("qk_rope_head_dim"),
        v_head_dim=g("v_head_dim"), shared_expert_intermediate_size=n_shared * moe_inter,
        first_dense_layers=cfg.get("first_k_dense_replace", 0) or 0,
        dense_intermediate_size=g("intermediate_size"),
        router_bias=cfg.get("topk_method") == "noaux_tc",
    )
