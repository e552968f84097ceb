"""Resource guards: what an input or a build will allocate is estimated before it is allocated, and refused
above a limit with an error that names the estimate and how to raise the limit.

The limit is `COXMOE_MAX_GIB` (GiB, default 8: a third of the 24 GiB development machine); the CLI's
`--max-gib` sets it for one command. Every guard reports in the same words, so a user sees one rule.
"""

from __future__ import annotations

import math
import os

from traces.errors import TraceError

LIMIT_ENV = "COXMOE_MAX_GIB"
DEFAULT_LIMIT_GIB = 8.0
MAX_LIMIT_GIB = float(2**30)  # an exbibyte: a larger limit is no limit, and its byte count would overflow
MAX_EXPERTS = 65536  # expert ids are stored as uint8 or uint16
MAX_LENGTH = 1 << 24  # tokens of one request's prompt or generation (lengths are stored as int32)
BYTES_PER_OP = 400  # a planned op held in memory (its record, dependencies and engine state), measured roughly
# a grouped expert op's member (expert, tokens, flops, bytes): 149 bytes measured with tracemalloc (64-member
# groups, distinct FLOP and byte counts; AMX Xeon dev VM, 2026-12-03), charged as this share of an op
BYTES_PER_MEMBER = 150
MEMBER_OP_SHARE = BYTES_PER_MEMBER / BYTES_PER_OP


class ResourceLimitError(TraceError):
    """An input or a build would need more memory than the configured limit."""


def parse_gib(text: str) -> float:
    """A memory size in GiB: a positive, finite number (ValueError naming the problem otherwise)."""
    try:
        gib = float(text)
    except ValueError:
        raise ValueError(f"expected a number of GiB, got {text!r}") from None
    if not math.isfinite(gib) or not 0 < gib <= MAX_LIMIT_GIB:
        raise ValueError(f"must be a positive number of GiB up to {MAX_LIMIT_GIB:.0f}, got {text!r}")
    return gib


def env_size_bytes(name: str, default: float, unit: int, unit_name: str,
                   error: type[Exception] = TraceError) -> int:
    """A size setting from the environment in bytes: a number of `unit_name` (`unit` bytes each) in [0, 2^20],
    0 meaning off; anything else is one `error` naming the variable."""
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 2**20:
        raise error(f"{name}={raw!r}: expected {unit_name} in [0, 1048576]")
    return int(value * unit)


def memory_limit_bytes() -> int:
    """The configured limit in bytes (`COXMOE_MAX_GIB`); a malformed value is itself an error."""
    raw = os.environ.get(LIMIT_ENV)
    if raw is None or raw == "":
        return int(DEFAULT_LIMIT_GIB * 2**30)
    try:
        return int(parse_gib(raw) * 2**30)
    except ValueError as exc:
        raise TraceError(f"{LIMIT_ENV}: {exc}") from None


def check_memory(estimate_bytes: float, what: str) -> None:
    """Refuse a build whose estimated memory exceeds the limit, before anything is allocated."""
    limit = memory_limit_bytes()
    if not estimate_bytes <= limit:  # also refuses NaN
        raise ResourceLimitError(f"{what} would need about {gib_text(estimate_bytes)} GiB, above the "
                                 f"{gib_text(limit)} GiB limit (raise it with --max-gib or {LIMIT_ENV})")


def gib_text(nbytes: float) -> str:
    """Bytes in GiB with three significant digits (0.000183, 2.5, 1.05e+03): a small estimate must not print as
    0.00 beside a small limit."""
    return f"{nbytes / 2**30:.3g}"


def max_ops() -> int:
    """The most ops a plan may hold under the memory limit."""
    return max(1, memory_limit_bytes() // BYTES_PER_OP)


def too_many_ops(count: int, estimated: bool = False) -> ResourceLimitError:
    """The error for a plan that reached `max_ops()` ops while being built, or whose first decode step
    extrapolates past it (`estimated`); `count` charges a grouped op's experts at MEMBER_OP_SHARE of an op."""
    limit = memory_limit_bytes()
    size = (f"of about {count:,} ops (its first decode step times the steps planned) would need about "
            f"{gib_text(count * BYTES_PER_OP)} GiB, above the {gib_text(limit)} GiB limit" if estimated else
            f"of more than {count:,} ops would need more than {gib_text(limit)} GiB")
    return ResourceLimitError(f"a plan {size} (about {BYTES_PER_OP} bytes an op, {BYTES_PER_MEMBER} a grouped op's "
                              f"expert); use --decode-sample, a smaller "
                              f"batch, or raise the limit with --max-gib or {LIMIT_ENV}")


MAX_TOP_K = 256  # experts a token picks: published MoEs pick 1-16; a draw's cost grows with top_k x experts


def check_experts(num_experts: int, where: str, top_k: int | None = None) -> None:
    """Expert ids must fit the trace's id type; a token picks at most MAX_TOP_K of them."""
    if num_experts > MAX_EXPERTS:
        raise TraceError(f"{where}: {num_experts} experts; at most {MAX_EXPERTS} are supported (expert ids are "
                         "stored as 16-bit integers)")
    if top_k is not None and top_k > MAX_TOP_K:
        raise TraceError(f"{where}: top_k {top_k}; at most {MAX_TOP_K} experts per token are supported")
