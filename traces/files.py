"""Files written whole or not at all: through a temporary file beside the target and a rename, so an interrupted
run never leaves a truncated file under the real name. The one writer every package uses (here, at the bottom of
the package graph: `sim`, `executor` and `experiments` import `traces`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once at import (setting it to read it is not thread-safe later)


def write_atomic(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write` on a temporary file beside `path`, then rename it into place (the parent is created; the
    file gets the umask's permissions, as a plain `open` would give it, not mkstemp's private 0600). The
    temporary name ends in the target's suffix, so writers that infer a format from the name (pandas: .gz;
    numpy: .npz) still do."""
    path = Path(path)
    tmp = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except OSError as exc:  # named by the target, not the temporary file the user never asked for
        ours = exc.filename is None or str(exc.filename) == str(path.parent) or str(exc.filename).startswith(
            str(path.parent / f".{path.name}."))
        if exc.errno is None or not ours:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
    return path


def write_atomic_text(path: str | Path, text: str) -> Path:
    """`write_atomic` of a UTF-8 text."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
