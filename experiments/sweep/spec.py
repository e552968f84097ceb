"""Sweep specs: a YAML file of axes and fixed values, expanded into fully resolved, hashed simulation points.

    fixed: {batch: 1024, decode_sample: 16, system: rtx6000ada-8452y}
    axes:
      model: [mixtral-8x7b, qwen3-30b-a3b]
      policy: [coxmoe, moe-lightning, flexgen]
      workload: [{prompt_len: 97, gen_len: 32}, {prompt_len: 800, gen_len: 256}]
      policy_options: [{}, {coalesce: "off"}]
      system_settings: [{}, {cpu.amx_efficiency: 0.073}]   # a spec number set, as `--set` does

An axis value that is a mapping is merged into the point (several keys varied together), except on the mapping
settings (`policy_options`, `system_settings`), whose values are mappings merged key by key into those of
`fixed:`; any other value sets the key named by the axis. A key (or a mapping setting's key) given in two places
is refused. Every point is completed with the simulator's defaults, so its hash names exactly
what ran: two specs that spell the same point differently share its result.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sim.config import DEFAULTS, MAPPING_SETTINGS, SimConfig, refuse_seed_with_trace
from sim.errors import SimInputError
from sim.specs.catalog import load_yaml, read_text_bounded, yaml_problem
from traces.errors import TraceError

# What a point may set: every `SimConfig` field, completed with its defaults; sweeps default to CoX-MoE.
SWEEP_DEFAULTS: dict[str, Any] = {"policy": "coxmoe"}
POINT_DEFAULTS: dict[str, Any] = {**DEFAULTS, **SWEEP_DEFAULTS}
REQUIRED = ("model", "system")


@dataclass(frozen=True)
class SweepPoint:
    """One fully resolved simulation and the hash that keys its result."""

    config: dict[str, Any]
    key: str
    # digests of the files the point reads (`input_files`), as keyed: the run checks them before it reads, so a file
    # edited during a sweep, or missing or different on a cluster's worker, is a failed point, not another number
    inputs: dict[str, str] = field(default_factory=dict)

    def sim_config(self) -> SimConfig:
        return SimConfig.from_point(self.config)


def point_key(config: dict[str, Any], inputs: dict[str, str] | None = None) -> str:
    """sha256 of the canonical JSON of a resolved config (sorted keys, no whitespace), first 16 hex digits; with
    the digests of the files it reads (`inputs`) after it, so a point whose trace or spec file changed is a new
    point (one that names presets only keeps the key of its config alone)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    if inputs:
        canonical += json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


FILE_OPTIONS = ("hot_map",)  # policy options that name a file (CoX-MoE's hot-expert map)
MAX_DIR_FILES = 1000  # files of one input directory (a profile) that are hashed
MAX_DIR_ENTRIES = 10 * MAX_DIR_FILES  # entries (files and folders) listed before a directory is refused


