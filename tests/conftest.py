"""Shared fixtures: tiny models and systems that keep every test fast."""

from __future__ import annotations

import dataclasses

import pytest

from sim.specs import ModelSpec, load_model, load_system


@pytest.fixture
def tiny_model() -> ModelSpec:
    """A 4-layer GQA MoE small enough that plans have a few hundred ops."""
    return ModelSpec(name="tiny", num_layers=4, hidden_size=256, vocab_size=1000, num_attention_heads=8,
                     num_kv_heads=2, head_dim=32, num_experts=8, top_k=2, expert_intermediate_size=512)


@pytest.fixture
def tiny_mla_model() -> ModelSpec:
    """A tiny DeepSeek-shaped model: MLA, shared experts and one leading dense layer."""
    return ModelSpec(name="tiny-mla", num_layers=3, hidden_size=128, vocab_size=500, num_attention_heads=4,
                     num_kv_heads=4, head_dim=48, num_experts=16, top_k=4, expert_intermediate_size=64,
                     attention="mla", kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                     shared_expert_intermediate_size=128, first_dense_layers=1, dense_intermediate_size=256)


@pytest.fixture
def paper_system():
    return load_system("a100-80g-8452y")


@pytest.fixture
def mixtral():
    return load_model("mixtral-8x7b")


def with_fields(spec, **changes):
    return dataclasses.replace(spec, **changes)
