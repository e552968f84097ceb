"""The boundary of every spec: a mapping from a preset, a YAML/JSON file or a Hugging Face config becomes a
dataclass only through `validate_spec`, which checks it with pydantic against the dataclass's own annotations
(integers without a fraction, finite numbers, the literal choices, mappings of strings) and then runs the
dataclass's physical checks. Any problem is one `SimInputError` line naming where, which field and why; an
unknown field is named with the nearest known one."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from functools import cache
from typing import Any, TypeVar, get_type_hints

from pydantic import TypeAdapter, ValidationError

from sim.errors import SimInputError, brief, named

T = TypeVar("T")


@cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


@cache
def _typed_fields(cls: type, kinds: tuple[type, ...]) -> dict[str, type]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if hints[f.name] in kinds}


def _numeric_fields(cls: type) -> dict[str, type]:
    return _typed_fields(cls, (int, float))


def _normalise(cls: type, fields: dict[str, Any], where: str, aliases: dict[str, str]) -> dict[str, Any]:
    """YAML 1.1 reads `65e12` as a string: numeric strings become numbers (then validated like any number);
    a boolean is never a number and a flag is only true or false (not "yes" or 1); `sources` notes may be
    numbers (a year) and are kept as text."""
    out = dict(fields)
    label = out.get("name")
    if isinstance(label, str) and not label.isprintable():  # it is quoted in every later message
        raise SimInputError(f"{where}: name must be printable text on one line, got {brief(label)}")
    for name in _typed_fields(cls, (bool,)):
        if name in out and not isinstance(out[name], bool):
            raise SimInputError(f"{where}: {aliases.get(name, name)}: expected true or false, got {brief(out[name])}")
    if isinstance(out.get("sources"), dict):
        for key, note in out["sources"].items():  # text or a number: a nested structure (an alias bomb) is refused
            if isinstance(note, bool) or not isinstance(note, str | int | float):
                raise SimInputError(f"{where}: sources: the note for {str(key)[:40]!r} must be text or a number, got "
                                    f"a {type(note).__name__}")
        out["sources"] = {str(k): v if isinstance(v, str) else str(v) for k, v in out["sources"].items()}
    for name, kind in _numeric_fields(cls).items():
        value = out.get(name)
        shown_name = aliases.get(name, name)
        if isinstance(value, bool):
            raise SimInputError(f"{where}: {shown_name}: expected a number, got {brief(value)}")
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise SimInputError(f"{where}: {shown_name}: expected a number, got {brief(value)}") from None
            if not math.isfinite(number):
                raise SimInputError(f"{where}: {shown_name}: must be a finite number, got {brief(value)}")
            out[name] = int(number) if kind is int and number == int(number) else number
    return out


def _renamed(text: str, aliases: dict[str, str]) -> str:
    """A message with each field name the input called otherwise (a Hugging Face config's keys) in its input's
    words: `top_k 9 exceeds num_experts 8` reads `num_experts_per_tok 9 exceeds num_local_experts 8`."""
    if not aliases:
        return text
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(aliases, key=len, reverse=True))) + r")\b")
    return pattern.sub(lambda m: aliases[m.group(1)], text)


def _message(exc: ValidationError, where: str, aliases: dict[str, str]) -> str:
    err = exc.errors()[0]
    loc = ".".join(aliases.get(str(p), named(p)) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] in ("missing", "missing_argument"):
        return f"{where}: missing field {loc}"
    if err["type"] == "value_error":  # the dataclass's own physical check, worded with its field names
        return f"{where}: {_renamed(msg, aliases)}"
    got = err.get("input")
    shown = "" if isinstance(got, dict | list) else f", got {brief(got)}"
    return f"{where}: {loc}: {msg}{shown}"


def validate_spec(cls: type[T], fields: dict[str, Any], where: str, aliases: dict[str, str] | None = None) -> T:
    """`cls` built from `fields`, checked at the boundary (see the module docstring). `aliases` names a field
    in messages as its input called it (a Hugging Face config's keys)."""
    if not isinstance(fields, dict):
        raise SimInputError(f"{where}: expected a mapping of fields, got {type(fields).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in fields:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            if cls.__name__ == "ModelSpec" and {"gpu", "cpu"} <= set(fields):
                hint = " (this looks like a system spec: give it to --system-file)"
            elif cls.__name__ == "SystemSpec" and {"num_layers", "hidden_size"} <= set(fields):
                hint = " (this looks like a model spec: give it to --model-file)"
            raise SimInputError(f"{where}: unknown field {key!r} for {cls.__name__}{hint}")
    try:
        return _adapter(cls).validate_python(_normalise(cls, fields, where, aliases or {}))
    except ValidationError as exc:
        raise SimInputError(_message(exc, where, aliases or {})) from None
