"""A Parquet file's row count and list entries, read from its footer in a child process.

Why a child: pyarrow 26 aborts the whole process (C++ `terminate`, exit 134) on some corrupt footers when a
column chunk's metadata is opened (a repetition-level histogram of the wrong size), and no Python handler runs.
The footer is read before anything else of a plan file (its counts bound the memory the read takes), so that
read runs here, in `python -m sim.parquet_footer PATH`, and a crash there is a one-line error in the parent. The
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


def footer_counts(path: str | Path, isolate: bool = True) -> tuple[int, int]:
    """(rows, list entries) of the Parquet file at `path`; FooterError when it is not a readable Parquet file.
    `isolate=False` reads in this process (for files this process wrote moments ago: tests that mutate columns
    and metadata through pyarrow, never raw bytes)."""
    if not isolate:
        return _counts(str(path))
    try:
        done = subprocess.run([sys.executable, "-m", "sim.parquet_footer", str(Path(path).resolve())],
                              capture_output=True,
                              text=True, timeout=FOOTER_TIMEOUT_S, cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        raise FooterError(f"reading its footer took over {FOOTER_TIMEOUT_S:.0f} s") from None
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


def _counts(path: str) -> tuple[int, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        footer = pq.ParquetFile(path).metadata
        return footer.num_rows, list_entries(footer)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise FooterError(type(exc).__name__) from None


def main() -> int:
    try:
        rows, entries = _counts(sys.argv[1])
    except FooterError as exc:
        print(exc, file=sys.stderr)
        return 3
    print(json.dumps([rows, entries]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
