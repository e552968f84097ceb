"""A content-addressed cache of synthesised traces on disk, shared by processes (a sweep's workers) and runs.

A trace is keyed by everything that determines its bytes: the synthesis config, the request lengths, and a
digest of the code and shipped popularity tables that draw it; so a hit is the trace synthesis would give, and a
change to the synthesis code misses instead of returning a stale trace. Files are v1 traces written atomically
and read with `allow_pickle=False`; one that fails to load is rebuilt. The directory is capped (least recently
used out first). `COXMOE_TRACE_DIR` turns it on for any command (`off` or empty: off); sweeps use
`<sweep dir>/traces` unless it is set. `COXMOE_TRACE_DIR_GIB` caps it (default 8). One process builds a given
trace at a time (a lock file beside it); the others wait for its file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from functools import cache
from pathlib import Path

import numpy as np

from traces.errors import TraceError
from traces.format import RoutingTrace, load_trace, save_trace
from traces.limits import env_size_bytes
from traces.synth import DATA_DIR, POPULARITY_TABLES, SynthConfig

try:
    import fcntl
except ImportError:  # Windows has no fcntl: two processes may then build one trace at once (harmless)
    fcntl = None  # type: ignore[assignment]

TRACE_DIR_ENV = "COXMOE_TRACE_DIR"
TRACE_DIR_GIB_ENV = "COXMOE_TRACE_DIR_GIB"
DEFAULT_GIB = 8.0
_CODE = ("synth.py", "rng_words.py", "format.py", "synth_presets.py", "importers.py", "selection.py",
         "topk_kernels.py")


@cache
def synthesis_digest() -> str:
    """Digest of the code and data that turn a config into trace bytes."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE:
        h.update((here / name).read_bytes())
    for table in sorted(DATA_DIR.glob("*.npy")):
        h.update(table.name.encode())
        h.update(table.read_bytes())
    h.update(np.__version__.encode())  # the random streams the draws come from
    return h.hexdigest()


