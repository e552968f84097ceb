"""One simulation point as one frozen object: `SimConfig` names everything `simulate()` needs as data.

The CLI's flags (`experiments/cli/config_flags.py`) and a sweep point's keys (`experiments/sweep/spec.py`) are
generated from its fields, so a new setting is one field here, with its help text and its parser, and every
front end knows it. Each field's metadata carries:

    help    the flag's help text (also the field's documentation)
    parse   text -> value for the CLI (raises ValueError with a message that names the rule)
    flag    the CLI flag when it is not `--field-name`; `file_flag`: a mutually exclusive `--X-file` twin
    group   which commands take it: "target" (model, system), "policy", "workload", "cost"
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.errors import SimInputError
from sim.specs.model import EXPERT_PRECISIONS


def refuse_seed_with_trace(config: SimConfig) -> None:
    """Where `--seed` only draws synthetic routing and lengths (every simulate-only command, sweep points), a seed
    beside a trace, which brings its own, is refused (the executor's seed also seeds its weights: it may)."""
    if config.trace is not None and config.seed:
        raise SimInputError(f"--seed {config.seed} draws synthetic routing and lengths; a trace brings its own "
                            "(omit --seed)")


def option_text(value: Any) -> str:
    """A policy option's value as the CLI spells it: a YAML boolean (`coalesce: off` reads as false) as on / off,
    which both the on/off options and the boolean ones take, so either spelling makes one point."""
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def default_workers() -> int:
    """The CPUs this process may use: how many processes `compare`, `ablation` and local sweeps run by default."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


LENGTH_FORMS = ("fixed", "uniform", "lognormal", "preset")
# what `point()` leaves out while at these values: settings added later hash as before at their default
OMITTED_DEFAULTS: dict[str, Any] = {"expert_precision": "model", "system_settings": {}}
# `expert_precision`: the model's own (a model file may say int8), or one of EXPERT_PRECISIONS forced
CONFIG_EXPERT_PRECISIONS = ("model", *EXPERT_PRECISIONS)
MAPPING_SETTINGS = ("policy_options", "system_settings")  # KEY=VALUE settings (repeatable flags, mappings in files)


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """A parser for an integer >= low (and <= high when given; a ValueError names the bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise ValueError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise ValueError(f"must be at most {high}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
seed_int = int_at_least(0, 2**64 - 1)  # numpy and torch both take seeds below 2^64 (torch raised past it)


def length(text: str) -> int | str:
    """A length: a positive integer, or a distribution spec (checked when the lengths are drawn)."""
    if str(text).split(":", 1)[0] in LENGTH_FORMS:
        return str(text)
    return positive_int(text)


def probability(text: str) -> float:
    """A number in [0, 1]."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1], got {value}")
    return value


def _setting(default: Any = dataclasses.MISSING, *, help: str, group: str, parse: Callable[[str], Any] | None = None,
             flag: str | None = None, metavar: str | None = None, file_flag: tuple[str, str] | None = None,
             exclusive: str | None = None, factory: Callable[[], Any] | None = None) -> Any:
    meta = {"help": help, "group": group, "parse": parse, "flag": flag, "metavar": metavar, "file_flag": file_flag,
            "exclusive": exclusive}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, eq=True)
class SimConfig:
    """A (model, system, policy, workload, routing, cost model) point. Names are preset names or file paths
    (specs and traces as objects are accepted too, for the Python API); `point()` is its JSON form."""

    model: Any = _setting(help="model preset (see `coxmoe presets`)", group="target",
                          file_flag=("--model-file", "model spec YAML/JSON, or a Hugging Face config.json"))
    system: Any = _setting(help="system preset (see `coxmoe presets`)", group="target",
                           file_flag=("--system-file", "system spec YAML/JSON (e.g. edited `presets --show` output)"))
    policy: str = _setting("stream-experts", help="policy name (see `coxmoe policies`; CoX-MoE is `--policy coxmoe`)",
                           group="policy")
    batch: int | None = _setting(None, help="requests in the batch (default: all of --trace)", group="workload",
                                 parse=positive_int)
    prompt_len: int | str | None = _setting(
        None, group="workload", parse=length,
        help="prompt tokens per request: N, or a distribution uniform:LO:HI, lognormal:MEDIAN:SIGMA[:MAX] or "
             "preset:NAME of a published workload (`coxmoe presets --lengths`; drawn per request, seeded by --seed)")
    gen_len: int | str | None = _setting(
        None, group="workload", parse=length,
        help="generated tokens per request, same forms as --prompt-len (a distribution: requests finish at "
             "different steps)")
    policy_options: Mapping[str, str] = _setting(
        help="policy option; repeatable", group="policy", flag="--policy-opt", metavar="KEY=VALUE", factory=dict)
    trace: Any = _setting(None, help="routing trace file (.npz, format v1); lengths come from it", group="workload",
                          exclusive="routing")
    routing: str = _setting(
        "uniform", group="workload", exclusive="trace",
        help="synthetic routing: uniform, zipf:ALPHA, table:NAME or preset:NAME (tuned to published statistics: "
             "mixtral-8x7b, qwen3-30b-a3b, deepseek-v2-lite)")
    reuse_prob: float = _setting(0.0, group="workload", parse=probability,
                                 help="synthetic routing: probability a token reuses the previous token's experts")
    seed: int = _setting(0, help="seed of the synthetic routing", group="workload", parse=seed_int)
    decode_sample: int = _setting(
        0, group="workload", parse=nonneg_int, metavar="N",
        help="simulate N evenly spaced decode steps and scale decode time to all (0: every step)")
    profile: Any = _setting(None, group="cost", metavar="DIR",
                            help="op times from a measured profile (coxmoe calibrate profile); the roofline outside it")
    expert_precision: str = _setting(
        "model", group="target", metavar="{model,native,int8,int4}",
        help="routed experts' weights: as the model spec says (model, the default), its dtype (native), INT8 (W8A8: "
             "AMX-INT8 / INT8 tensor cores) or INT4 (weight-only, group 128); bytes and compute rates follow, "
             "accuracy is out of scope")
    system_settings: Mapping[str, str] = _setting(
        help="set a number of the system spec by its path, as `coxmoe presets --show` prints it (e.g. "
             "cpu.amx_efficiency=0.073, gpu.gemm_efficiency=0.6, link.h2d_efficiency=0.5, dram_bytes=...); "
             "repeatable; the system's name records it", group="target", flag="--set", metavar="FIELD=VALUE",
        factory=dict)

    def __post_init__(self) -> None:
        if self.model is None or self.system is None or self.model == "" or self.system == "":
            raise SimInputError("a simulation needs a model and a system")
        for name, what in (("policy_options", "policy option"), ("system_settings", "system setting")):
            opts = getattr(self, name) or {}
            if not isinstance(opts, Mapping):
                raise SimInputError(f"{what}s must be a mapping of KEY to VALUE, got {opts!r}")
            for key, value in opts.items():
                if value is None or isinstance(value, Mapping | list | tuple):
                    raise SimInputError(f"{what} {key}: needs a value (a string, number or boolean), got "
                                        f"{value!r}")
            self._set(name, {str(k): option_text(v) for k, v in sorted(opts.items(), key=lambda kv: str(kv[0]))})
        for name in ("batch", "seed", "decode_sample"):
            low = 1 if name == "batch" else 0
            value = getattr(self, name)
            if value is None and name == "batch":
                continue
            self._set(name, self._integer(name, value, low, f"an integer >= {low}"))
        for name in ("prompt_len", "gen_len"):
            value = getattr(self, name)
            if value is None or isinstance(value, str) and value.split(":", 1)[0] in LENGTH_FORMS:
                continue
            forms = ", ".join(f + ":..." for f in LENGTH_FORMS)
            self._set(name, self._integer(name, value, 1, f"an integer >= 1 or a distribution ({forms})"))
        rp = self.reuse_prob
        if isinstance(rp, str):
            with contextlib.suppress(ValueError):  # not a number: refused below, naming it
                rp = probability(rp)
        if isinstance(rp, np.integer | np.floating):
            rp = float(rp)
        if isinstance(rp, bool) or not isinstance(rp, int | float) or not math.isfinite(rp) or not 0 <= rp <= 1:
            raise SimInputError(f"reuse_prob must be a number in [0, 1], got {self.reuse_prob!r}")
        self._set("reuse_prob", float(rp))  # 0 and 0.0 are one point (one sweep key)
        if not isinstance(self.policy, str) or not self.policy:
            raise SimInputError(f"policy must be a policy name, got {self.policy!r}")
        if not isinstance(self.routing, str):
            raise SimInputError(f"routing must be a string, got {self.routing!r}")
        if self.expert_precision not in CONFIG_EXPERT_PRECISIONS:
            raise SimInputError(f"expert_precision must be one of {', '.join(CONFIG_EXPERT_PRECISIONS)}, got "
                                f"{self.expert_precision!r}")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # normalising a field of a frozen instance while it is built

    @staticmethod
    def _integer(name: str, value: Any, low: int, rule: str) -> int:
        """An integer setting: Python or NumPy integers, or their decimal text ("128" from a sweep file)."""
        if isinstance(value, np.integer):
            value = int(value)
        elif isinstance(value, str) and value.strip().lstrip("+").isascii() and value.strip().lstrip("+").isdigit():
            with contextlib.suppress(ValueError):  # past Python's digit limit: stays text, refused below
                value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SimInputError(f"{name} must be {rule}, got {value!r}")
        return value

    def __hash__(self) -> int:
        """Hashable although `policy_options` is a dict (and a trace object may stand in a field)."""
        def frozen(v: Any) -> Any:
            if isinstance(v, Mapping):
                return tuple(sorted(v.items()))
            try:
                hash(v)
            except TypeError:
                return id(v)
            return v

        return hash(tuple(frozen(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def replace(self, **changes: Any) -> SimConfig:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def point(self) -> dict[str, Any]:
        """The JSON form: every field (what a sweep point hashes). Paths become strings; a spec or trace
        object has no JSON form (name it by preset or file instead)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in OMITTED_DEFAULTS and value == OMITTED_DEFAULTS[f.name]:
                continue  # settings added later hash as before while at their default
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            elif not isinstance(value, str | int | float | type(None)):
                raise SimInputError(f"{f.name}: a {type(value).__name__} object has no JSON form; give a preset "
                                    "name or a file path")
            out[f.name] = value
        return out

    @classmethod
    def from_point(cls, data: Mapping[str, Any]) -> SimConfig:
        """A config from a mapping of field names (a sweep point, a JSON object): unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise SimInputError(f"a simulation point must be a mapping of settings, got {type(data).__name__}")
        unknown = set(data) - set(FIELD_NAMES)
        if unknown:
            raise SimInputError(f"unknown setting(s) {', '.join(repr(k) for k in sorted(unknown, key=str))}; "
                                f"known: {', '.join(FIELD_NAMES)}")
        missing = [k for k in ("model", "system") if k not in data]
        if missing:
            raise SimInputError(f"a simulation point needs {' and '.join(missing)}")
        return cls(**data)


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SimConfig))
DEFAULTS: dict[str, Any] = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING
                                     else None if f.default is dataclasses.MISSING else f.default)
                            for f in dataclasses.fields(SimConfig)}


def settings(group: str | None = None) -> tuple[dataclasses.Field, ...]:
    """The config's fields (of one group), in declaration order, with their metadata."""
    return tuple(f for f in dataclasses.fields(SimConfig) if group is None or f.metadata["group"] == group)
