"""Crash-safe sweep results: one SQLite file, one row per point keyed by its config hash.

A point counts as finished only when it was recorded by the same code and library versions (`versions()`: a
digest of the simulator's sources and presets, and the versions of the libraries that shape the numbers): a rerun
after a change to the simulator simulates every point again instead of reusing numbers the old code produced.

Why SQLite: it ships with Python, and each finished point is one committed transaction (WAL journal), so a
sweep killed with -9 keeps every point it had written and never half a row; the primary key makes a rerun's
write replace rather than duplicate. Only the sweep's main process writes; workers return results to it.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import platform
import sqlite3
import time
from contextlib import closing, suppress
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from sim.errors import SimInputError

DB_NAME = "results.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    config TEXT NOT NULL,
    metrics TEXT,
    error TEXT,
    wall_s REAL NOT NULL,
    versions TEXT NOT NULL,
    finished_at TEXT NOT NULL
)
"""
CONFIG_INDEX = "CREATE INDEX IF NOT EXISTS points_config ON points (config)"  # a config's row, found at once
# Metrics copied into the DataFrame's columns (the rest stay in the `metrics` JSON column).
METRIC_COLUMNS = ("throughput_tok_s", "total_s", "prefill_s", "decode_s", "peak_gpu_bytes", "peak_cpu_bytes")


SOURCES = ("sim", "traces")  # what turns a point's config into its numbers
SOURCE_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".npy", ".csv")