def _digest(path: Path, cache: dict[tuple, str]) -> str:
    """sha256 of a file's bytes, or of a directory's file names and bytes (a profile); cached per (path, size,
    modification time) within one expansion, so a trace shared by many points is read once."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    files = [path]
    if path.is_dir():  # stop listing at the cap: a large tree given by mistake is refused at once
        found = list(itertools.islice(path.rglob("*"), MAX_DIR_ENTRIES + 1))
        if len(found) > MAX_DIR_ENTRIES:
            raise SimInputError(f"{path}: more than {MAX_DIR_ENTRIES} entries to read as one input")
        files = sorted(p for p in found if p.is_file())
        if len(files) > MAX_DIR_FILES:
            raise SimInputError(f"{path}: more than {MAX_DIR_FILES} files to read as one input")
    for p in files:
        if p != path:  # a directory's file: its name counts too
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
        with p.open("rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    cache[key] = h.hexdigest()[:16]
    return cache[key]


def input_files(config: dict[str, Any]) -> dict[str, str]:
    """The files a resolved point reads, by setting: model and system spec files (not presets), the trace, the
    profile directory, a count table the routing names (`table:PATH`), and policy options that name a file."""
    from sim.specs.catalog import is_spec_path
    from traces.synth import POPULARITY_TABLES

    files = {name: config[name] for name in ("model", "system")
             if isinstance(config.get(name), str) and is_spec_path(config[name])}
    files.update({name: config[name] for name in ("trace", "profile") if config.get(name)})
    kind, _, table = str(config.get("routing") or "").partition(":")
    if kind == "table" and table not in POPULARITY_TABLES:
        files["routing"] = table
    options = config.get("policy_options") or {}
    files.update({f"policy_options.{k}": options[k] for k in FILE_OPTIONS if options.get(k)})
    return {name: str(path) for name, path in files.items()}


def rebased(config: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """`config` with the relative paths of the files it reads (`input_files`) made absolute against `base`: how a
    worker that does not start in the driver's folder (a Ray cluster's) finds them. The key is the original's."""
    out = dict(config)
    for name, text in input_files(config).items():
        path = Path(text)
        if path.is_absolute():
            continue
        absolute = str(Path(base) / path)
        if name == "routing":
            out["routing"] = f"table:{absolute}"
        elif name.startswith("policy_options."):
            out["policy_options"] = {**out["policy_options"], name.removeprefix("policy_options."): absolute}
        else:
            out[name] = absolute
    return out


def changed_inputs(config: dict[str, Any], inputs: dict[str, str], cache: dict[tuple, str]) -> str | None:
    """Why the files a point reads are not the ones it was keyed by (a one-line reason), or None when they are."""
    try:
        got = input_digests(config, cache)
    except SimInputError as exc:
        return f"{exc} (on a cluster, every worker needs the file at this path)"
    files = input_files(config)
    for name, want in inputs.items():
        if got.get(name) != want:
            return (f"{name} file {files.get(name)} is not the one the sweep was keyed by (sha256 {got.get(name)} "
                    f"here, {want} when expanded): edited during the sweep, or another file at this path here")
    return None


def input_digests(config: dict[str, Any], cache: dict[tuple, str] | None = None) -> dict[str, str]:
    """Digests of the files a point reads (`input_files`); a file that is not there is refused now, not when the
    point runs (relative paths are read from the current directory, as on the command line)."""
    cache = {} if cache is None else cache
    out = {}
    for name, text in input_files(config).items():
        path = Path(text)
        if not path.exists():
            raise SimInputError(f"sweep point: {name} file not found: {text} (relative paths are read from the "
                                f"current directory, {Path.cwd()})")
        if not (path.is_file() or path.is_dir()):  # a FIFO would block the read, a device never end it
            raise SimInputError(f"sweep point: {name} {text} is not a regular file")
        try:
            out[name] = _digest(path, cache)
        except OSError as exc:
            raise SimInputError(f"sweep point: {name} file {text}: cannot read it ({exc.strerror or exc})") from None
    return out


def resolve_point(raw: dict[str, Any], digests: dict[tuple, str] | None = None) -> SweepPoint:
    """Check a point's keys and values (as `SimConfig` does), fill the defaults and normalise option values to
    strings (as the CLI passes them)."""
    unknown = set(raw) - set(POINT_DEFAULTS)
    if unknown:
        raise SimInputError(f"sweep point: unknown key(s) {', '.join(repr(k) for k in sorted(unknown, key=str))}; "
                            f"known: {', '.join(POINT_DEFAULTS)}")
    config = {**POINT_DEFAULTS, **raw}
    missing = [k for k in REQUIRED if not config[k]]
    if missing:
        raise SimInputError(f"sweep point: {', '.join(missing)} not set (put it in fixed: or axes:)")
    for name in MAPPING_SETTINGS:
        if not isinstance(config[name] or {}, dict):
            raise SimInputError(f"sweep point: {name} must be a mapping, got {config[name]!r}")
    try:
        sim_config = SimConfig.from_point(config)
        if sim_config.system_settings:  # checked now, not when the point runs; keyed by the numbers they mean
            from sim.api import resolve_system
            from sim.specs.overrides import normalised_settings

            sim_config = sim_config.replace(system_settings=normalised_settings(
                resolve_system(sim_config.system), sim_config.system_settings, "system_settings"))
        refuse_seed_with_trace(sim_config)
        config = sim_config.point()
    except SimInputError as exc:
        raise SimInputError(f"sweep point: {exc}") from None
    inputs = input_digests(config, digests)  # a missing file is named before its contents are read
    try:
        _check_names(config, inputs)
        _check_inputs(json.dumps({k: v for k, v in config.items() if k in CHECKED_INPUTS}, sort_keys=True),
                      tuple(sorted(inputs.items())))
    except (SimInputError, TraceError) as exc:
        raise SimInputError(f"sweep point: {exc}") from None
    return SweepPoint(config, point_key(config, inputs), inputs)


