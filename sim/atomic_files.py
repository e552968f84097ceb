"""Figures whose bytes depend only on what they draw, written whole or not at all.

`write_atomic` (from `traces.files`, the one writer) writes through a temporary file beside the target and
renames it into place, so an interrupted run never leaves a truncated file under the real name.
`save_figure_file` saves a matplotlib figure the same way, without the creation dates, random SVG ids and
temporary file names that would otherwise make two runs of the same command differ (the project's rule: same
inputs, same bytes out).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from traces.files import write_atomic, write_atomic_text

__all__ = ["save_figure_file", "write_atomic", "write_atomic_text", "write_csv_file"]

SVG_HASH_SALT = "cox-moe"  # seeds matplotlib's SVG element ids (random per run otherwise)


@contextmanager
def _source_date_epoch() -> Iterator[None]:
    """PostScript takes its creation date from SOURCE_DATE_EPOCH only (reproducible-builds convention)."""
    old = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["SOURCE_DATE_EPOCH"]
        else:
            os.environ["SOURCE_DATE_EPOCH"] = old


def save_figure_file(fig: Any, path: str | Path, fmt: str | None = None, **savefig: Any) -> Path:
    """Save `fig` to `path` atomically in `fmt` (default: the suffix, else png) with reproducible bytes:
    no creation date (PDF, PS/EPS, SVG), fixed SVG ids, no (temporary) file name inside a PostScript file,
    and an svgz gzipped without a time stamp. Other keyword arguments go to `Figure.savefig`."""
    import matplotlib

    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".") or "png").lower()

    def write(tmp: str) -> None:
        with matplotlib.rc_context({"svg.hashsalt": SVG_HASH_SALT}):
            if fmt in ("svg", "svgz"):
                buf = io.BytesIO()
                fig.savefig(buf, format="svg", metadata={"Date": None}, **savefig)
                data = buf.getvalue()
                Path(tmp).write_bytes(gzip.compress(data, mtime=0) if fmt == "svgz" else data)
            elif fmt in ("ps", "eps"):  # into a buffer: given a file name, PostScript writes it as the title
                buf = io.BytesIO()
                with _source_date_epoch():
                    fig.savefig(buf, format=fmt, **savefig)
                Path(tmp).write_bytes(buf.getvalue())
            elif fmt == "pdf":
                fig.savefig(tmp, format=fmt, metadata={"CreationDate": None}, **savefig)
            else:
                fig.savefig(tmp, format=fmt, **savefig)

    return write_atomic(path, write)


CSV_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zip")


def write_csv_file(table: Any, path: str | Path) -> Path:
    """Write a DataFrame as CSV to `path` atomically, compressed by its suffix (.gz, .bz2, .xz, .zip; else plain)
    with reproducible bytes: no time stamp, and a zip's member named after the target (pandas, given the
    temporary file, would put its name and the current time in the archive)."""
    from sim.errors import SimInputError

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".zst", ".tar", ".tgz") or path.name.lower().endswith((".tar.gz", ".tar.bz2", ".tar.xz")):
        raise SimInputError(f"{path}: write .csv, or .csv compressed as {', '.join(CSV_COMPRESSIONS)}")
    data = table.to_csv(index=False).encode("utf-8")
    if suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    elif suffix == ".bz2":
        data = bz2.compress(data)
    elif suffix == ".xz":
        data = lzma.compress(data)
    elif suffix == ".zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(zipfile.ZipInfo(path.stem, date_time=(1980, 1, 1, 0, 0, 0)), data,
                             compress_type=zipfile.ZIP_DEFLATED)
        data = buf.getvalue()
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))
