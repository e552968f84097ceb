"""Numbers of a system spec set from the command line or a sweep (`--set cpu.amx_efficiency=0.073`): how a user
asks how much a result rests on one constant without writing a spec file.

A setting names a numeric field by its path in the spec as `coxmoe presets --show` prints it (`dram_bytes`,
`gpu.gemm_efficiency`, `cpu.amx_efficiency`, `link.h2d_efficiency`, `ndp.compute_efficiency`, ...). The system is
rebuilt through the same schema as a spec file, so a value out of range is refused as one would be there. The
result's name records every setting and each changed field's `sources` entry says it was set by hand. On a
machine with several GPUs, `gpu.`, `link.` and `gpu_reserved_bytes` settings are refused (they would reach the
first GPU only), and an AMX setting on a CPU without AMX is refused (it would do nothing). Under `--profile`,
measured op times replace the rates a setting changes for the ops the profile covers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from sim.errors import SimInputError
from sim.specs.catalog import build_system
from sim.specs.hardware import SystemSpec

SECTIONS = ("gpu", "cpu", "link", "ndp", "disk")  # nested specs a setting may reach into (one level)


def _number(path: str, text: str, current: Any, flag: str = "--set") -> int | float:
    """The value of setting `path`: an integer for an integer field, else a finite float."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise SimInputError(f"{flag} {path!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SimInputError(f"{flag} {path!r}: needs a finite number, got {text!r}")
    if isinstance(current, int):
        if value != int(value):
            raise SimInputError(f"{flag} {path!r}: a whole number, got {text!r}")
        return int(value)
    return value


def _optional_numbers(spec: Any) -> dict[str, type]:
    """A spec's optional numeric fields and their type (None until set: `cpu.attention_overhead_s` falls back to
    another field until then)."""
    types = {"float | None": float, "int | None": int}
    return {f.name: types[str(f.type)] for f in dataclasses.fields(spec) if str(f.type) in types}


def _numeric_fields(data: Mapping[str, Any], optional: Mapping[str, type]) -> list[str]:
    """Fields holding a number, and optional numeric fields left unset."""
    return sorted(k for k, v in data.items()
                  if (isinstance(v, int | float) and not isinstance(v, bool)) or (v is None and k in optional))


def apply_system_settings(system: SystemSpec, settings: Mapping[str, str], flag: str = "--set") -> SystemSpec:
    """`system` with the numeric fields that `settings` names (path -> value text) set; unchanged when empty.
    `flag` is how errors name where the settings came from (`--vary` for a sensitivity run, a sweep's
    `system_settings`)."""
    if not settings:
        return system
    data = dataclasses.asdict(system)
    applied: list[str] = []
    for path, text in sorted(settings.items()):
        section, _, field = path.rpartition(".")
        if section and section not in SECTIONS:
            raise SimInputError(f"{flag} {path!r}: the section must be one of {', '.join(SECTIONS)} (or none for the "
                                f"system's own fields)")
        owner = data if not section else data.get(section)
        if not isinstance(owner, dict):
            raise SimInputError(f"{flag} {path!r}: system {system.name} has no {section}")
        optional = _optional_numbers(getattr(system, section) if section else system)
        if field not in _numeric_fields(owner, optional):
            raise SimInputError(f"{flag} {path!r}: not a numeric field of {section or 'the system'}; choose from "
                                f"{', '.join(_numeric_fields(owner, optional))}")
        first_gpus = section in ("gpu", "link") or (not section and field == "gpu_reserved_bytes")
        if first_gpus and system.extra_gpus:  # each extra GPU has its own spec, link and reservation
            raise SimInputError(f"{flag} {path!r}: system {system.name} has {1 + len(system.extra_gpus)} GPUs and "
                                f"{flag} reaches only the first one's {section or 'reservation'}; describe the machine "
                                "in a system file (`coxmoe presets --show NAME`) instead")
        if section == "cpu" and field == "cores":
            raise SimInputError(f"{flag} {path!r}: a descriptive field (the CPU's rates already count its cores), so "
                                "the setting would do nothing; set amx_bf16_flops_per_s, avx512_bf16_flops_per_s or "
                                "dram_bytes_per_s instead")
        if section == "cpu" and field.startswith("amx_") and not system.cpu.has_amx:
            raise SimInputError(f"{flag} {path!r}: cpu {system.cpu.name} has no AMX, so the setting would do nothing")
        current = owner[field]
        if current is None:  # an unset optional field: its declared type decides
            current = optional[field]()
        owner[field] = _number(path, text, current, flag)
        sources = owner.setdefault("sources", {})
        sources[field] = f"set by hand ({flag} {path}={owner[field]}); was {sources.get(field, 'unsourced')}"
        value = owner[field]
        huge = isinstance(value, int | float) and abs(value) >= 1e18  # out of every range: shown short in the error
        applied.append(f"{path}={value:g}" if huge else f"{path}={value}")
    name = f"{system.name}[{','.join(applied)}]"
    data["name"] = name
    return build_system(name, data, f"system {system.name} with {flag}")


def normalised_settings(system: SystemSpec, settings: Mapping[str, str], flag: str = "--set") -> dict[str, str]:
    """The settings as the numbers they parse to (`0.0730` and `0.073` alike), after checking them against
    `system`: what a sweep keys its points by."""
    built = apply_system_settings(system, settings, flag)
    out = {}
    for path in settings:
        section, _, field = path.rpartition(".")
        out[path] = str(getattr(getattr(built, section) if section else built, field))
    return out