# What `sim.api.check_point` reads of a point (decode_sample, profile and the cost model play no part in it).
CHECKED_INPUTS = ("model", "system", "system_settings", "policy", "policy_options", "expert_precision", "trace",
                  "batch", "prompt_len", "gen_len", "routing", "seed", "reuse_prob")


@functools.lru_cache(maxsize=4096)
def _check_inputs(fields: str, files: tuple[tuple[str, str], ...]) -> None:
    """A point's routing, lengths, trace and hot-expert map are usable (`sim.api.check_point`), once per distinct
    combination (and again when a file they name changes: `files` holds the digests): a typo in a routing or a
    trace of another model is refused with the spec, not as a column of failed points."""
    from sim.api import check_point

    check_point(SimConfig.from_point(json.loads(fields)))


@functools.lru_cache(maxsize=4096)
def _check_target(model: str, system: str, policy: str, options: tuple[tuple[str, str], ...],
                  files: tuple[tuple[str, str], ...]) -> None:
    """The model, system, policy and policy options a point names exist and parse (each combination once, and
    again when a spec file they name changes: `files` holds its digest): an unknown preset or option is refused
    with the spec, not as a failed point after the workers start."""
    from sim.api import resolve_model, resolve_system
    from sim.policies import make_policy

    resolve_model(model)
    resolve_system(system)
    make_policy(policy, dict(options))


def _check_names(config: dict[str, Any], inputs: dict[str, str]) -> None:
    _check_target(str(config["model"]), str(config["system"]), str(config["policy"]),
                  tuple(sorted((str(k), str(v)) for k, v in (config.get("policy_options") or {}).items())),
                  tuple(sorted(inputs.items())))


JSON_SCALARS = (str, int, float, bool, type(None))


MAX_SPEC_VALUES = 100_000  # values a spec may hold once YAML aliases are expanded (an alias bomb holds 10^9)
MAX_POINTS = 1_000_000  # points a spec may expand to


