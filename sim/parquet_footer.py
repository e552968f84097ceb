"""A Parquet file's row count and list entries, read from its footer, and from its decoded columns, in a child
process.

Why a child: pyarrow 26 aborts the whole process (C++ `terminate`, exit 134) on some corrupt footers when a
column chunk's metadata is opened (a repetition-level histogram of the wrong size), and no Python handler runs.
The footer is read before anything else of a plan file (its counts bound the memory the read takes), so that
read runs here, in `python -m sim.parquet_footer PATH [LIMIT_BYTES ROW_BYTES ENTRY_BYTES]`, and a crash there is
a one-line error in the parent. The footer's counts are the file's word, and a forged footer (a list column
claiming 1,000 values whose pages hold 120 M) had the parent decode 4 GB past a 1 GiB limit; so, given the limit
and the parent's prices per row and list entry, the child also decodes the columns of a footer that fits, its
address space capped at LIMIT_BYTES (plus CHILD_SLACK_BYTES) above what the reader itself takes (pyarrow's columns
are several times smaller than the Python objects the parent then builds), and reports the counts the pages
really hold. The
module imports nothing of the simulator: the child starts in about 0.25 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FOOTER_TIMEOUT_S = 60.0  # a footer is kilobytes; a child still busy after this is stuck


class FooterError(Exception):
    """The footer could not be read; the message says why in one line."""


def list_entries(footer) -> int:  # noqa: ANN001 (pyarrow.parquet.FileMetaData)
    """Values in the file's list columns (`deps`, `alloc_*`, `member_*`): a small file may hold millions of them
    in one row, so they are counted before any column is read."""
    entries = 0
    for g in range(footer.num_row_groups):
        group = footer.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            if ".list." in column.path_in_schema:
                entries += column.num_values
    return entries


class DecodeTooLarge(Exception):
    """Decoding the file's columns took more memory than the limit allowed (its footer understated them)."""


CHILD_SLACK_BYTES = 512 << 20  # address space the decode may take besides the limit (buffers, allocator arenas)
DECODE_TOO_LARGE = 4  # the child's exit status when decoding ran out of its address space


def footer_counts(path: str | Path, isolate: bool = True,
                  decode_within: tuple[int, int, int] | None = None) -> tuple[int, int]:
    """(rows, list entries) of the Parquet file at `path`; FooterError when it is not a readable Parquet file.
    With `decode_within` (limit bytes, bytes per row, bytes per list entry) and a footer whose counts fit the
    limit at those prices, the child also decodes the columns within that much memory and the counts are those
    its pages hold (DecodeTooLarge past it); a footer over the limit is reported as it is, for the caller to
    refuse. `isolate=False` reads the footer alone, in this process (for files this process wrote moments ago:
    tests that mutate columns and metadata through pyarrow, never raw bytes)."""
    if not isolate:
        return _counts(str(path))
    argv = [sys.executable, "-m", "sim.parquet_footer", str(Path(path).resolve())]
    if decode_within is not None:
        argv += [str(int(v)) for v in decode_within]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=FOOTER_TIMEOUT_S,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        raise FooterError(f"reading its footer took over {FOOTER_TIMEOUT_S:.0f} s") from None
    if done.returncode == DECODE_TOO_LARGE:
        raise DecodeTooLarge()
    if done.returncode == 0:
        try:
            rows, entries = json.loads(done.stdout)
            return int(rows), int(entries)
        except (ValueError, TypeError):
            pass
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode < 0 or done.returncode == 134:  # killed by a signal: the Parquet library aborted
        raise FooterError("its footer crashed the Parquet reader")
    raise FooterError(lines[-1][:200] if lines else f"footer reader exited with status {done.returncode}")


def _counts(path: str, decode_within: tuple[int, int, int] | None = None) -> tuple[int, int]:
    """The footer's (rows, list entries); with `decode_within` (see `footer_counts`) and a footer that fits it,
    the larger of those and the decoded columns' own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        footer = pq.ParquetFile(path).metadata
        rows, entries = footer.num_rows, list_entries(footer)
        if decode_within is not None and rows * decode_within[1] + entries * decode_within[2] <= decode_within[0]:
            # one thread, no read-ahead pool: under the cap a thread stack it cannot map is not a memory error
            table = pq.read_table(path, page_checksum_verification=True, use_threads=False, pre_buffer=False)
            decoded = sum(len(chunk.values) for column in table.columns if pa.types.is_list(column.type)
                          for chunk in column.chunks)
            rows, entries = max(rows, table.num_rows), max(entries, decoded)
        return rows, entries
    except MemoryError:  # pyarrow's ArrowMemoryError included: the cap was reached
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise FooterError(type(exc).__name__) from None


def _cap_address_space(limit: int) -> None:
    """Let this process grow by at most `limit` + CHILD_SLACK_BYTES of address space from now (pyarrow imported:
    about 0.35 GB here). Where /proc is missing, nothing is capped."""
    import resource

    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = pages * resource.getpagesize() + CHILD_SLACK_BYTES + limit
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))


def main() -> int:
    decode_within = None
    if len(sys.argv) > 2:
        limit, row_bytes, entry_bytes = map(int, sys.argv[2:5])
        decode_within = limit, row_bytes, entry_bytes
        import pyarrow.parquet  # noqa: F401 (before the cap: the cap counts from what the reader itself takes)

        _cap_address_space(limit)
    try:
        rows, entries = _counts(sys.argv[1], decode_within)
    except FooterError as exc:
        print(exc, file=sys.stderr)
        return 3
    except MemoryError:
        return DECODE_TOO_LARGE
    print(json.dumps([rows, entries]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
