"""Draw weights for measured selection tables: top-k draws without replacement select each expert with its
measured share (traces/selection.py)."""

from __future__ import annotations

import numpy as np
import pytest

from traces import TraceError
from traces.selection import _integrated, draw_weights, inclusion_probabilities
from traces.synth import popularity_table
from traces.synth_presets import selection_share


def test_the_closed_form_for_two_draws_is_the_integrated_race():
    w = np.random.default_rng(1).dirichlet(np.full(8, 0.5))
    np.testing.assert_allclose(inclusion_probabilities(w, 2), _integrated(w, 2), atol=1e-6)
    assert inclusion_probabilities(w, 2).sum() == pytest.approx(2)


@pytest.mark.parametrize("experts, k", [(16, 3), (32, 4), (64, 8)])
def test_inclusion_probabilities_match_the_generators_own_draws(experts, k):
    w = np.random.default_rng(experts).dirichlet(np.full(experts, 0.7))
    pi = inclusion_probabilities(w, k)
    assert pi.sum() == pytest.approx(k, abs=1e-5) and (pi <= 1 + 1e-9).all()
    drawn = selection_share(w, k, tokens=200_000, seed=3) * k  # per-expert standard error under 0.0012
    assert np.abs(pi - drawn).max() < 0.006


def test_solved_weights_give_the_measured_shares():
    table = popularity_table("mixtral-8x7b")
    w = draw_weights(table, 2)
    assert np.allclose(w.sum(axis=1), 1)
    for layer in (0, 17, 31):
        np.testing.assert_allclose(inclusion_probabilities(w[layer], 2), 2 * table[layer], atol=1e-9)
    # hotter than the shares themselves: the second draw can no longer land on the first
    assert (w.max(axis=1) > table.max(axis=1)).all()
    shares = selection_share(np.random.default_rng(5).dirichlet(np.ones(40)), 6, tokens=50_000)
    back = inclusion_probabilities(draw_weights(shares[None], 6)[0], 6)
    np.testing.assert_allclose(back, 6 * shares, atol=2e-6)


def test_a_share_no_routing_can_give_is_refused():
    with pytest.raises(TraceError, match="above 1/top_k"):
        draw_weights(np.array([[0.6, 0.2, 0.2]]), 2)
    zero = draw_weights(np.array([[0.4, 0.3, 0.3, 0.0]]), 2)[0]
    assert zero[3] == 0
    np.testing.assert_allclose(inclusion_probabilities(zero, 2), [0.8, 0.6, 0.6, 0.0], atol=1e-9)


@pytest.mark.parametrize("shift", [0.5, 1.0])
def test_topics_average_to_the_base_popularity(shift):
    """A topic mixture's topics lean on their own experts, and their average keeps the base: the draw weights
    exactly (Sinkhorn balance), and for top-2 the selection shares too (corrected; the old mixture's aggregate was
    flatter than its base by a total variation of 0.36 on Qwen3's preset)."""
    from traces.selection import selection_shares
    from traces.synth import TOPIC_SHARE_TOLERANCE, SynthConfig, popularity_matrix, topic_mixture

    base = popularity_matrix("table:mixtral-8x7b", 32, 8, 0, 2)
    cfg = SynthConfig("mixtral-8x7b", 32, 8, 2, "table:mixtral-8x7b", topics=6, topic_shift=shift)
    probs, topic_of, features = topic_mixture(cfg, base, 50)
    assert probs.shape == (6, 32, 8) and np.allclose(probs.sum(axis=2), 1) and (probs >= 0).all()
    assert np.abs(selection_shares(probs, 2).mean(axis=0) - selection_shares(base, 2)).max() <= TOPIC_SHARE_TOLERANCE
    assert 0.5 * np.abs(probs - base[None]).sum(axis=2).mean() > 0.03 * shift  # the topics differ
    zipf = popularity_matrix("zipf:1.2", 4, 32, 1)
    wide = SynthConfig("m", 4, 32, 4, "zipf:1.2", topics=5, topic_shift=shift)
    probs, _, _ = topic_mixture(wide, zipf, 10)
    np.testing.assert_allclose(probs.mean(axis=0), zipf, atol=1e-9)  # beyond top-2: the weights average exactly
