"""Draws read from the generator's raw words must be `rng.random(n, dtype=float32)`'s numbers, and leave the
generator where that call leaves it, whatever came before (odd counts leave half an output buffered)."""

from __future__ import annotations

import numpy as np
import pytest

from traces.rng_words import RAW_MIN_NUMBERS, _raw_words_match, random_f32, words32
from traces.synth import _InverseCdf


def test_this_machine_takes_the_fast_path():
    assert _raw_words_match()  # a little-endian PCG64 numpy: otherwise the tests below only check the fallback


@pytest.mark.parametrize("counts", [
    [RAW_MIN_NUMBERS, RAW_MIN_NUMBERS + 1, 3, RAW_MIN_NUMBERS + 2, 1, 65_537, 65_536, 5],
    [7, 100_001, 100_001, RAW_MIN_NUMBERS - 1, RAW_MIN_NUMBERS],
])
def test_random_f32_is_rng_random_float32_in_any_sequence(counts):
    plain, fast = np.random.default_rng(42), np.random.default_rng(42)
    for n in counts:
        np.testing.assert_array_equal(random_f32(fast, n), plain.random(n, dtype=np.float32))
        # what other code draws next, in float64, integers and float32, sees the same generator
        assert fast.random() == plain.random()
        assert fast.integers(0, 1000) == plain.integers(0, 1000)
        np.testing.assert_array_equal(fast.random(3, dtype=np.float32), plain.random(3, dtype=np.float32))
    assert fast.bit_generator.state == plain.bit_generator.state


def test_words_are_not_read_for_few_numbers_or_other_generators():
    rng = np.random.default_rng(1)
    before = rng.bit_generator.state
    assert words32(rng, RAW_MIN_NUMBERS - 1) is None
    assert rng.bit_generator.state == before  # nothing consumed
    mt, mt_ref = (np.random.Generator(np.random.MT19937(5)) for _ in range(2))
    assert words32(mt, 10_000) is None
    np.testing.assert_array_equal(random_f32(mt, 10_000), mt_ref.random(10_000, dtype=np.float32))


@pytest.mark.parametrize("probs", [np.ones(1), np.ones(8), np.ones(128), np.ones(256), np.ones(60),
                                   1.0 / np.arange(1, 129), np.arange(1.0, 9.0)])
@pytest.mark.parametrize("n", [RAW_MIN_NUMBERS + 3, 70_000, 17])
def test_inverse_cdf_draw_gives_the_ids_of_rng_random(probs, n):
    """`draw` (top bits of each word for power-of-two uniform tables, the float32 numbers otherwise) gives the
    ids the table gives for `rng.random`'s numbers, and the same generator state after."""
    table = _InverseCdf(probs)
    plain, fast = np.random.default_rng(9), np.random.default_rng(9)
    plain.random(1, dtype=np.float32), fast.random(1, dtype=np.float32)  # half an output buffered
    ids = table.draw(fast, n)
    want = table(plain.random(n, dtype=np.float32))
    assert ids.dtype == want.dtype
    np.testing.assert_array_equal(ids, want)
    assert fast.bit_generator.state == plain.bit_generator.state
    assert ids.max() < probs.size