@functools.cache
def code_digest() -> str:
    """A digest of the simulator's sources, presets and shipped data (`sim/`, `traces/`)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for top in SOURCES:
        for path in sorted((root / top).rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and path.is_file():
                h.update(path.relative_to(root).as_posix().encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    """What produced a result: the simulator's code (a digest), this package and the libraries whose behaviour
    shapes the numbers."""
    out = {"code": code_digest(), "python": platform.python_version()}
    for pkg in ("cox-moe", "simpy", "numpy", "pandas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


class ResultStore:
    """The results database of one sweep directory."""

    def __init__(self, out_dir: str | Path):
        if not str(out_dir).strip():
            raise SimInputError("--out: give the sweep's results folder (an empty name would write into the "
                                "current one)")
        self.path = Path(out_dir) / DB_NAME
        self._made_dirs = _missing_folders(self.path.parent)  # what a discard may remove again, deepest first
        self._new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path)
        except sqlite3.Error as exc:  # a read-only directory, a name taken by a folder
            raise _unwritable(self.path, exc) from None
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute(SCHEMA)
            self.conn.commit()
            _check_columns(self.conn, self.path)
            self.conn.execute(CONFIG_INDEX)  # (after the check: a foreign table has no config column to index)
            self.conn.commit()
        except sqlite3.OperationalError as exc:  # read-only, locked, or a full disk
            self.conn.close()
            raise _unwritable(self.path, exc) from None
        except sqlite3.DatabaseError as exc:  # a file there that is not a results database
            self.conn.close()
            raise _bad_store(self.path, exc) from None
        self._versions = json.dumps(versions(), sort_keys=True)

    def _ok_points(self, current: bool) -> set[str]:
        """Keys of the successful points recorded by these versions (`current`) or by others."""
        return {key for key, made_by in self.conn.execute("SELECT key, versions FROM points WHERE status = 'ok'")
                if (made_by == self._versions) is current}

    def finished(self) -> set[str]:
        """Keys of the points that completed successfully with this code and these library versions (failed
        ones, and ones another version recorded, run again)."""
        return self._ok_points(current=True)

    def stale(self) -> set[str]:
        """Keys of successful points that other code or library versions recorded."""
        return self._ok_points(current=False)

    def record(self, key: str, config: dict[str, Any], metrics: dict[str, Any] | None, error: str | None,
               wall_s: float) -> None:
        """Write one point and commit at once, replacing a row of the same config under another key (its input
        files changed); a full disk is one OSError: every point written so far stays."""
        config_json = json.dumps(config, sort_keys=True)
        try:
            with self.conn:
                # the same settings under another key: read from input files that have changed since (a point's
                # key covers their bytes); the new result replaces it, so one config has one row
                self.conn.execute("DELETE FROM points WHERE config = ? AND key != ?", (config_json, key))
                self.conn.execute(
                    "INSERT OR REPLACE INTO points VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, "ok" if error is None else "failed", config_json,
                     None if metrics is None else json.dumps(metrics, sort_keys=True), error, wall_s,
                     self._versions, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
        except sqlite3.OperationalError as exc:
            raise _unwritable(self.path, exc) from None

    def close(self) -> None:
        self.conn.close()

    def discard_if_unused(self) -> None:
        """Close, and remove the store (and the folders it made) where this object created it and no point was
        recorded: a run refused after the store was opened (a Ray cluster that would not take the job) leaves
        nothing behind. A store another process still has open (its write-ahead log outlives this connection's
        close, which removes the log only as the last one) is kept, as is one that cannot be read."""
        try:
            empty = self.conn.execute("SELECT COUNT(*) FROM points").fetchone()[0] == 0
        except sqlite3.Error:
            empty = False
        self.conn.close()
        wal, shm = (self.path.with_name(self.path.name + suffix) for suffix in ("-wal", "-shm"))
        if not (self._new and empty) or wal.exists() or shm.exists():
            return
        self.path.unlink(missing_ok=True)
        for folder in self._made_dirs:
            with suppress(OSError):  # something else was written there meanwhile
                folder.rmdir()


def load_results(out_dir: str | Path) -> pd.DataFrame:
    """Every recorded point as a row, in key order (the same whatever order and on how many workers the points
    ran): key, status, error, wall_s, the config keys, the headline metrics, the full `metrics`, `versions` JSON,
    and `stale` (recorded by other code or library versions than these)."""
    path = Path(out_dir) / DB_NAME
    if not path.is_file():
        raise SimInputError(f"no sweep results in {out_dir} (expected {DB_NAME})")
    try:
        raw = _read_points(path, "mode=ro")
    except (sqlite3.OperationalError, pd.errors.DatabaseError) as exc:
        wal = path.with_name(path.name + "-wal")
        if "unable to open" not in str(exc) or (wal.exists() and wal.stat().st_size > 0):
            raise _bad_store(path, exc) from None  # (an unmerged write-ahead log would be ignored: refuse)
        try:  # a WAL database on a read-only mount, its log merged: nothing can write it, so read it as it is
            raw = _read_points(path, "mode=ro&immutable=1")
        except (sqlite3.DatabaseError, pd.errors.DatabaseError) as again:
            raise _bad_store(path, again) from None
    except sqlite3.DatabaseError as exc:
        raise _bad_store(path, exc) from None
    rows = []
    from sim.config import OMITTED_DEFAULTS

    current = json.dumps(versions(), sort_keys=True)
    for rec in raw.to_dict("records"):
        config, metrics = _json_object(rec["config"], path, rec["key"]), {}  # NULL metrics read as NaN
        if isinstance(rec["metrics"], str):
            metrics = _json_object(rec["metrics"], path, rec["key"])
        config = {**OMITTED_DEFAULTS, **config}  # settings a point leaves out at their default
        error = rec["error"] if isinstance(rec["error"], str) else None
        row = {"key": rec["key"], "status": rec["status"], "error": error, "wall_s": rec["wall_s"],
               **{k: (json.dumps(v, sort_keys=True) if isinstance(v, dict) else v) for k, v in config.items()},
               **{m: metrics.get(m) for m in METRIC_COLUMNS}, "metrics": rec["metrics"],
               "versions": rec["versions"], "stale": rec["versions"] != current, "finished_at": rec["finished_at"]}
        rows.append(row)
    if not rows:  # a sweep stopped before its first point: the same columns, so filters and CSV headers still work
        from experiments.sweep.spec import POINT_DEFAULTS

        config_keys = list(dict.fromkeys([*POINT_DEFAULTS, *OMITTED_DEFAULTS]))
        return pd.DataFrame(columns=["key", "status", "error", "wall_s", *config_keys, *METRIC_COLUMNS, "metrics",
                                     "versions", "stale", "finished_at"])
    return pd.DataFrame(rows)


def _read_points(path: Path, mode: str) -> pd.DataFrame:
    """Every row of a results database, in key order (not by time: runs differ in it)."""
    uri = f"file:{quote(str(path.absolute()))}?{mode}"
    with closing(sqlite3.connect(uri, uri=True)) as conn:
        _check_columns(conn, path)
        return pd.read_sql_query("SELECT * FROM points ORDER BY key", conn)


def _unwritable(path: Path, exc: Exception) -> OSError:
    """A results database that cannot be opened or written (read-only, full disk, locked): one OSError line."""
    return OSError(errno.EIO, f"cannot write the sweep results ({str(exc).splitlines()[0][:80]})", str(path))


def _bad_store(path: Path, exc: Exception) -> Exception:
    return SimInputError(f"{path}: not a readable sweep results database ({str(exc).splitlines()[0][:80]})")


def _json_object(text: Any, path: Path, key: Any) -> dict[str, Any]:
    """A row's JSON object column; anything else is a one-line error naming the row."""
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except (json.JSONDecodeError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise SimInputError(f"{path}: point {str(key)[:20]!r} holds a config or metrics that is not a JSON object")
    return value


COLUMNS = ("key", "status", "config", "metrics", "error", "wall_s", "versions", "finished_at")


def _check_columns(conn: sqlite3.Connection, path: Path) -> None:
    """A `points` table of another schema (a foreign SQLite file) is refused in one line."""
    have = tuple(row[1] for row in conn.execute("PRAGMA table_info(points)"))
    if have != COLUMNS:
        raise sqlite3.DatabaseError(f"its points table has columns {', '.join(have) or 'none'}")
