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


def _held_elsewhere(lock) -> bool:
    """Whether some other thread holds `lock` (a Lock or an RLock): this one cannot take it without waiting."""
    import threading

    free = []

    def probe():
        got = lock.acquire(blocking=False)
        free.append(got)
        if got:
            lock.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return not free[0]


def test_the_words_are_drawn_under_the_generators_lock():
    """Reading, advancing and writing back the state happen under the generator's lock, as numpy's own draws do,
    so another thread's draws in between are neither lost nor repeated."""
    from traces.rng_words import _words

    seen = []

    class Spy(np.random.PCG64):
        @property
        def state(self):
            seen.append(("get", _held_elsewhere(self.lock)))
            return {**np.random.PCG64.state.__get__(self), "bit_generator": "PCG64"}

        @state.setter
        def state(self, value):
            seen.append(("set", _held_elsewhere(self.lock)))
            np.random.PCG64.state.__set__(self, {**value, "bit_generator": "Spy"})

    rng = np.random.Generator(Spy(0))
    words = _words(rng, 20_001)
    assert seen and all(held for _, held in seen[1:]) and seen[-1][0] == "set"  # [0]: Generator's own look
    want = np.random.Generator(np.random.PCG64(0)).random(20_001, dtype=np.float32)
    np.testing.assert_array_equal((words >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24), want)
