"""The validation point format: one published measurement, checked at the boundary with pydantic.

A points file is YAML with an optional `defaults` mapping (merged under every point) and a `points` list. Each
point names the system and model (presets or spec files), the workload as it ran (padded lengths where the
system pads), the policy with its knobs translated into this simulator's option names and the original command
line verbatim, the metric with its value, the source, and whether the point is complete. A malformed file is a
one-line `SimInputError` naming the file, the point and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sim.errors import SimInputError, named
from sim.specs.catalog import load_yaml

POINTS_DIR = Path(__file__).with_name("points")
MAX_BATCH = 1 << 20
MAX_TOKENS = 1 << 20

Metric = Literal["e2e_gen_tok_s", "e2e_total_tok_s", "prefill_tok_s", "decode_tok_s"]
METRIC_DEFINITIONS: dict[str, str] = {
    "e2e_gen_tok_s": "generated tokens / (prefill + decode time)",
    "e2e_total_tok_s": "(prompt + generated tokens) / (prefill + decode time)",
    "prefill_tok_s": "prompt tokens / prefill time",
    "decode_tok_s": "tokens the decode steps generate (every generated token but each request's first, which the "
                    "prefill makes) / decode time (all requests together)",
}
Knob = str | int | float | bool


class _Strict(BaseModel):
    # strict: a boolean or a quoted number is refused where a number belongs (YAML's `true` is not a batch of 1)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PointWorkload(_Strict):
    """The batch as it ran: `prompt_len` is the length every request occupies (the padded length where the
    system pads); `prompt_len_mean` / `prompt_len_max` describe the real prompts when published."""

    batch: Annotated[int, Field(ge=1, le=MAX_BATCH)]
    prompt_len: Annotated[int, Field(ge=1, le=MAX_TOKENS)]
    gen_len: Annotated[int, Field(ge=1, le=MAX_TOKENS)]
    padding: Literal["none", "max"] = "none"
    prompt_len_mean: Annotated[float, Field(gt=0, le=MAX_TOKENS)] | None = None
    prompt_len_max: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    dataset: str = ""


class ValidationPoint(_Strict):
    """One published measurement and everything needed to simulate it."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    group: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    system: Annotated[str, Field(min_length=1, max_length=200)]
    model: Annotated[str, Field(min_length=1, max_length=200)]
    precision: Literal["fp16", "bf16"]
    workload: PointWorkload
    policy: Annotated[str, Field(min_length=1, max_length=64)]
    # The implementation that measured the point (FlexGen's MoE port and FlexLLMGen are different code under one
    # policy); learned framework factors are fitted per framework and machine parts. Empty: the policy's name.
    framework: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")] | None = None
    knobs: dict[str, Knob] = {}
    search_knobs: dict[str, Knob] = {}
    published_knobs: str = ""
    routing: str = "table:mixtral-8x7b"
    metric: Metric
    value: Annotated[float, Field(ge=1e-9, lt=1e12)]  # a rate: its implied run time stays finite
    source: Annotated[str, Field(min_length=1)]
    status: Literal["complete", "incomplete", "unsupported"]
    missing: str = ""
    train: bool = False
    note: str = ""

    @property
    def runtime(self) -> str:
        """The framework whose learned factors apply to this point."""
        return self.framework or self.policy

    @model_validator(mode="after")
    def _incomplete_says_why(self) -> ValidationPoint:
        if self.status != "complete" and not self.missing:
            raise ValueError(f"status {self.status} needs `missing`: what is unknown or not modelled")
        if self.metric == "decode_tok_s" and self.workload.gen_len < 2:
            raise ValueError("metric decode_tok_s needs workload gen_len >= 2 (with one generated token there is "
                             "no decode step)")
        return self


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(named(p) for p in err["loc"]) or "point"  # (a key such as "\n" quoted: one line)
    return f"{where}: {err['msg']}"


def load_points_file(path: Path) -> list[ValidationPoint]:
    """The points of one YAML file, each with the file's defaults merged under it."""
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SimInputError(f"validation points {path}: cannot read: {first}") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise SimInputError(f"validation points {path}: expected a mapping with a `points` list")
    unknown = sorted(named(k) for k in data if k not in ("defaults", "points"))
    if unknown:
        raise SimInputError(f"validation points {path}: unknown top-level key {unknown[0]} (a points file holds "
                            "`defaults` and `points`)")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise SimInputError(f"validation points {path}: `defaults` must be a mapping")
    out = []
    for i, raw in enumerate(data["points"]):
        if not isinstance(raw, dict):
            raise SimInputError(f"validation points {path}: point {i} is not a mapping")
        merged = {**defaults, **raw}
        if isinstance(defaults.get("workload"), dict) and isinstance(raw.get("workload"), dict):
            merged["workload"] = {**defaults["workload"], **raw["workload"]}
        try:
            out.append(ValidationPoint.model_validate(merged))
        except ValidationError as exc:
            name = named(raw.get("id", f"#{i}"))
            raise SimInputError(f"validation points {path}: point {name}: {_format_error(exc)}") from None
    return out


def load_points(directory: Path = POINTS_DIR) -> list[ValidationPoint]:
    """Every point under `directory` (sorted by file name, then file order); ids must be unique."""
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise SimInputError(f"no validation points (*.yaml) in {directory}")
    points = [p for f in files for p in load_points_file(f)]
    seen: set[str] = set()
    for p in points:
        if p.id in seen:
            raise SimInputError(f"validation points: duplicate id {p.id!r}")
        seen.add(p.id)
    return points