def table_digest(routing: str) -> str | None:
    """What a routing's count table holds, for the trace caches' keys: "" for routings that name no file (and the
    shipped tables), else the sha256 of the `table:PATH` file's bytes (so an edited table is drawn anew); None when
    the file is not a readable regular file (a FIFO or a device would block the read or never end it)."""
    kind, _, name = routing.partition(":")
    if kind != "table" or name in POPULARITY_TABLES:
        return ""
    try:
        if not Path(name).is_file():
            return None
        with Path(name).open("rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def cache_key(cfg: SynthConfig, prompt_lens: np.ndarray, gen_lens: np.ndarray,
              prompt_counts: bool = False) -> str | None:
    """The file name of a trace (in full, or with its prompts as counts), or None when it cannot be keyed (a
    count-table file that cannot be read: the synthesis then runs uncached and reports the problem itself)."""
    h = hashlib.sha256(synthesis_digest().encode())
    if prompt_counts:
        h.update(b"prompt_counts|")
    h.update(json.dumps(asdict(cfg), sort_keys=True, default=list).encode())
    table = table_digest(cfg.routing)  # a user's count table: its bytes, not its name
    if table is None:
        return None
    h.update(table.encode())
    for lens in (prompt_lens, gen_lens):
        h.update(np.ascontiguousarray(lens, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


def matches(trace: RoutingTrace, cfg: SynthConfig, prompt_lens: np.ndarray, gen_lens: np.ndarray,
            prompt_counts: bool) -> bool:
    """Whether a cached file holds what synthesis of `cfg` for these lengths writes: its header's shape, routing,
    seed and reuse, the lengths, and the form (prompts as counts or not). A file copied over another key, or one
    of another model or batch, fails and is rebuilt instead of silently standing in."""
    h = trace.header
    return ((h.model, h.num_layers, h.num_experts, h.top_k, h.source) ==
            (cfg.model, cfg.num_layers, cfg.num_experts, cfg.top_k, f"synthetic:{cfg.routing}")
            and h.extra.get("seed") == cfg.seed and h.extra.get("reuse_prob") == cfg.reuse_prob
            and (trace.prompt_counts is not None) == prompt_counts
            and np.array_equal(trace.prompt_lens, prompt_lens) and np.array_equal(trace.gen_lens, gen_lens))


class DiskTraceCache:
    """Synthesised traces under `directory`, at most `max_bytes` of files (least recently used out first)."""

    def __init__(self, directory: str | Path, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.hits = self.misses = 0

    def get(self, cfg: SynthConfig, prompt_lens: np.ndarray, gen_lens: np.ndarray,
            build: Callable[[], RoutingTrace], prompt_counts: bool = False) -> RoutingTrace:
        """The cached trace (prompts as counts when `prompt_counts`, as `build` draws it), else `build()`'s,
        saved. One process builds a given trace at a time: another that asks for it meanwhile waits for the file
        instead of drawing it again (a sweep's workers often start several points of one workload together)."""
        key = cache_key(cfg, prompt_lens, gen_lens, prompt_counts)
        if key is None:
            return build()
        path = self.directory / f"{key}.npz"
        want = (cfg, prompt_lens, gen_lens, prompt_counts)
        trace = self._load(path, want)
        if trace is not None:
            return trace
        with self._build_lock(key):
            trace = self._load(path, want)  # built by the process that held the lock
            if trace is not None:
                return trace
            self.misses += 1
            trace = build()
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                save_trace(trace, path)
                self._evict(keep=path)
            except OSError:  # a full or read-only disk costs the cache, not the run
                pass
        return trace

    def _load(self, path: Path, want: tuple[SynthConfig, np.ndarray, np.ndarray, bool]) -> RoutingTrace | None:
        """The trace at `path` if it loads and is the one asked for (`matches`), else None after removing the
        file (half-deleted by another process's eviction, damaged, or another trace under this name): rebuilt."""
        if not path.exists():
            return None
        try:
            trace = load_trace(path, thorough=False)
            if not matches(trace, *want):
                raise TraceError(f"{path}: not the trace its name stands for")
        except (TraceError, OSError):
            with suppress(OSError):
                path.unlink(missing_ok=True)
            return None
        with suppress(OSError):  # recently used (a read-only cache still serves)
            os.utime(path)
        self.hits += 1
        return trace

    @contextmanager
    def _build_lock(self, key: str) -> Iterator[None]:
        """An exclusive lock on `<key>.lock` while one process builds that trace (released by the OS if the
        process dies); no lock where the platform or the directory has none."""
        if fcntl is None:
            yield
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = open(self.directory / f"{key}.lock", "a+b")  # noqa: SIM115 - held across the yield
        except OSError:
            yield
            return
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _evict(self, keep: Path) -> None:
        files = []
        for f in self.directory.glob("*.npz*"):  # traces, and temporary files a killed writer left (.npz.tmp)
            try:
                st = f.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files):
            if total <= self.max_bytes:
                break
            if f != keep:
                with suppress(OSError):
                    f.unlink(missing_ok=True)
                    f.with_suffix(".lock").unlink(missing_ok=True)
                total -= size


def disk_cache_from_env() -> DiskTraceCache | None:
    """The cache $COXMOE_TRACE_DIR names, or None when it is unset, empty or `off`."""
    where = os.environ.get(TRACE_DIR_ENV, "").strip()
    if not where or where.lower() == "off":
        return None
    return DiskTraceCache(Path(where).expanduser(), env_size_bytes(TRACE_DIR_GIB_ENV, DEFAULT_GIB, 2**30, "GiB"))


@contextmanager
def default_trace_dir(directory: str | Path) -> Iterator[None]:
    """Within the block, $COXMOE_TRACE_DIR is `directory` unless the user set it (a sweep's default); child
    processes started inside inherit it."""
    if TRACE_DIR_ENV in os.environ:
        yield
        return
    os.environ[TRACE_DIR_ENV] = str(Path(directory).resolve())  # the same directory for workers elsewhere
    try:
        yield
    finally:
        os.environ.pop(TRACE_DIR_ENV, None)
