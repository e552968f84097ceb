"""The batch to serve: per request a prompt length and a number of tokens to generate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.errors import SimInputError
from traces.limits import MAX_LENGTH


@dataclass(frozen=True, eq=False)
class Workload:
    """Offline batch inference of `batch` requests; every request starts together (one static batch)."""

    prompt_lens: np.ndarray
    gen_lens: np.ndarray

    def __post_init__(self) -> None:
        if self.prompt_lens.ndim != 1 or self.prompt_lens.shape != self.gen_lens.shape:
            raise SimInputError("workload: prompt and generation lengths must be 1-D arrays of equal size")
        if self.prompt_lens.size == 0:
            raise SimInputError("workload: batch must be at least 1")
        if int(self.prompt_lens.min()) < 1 or int(self.gen_lens.min()) < 1:
            raise SimInputError("workload: prompt and generation lengths must be >= 1")
        if max(int(self.prompt_lens.max()), int(self.gen_lens.max())) > MAX_LENGTH:
            raise SimInputError(f"workload: a request holds at most {MAX_LENGTH:,} prompt or generated tokens")

    @classmethod
    def uniform(cls, batch: int, prompt_len: int, gen_len: int) -> Workload:
        for name, value in (("batch", batch), ("prompt length", prompt_len), ("generation length", gen_len)):
            if int(value) < 1:
                raise SimInputError(f"{name} must be >= 1, got {value}")
            if name != "batch" and int(value) > MAX_LENGTH:  # before an int64 array is filled with it
                raise SimInputError(f"{name} must be at most {MAX_LENGTH:,}, got {value:,}")
        return cls(np.full(batch, prompt_len, dtype=np.int64), np.full(batch, gen_len, dtype=np.int64))

    @property
    def batch(self) -> int:
        return int(self.prompt_lens.size)

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_lens.sum())

    @property
    def generated_tokens(self) -> int:
        return int(self.gen_lens.sum())

    @property
    def max_gen_len(self) -> int:
        return int(self.gen_lens.max())

    @property
    def max_context(self) -> int:
        return int((self.prompt_lens + self.gen_lens).max())

    @property
    def kv_tokens_total(self) -> int:
        """KV entries the cache must hold at the end: every prompt token and every fed-back generated token."""
        return int((self.prompt_lens + self.gen_lens - 1).sum())

    def to_dict(self) -> dict:
        return {"batch": self.batch, "prompt_len_mean": float(self.prompt_lens.mean()),
                "prompt_len_max": int(self.prompt_lens.max()), "gen_len_mean": float(self.gen_lens.mean()),
                "gen_len_max": self.max_gen_len, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens}
