"""Random weights: seeded blocks drawn on torch's threads give the same weights whatever the thread count, with
the documented N(0, 0.02) statistics; a profile reuses a caller's weights of the same model instead of drawing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import executor.weights as W
from sim.specs import ModelSpec

SPEC = ModelSpec(name="tiny", num_layers=3, hidden_size=64, vocab_size=97, num_attention_heads=4, num_kv_heads=2,
                 head_dim=16, num_experts=8, top_k=2, expert_intermediate_size=48, first_dense_layers=1,
                 dense_intermediate_size=96)


def _tensors(weights: W.ModelWeights) -> list[torch.Tensor]:
    out = [weights.embed, weights.lm_head, weights.final_norm]
    for lw in weights.layers:
        out += [*lw.attn.values(), lw.attn_norm, lw.ffn_norm, *lw.dense.values(), *lw.shared.values()]
        out += [t for t in (lw.router, lw.w1, lw.w3, lw.w2) if t is not None]
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(W, "DRAW_BLOCK", 100)  # several blocks per tensor, a partial one at each end


def test_the_same_seed_gives_the_same_weights_at_any_thread_count(small_blocks):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _tensors(W.random_weights(SPEC, seed=7))
        torch.set_num_threads(2)
        two = _tensors(W.random_weights(SPEC, seed=7))
    finally:
        torch.set_num_threads(before)
    assert len(one) == len(two) > 10
    assert all(a.dtype == torch.bfloat16 and torch.equal(a, b) for a, b in zip(one, two, strict=True))
    other = _tensors(W.random_weights(SPEC, seed=8))
    assert not torch.equal(one[0], other[0])


def test_blocks_and_tensors_draw_unrelated_values_with_the_documented_statistics(small_blocks):
    weights = W.random_weights(SPEC, seed=0)
    w1 = weights.layers[1].w1.float().flatten()  # 8 x 48 x 64 = 24,576 values: 246 blocks
    assert abs(w1.mean().item()) < 0.001 and w1.std().item() == pytest.approx(W.INIT_STD, rel=0.03)
    blocks = w1[: 200 * 100].view(200, 100)
    assert torch.unique(blocks, dim=0).shape[0] == 200  # no block repeats another
    assert not torch.equal(weights.layers[1].w1.flatten()[:100], weights.layers[1].w3.flatten()[:100])
    assert torch.equal(weights.final_norm, torch.ones(SPEC.hidden_size, dtype=torch.bfloat16))


def test_first_layers_share_the_callers_tensors_or_decline():
    weights = W.random_weights(SPEC, seed=0)
    first = W.first_layers(weights, SPEC, 2)
    assert first is not None and first.spec == W.truncated(SPEC, 2) and len(first.layers) == 2
    assert first.layers[1].w1 is weights.layers[1].w1 and first.lm_head is weights.lm_head
    assert W.first_layers(weights, SPEC, 3).spec == SPEC
    part = W.random_weights(W.truncated(SPEC, 2), seed=0)
    assert W.first_layers(part, SPEC, 2) is not None and W.first_layers(part, SPEC, 3) is None  # too few layers
    assert W.first_layers(weights, dataclasses.replace(SPEC, name="other"), 2) is None  # another model
    wide = W.random_weights(SPEC, seed=0, dtype=torch.float32)
    assert W.first_layers(wide, SPEC, 2) is None  # the profile measures bf16