def _plain(value: Any, where: str, budget: list[int] | None = None) -> None:
    """Spec values are JSON data (they are hashed as JSON): YAML's dates, binary blobs or non-finite numbers are
    refused here, naming where they sit; so is a spec of more than MAX_SPEC_VALUES values (aliases expanded)."""
    budget = [MAX_SPEC_VALUES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise SimInputError(f"sweep spec: more than {MAX_SPEC_VALUES:,} values once its aliases are expanded")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise SimInputError(f"sweep spec: {where}: keys must be strings, got {k!r}")
            _plain(v, f"{where}[{k!r}]", budget)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _plain(v, f"{where}[{i}]", budget)
    elif not isinstance(value, JSON_SCALARS):
        raise SimInputError(f"sweep spec: {where}: {type(value).__name__} values are not allowed (quote it as a "
                            f"string?), got {value!r}"[:300])
    elif isinstance(value, float) and not math.isfinite(value):
        raise SimInputError(f"sweep spec: {where}: must be a finite number, got {value!r}")


def expand(spec: dict[str, Any]) -> list[SweepPoint]:
    """The grid of a spec mapping, in axis order, with duplicate points (same hash) dropped."""
    if isinstance(spec, dict):
        _plain(spec, "spec")
    if not isinstance(spec, dict) or set(spec) - {"fixed", "axes"}:
        raise SimInputError("sweep spec: top level must be a mapping with 'fixed' and/or 'axes'")
    fixed = spec.get("fixed") or {}
    axes = spec.get("axes") or {}
    if not isinstance(fixed, dict) or not isinstance(axes, dict):
        raise SimInputError("sweep spec: 'fixed' and 'axes' must be mappings")
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SimInputError(f"sweep spec: axis {name!r} must be a non-empty list")
    count = 1
    for values in axes.values():  # stop at the cap: 15,000 two-value axes make a number too long to print
        count *= len(values)
        if count > MAX_POINTS:
            raise SimInputError(f"sweep spec: its axes make more than {MAX_POINTS:,} points (split the sweep)")
    _refuse_keys_set_twice(fixed, axes)
    points: dict[str, SweepPoint] = {}
    digests: dict[tuple, str] = {}  # input files read once for every point that names them
    for combo in itertools.product(*axes.values()):
        raw: dict[str, Any] = {}
        for name, value in fixed.items():
            _put(raw, name, value)
        for name, value in zip(axes, combo, strict=True):
            if isinstance(value, dict) and name not in MAPPING_SETTINGS:
                for key, item in value.items():
                    _put(raw, key, item)
            else:
                _put(raw, name, value)
        point = resolve_point(raw, digests)
        points.setdefault(point.key, point)
    return list(points.values())


def _put(raw: dict[str, Any], name: str, value: Any) -> None:
    """Set a point's key; a mapping setting (`policy_options`, `system_settings`) merges into what is there."""
    if name in MAPPING_SETTINGS and value is None:  # null: no settings, as {} (not a reset of fixed:'s)
        value = {}
    if name in MAPPING_SETTINGS and isinstance(value, dict) and isinstance(raw.get(name), dict):
        raw[name] = {**raw[name], **value}
    else:
        raw[name] = dict(value) if isinstance(value, dict) else value


def _keys_set(name: str, value: Any) -> set[str]:
    """The keys a spec entry sets: its name; a mapping setting's own keys (`policy_options.coalesce`); or, for a
    mapping on another axis (several keys varied together), the keys it holds."""
    if name in MAPPING_SETTINGS:
        if value is None:
            return set()
        return {f"{name}.{k}" for k in value} if isinstance(value, dict) else {name}
    if isinstance(value, dict):
        return set().union(*(_keys_set(k, v) for k, v in value.items()))
    return {name}


def _refuse_keys_set_twice(fixed: dict[str, Any], axes: dict[str, list]) -> None:
    """A key given in `fixed:` and by an axis, or by two axes, would leave one value silently unused (the later
    one won): refused, naming the key and both places. Every value of one axis meets every value of the others,
    so any overlap between two places clashes at some point."""
    owners: dict[str, str] = {}
    places = [("fixed:", _keys_set_all(fixed.items()))]
    places += [(f"axis {name!r}", _keys_set_all((name, v) for v in values)) for name, values in axes.items()]
    for place, keys in places:
        for key in sorted(keys):
            if key in owners:
                raise SimInputError(f"sweep spec: {key!r} is set both by {owners[key]} and by {place}; give it in "
                                    "one place")
            owners[key] = place


def _keys_set_all(entries: Any) -> set[str]:
    out: set[str] = set()
    for name, value in entries:
        out |= _keys_set(name, value)
    return out


def load_spec(path: str | Path) -> list[SweepPoint]:
    """Read and expand a YAML (or JSON) sweep spec; any problem is one SimInputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SimInputError(f"sweep spec not found: {path}")
    try:
        spec = load_yaml(read_text_bounded(path, "sweep spec"))
    except UnicodeDecodeError:
        raise SimInputError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise SimInputError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    try:
        return expand(spec)
    except SimInputError as exc:
        raise SimInputError(f"{path}: {exc}") from None
