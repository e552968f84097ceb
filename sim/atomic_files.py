"""Output files written whole or not at all, and figures whose bytes depend only on what they draw.

`write_atomic` writes through a temporary file beside the target and renames it into place, so an interrupted
run never leaves a truncated file under the real name. `save_figure_file` saves a matplotlib figure the same
way, without the creation dates, random SVG ids and temporary file names that would otherwise make two runs of
the same command differ (the project's rule: same inputs, same bytes out).
"""

from __future__ import annotations

import gzip
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from traces.format import UMASK

SVG_HASH_SALT = "cox-moe"  # seeds matplotlib's SVG element ids (random per run otherwise)


def publish(tmp: str | Path) -> None:
    """Give a temporary file the permissions a plain `open` would (mkstemp makes it private, 0600)."""
    os.chmod(tmp, 0o666 & ~UMASK)


def write_atomic(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write` on a temporary file beside `path`, then rename it into place (the parent is created; the
    file gets the umask's permissions, as a plain `open` would give it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the target's suffix last, so writers that infer a format from the name (pandas: .gz) still do
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        publish(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_atomic_text(path: str | Path, text: str) -> Path:
    """`write_atomic` of a UTF-8 text."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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
