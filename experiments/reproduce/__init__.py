"""`coxmoe reproduce NAME`: the paper's figures and tables from simulator (and executor) output.

Each module here has `reproduce(options) -> Reproduction`: it runs what it needs, writes PNG + PDF + CSV into
`options.out`, and returns the numbers with the paper's claim beside them. `report.py` runs them all and writes a
Markdown report.
"""

from __future__ import annotations

import importlib
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sim.errors import SimInputError
from sim.specs import SystemSpec, load_system
from sim.specs.overrides import apply_system_settings

if TYPE_CHECKING:  # the CLI reads FIGURES when building its parser; keep that import light
    import pandas as pd

# name (also its module here) -> one-line description, shown by `coxmoe reproduce --help`
FIGURES: dict[str, str] = {
    "fig7": "throughput of FlexGen, MoE-Lightning and CoX-MoE, 3 models x 3 systems x 4 workloads",
    "table3": "the ablation from MoE-Lightning to CoX-MoE, step by step",
    "microbatch": "expert and non-expert latency against micro-batch size (the motivation)",
    "vram": "VRAM breakdown with decode attention on the GPU and on the CPU",
    "eas": "expert hit ratio of expert-aware stratification against random and oracle residency",
    "calibration": "simulator predictions against executor measurements on this machine",
    "timeline": "Gantt of one decode step per resource (simulated; measured when a record is given)",
    "validation": "predicted against published measurements (MoE-Lightning HELM runs, ...), learned factors held out",
    "beyond": "beyond the paper: split experts, MoE-Gen, TriMoE, MoE-Lightning at native, INT8 and INT4 experts",
}


# figures that run on their own machines, so `--set` leaves them alone (published measurements; this machine)
UNSET_FIGURES = ("calibration", "validation")
# the machines each other figure simulates (each module's own constants; a test keeps the two in step), so a
# `--set` is checked against the figures about to run before any of them does
FIGURE_SYSTEMS: dict[str, tuple[str, ...]] = {
    "fig7": ("rtx6000ada-8452y", "a100-80g-8452y", "h100-80g-8452y"), "table3": ("rtx6000ada-8452y",),
    "microbatch": ("rtx6000ada-8452y",), "vram": ("rtx6000ada-8452y",), "eas": ("rtx6000ada-8452y",),
    "timeline": ("rtx6000ada-8452y",), "beyond": ("a100-80g-8452y-ndp8",)}


# The figure each of reproduce's own options is for (the CLI refuses one given to another figure; a command line
# names those its figure uses).
FIGURE_OPTIONS = {"workers": "fig7", "engine": "fig7", "ray_address": "fig7", "profile": "calibration",
                  "record": "timeline", "points": "validation"}


@dataclass(frozen=True)
class ReproduceOptions:
    out: Path
    quick: bool = False  # a small grid that still exercises every step (tests, smoke runs)
    workers: int = 1
    engine: str = "local"
    ray_address: str | None = None
    profile: Path | None = None  # calibration: an existing `coxmoe calibrate profile` directory
    record: Path | None = None  # timeline: a measured timeline from `coxmoe execute --timeline`
    seed: int = 0
    keep: tuple[str, ...] = ()  # all: figures not rerun, carried from the report already in `out`
    # (path, value) numbers of the system spec set on every simulated paper figure's machine (`--set`); validation
    # and calibration keep their own machines (published and measured ones)
    system_settings: tuple[tuple[str, str], ...] = ()
    # validation: only the points whose id or group matches one of these shell-style patterns (all when empty)
    points: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Check the input files up front, so `reproduce all` fails before its long figures, not after."""
        if self.profile is not None and not (self.profile / "profile.json").is_file():
            raise SimInputError(f"--profile {self.profile}: no profile.json there (coxmoe calibrate profile makes "
                                "one)")
        if self.record is not None and not self.record.is_file():
            raise SimInputError(f"--record {self.record}: no such file (coxmoe execute --timeline writes one)")
        unknown = [k for k in self.keep if k not in FIGURES]
        if unknown:
            raise SimInputError(f"--keep {unknown[0]}: unknown figure; known: {', '.join(FIGURES)}")
        if self.system_settings and self.keep:
            raise SimInputError("--set with --keep: the kept figures were made without these settings; rerun them "
                                "all")

    def check_settings(self, names: list[str]) -> None:
        """Refuse `--set` for figures about to run that it cannot apply to, before any of them runs: a figure on
        its own machines when asked for alone, and any figure's machine the setting does not fit."""
        if not self.system_settings:
            return
        if len(names) == 1 and names[0] in UNSET_FIGURES:
            raise SimInputError(f"--set: {names[0]} keeps its own machines (published or this one); drop --set")
        for name in names:
            for system in FIGURE_SYSTEMS.get(name, ()):
                try:
                    self.system(system)
                except SimInputError as exc:
                    raise SimInputError(f"{name}: {exc}") from None

    @property
    def settings(self) -> dict[str, str]:
        return dict(self.system_settings)

    def system(self, name: str) -> SystemSpec:
        """A paper figure's machine with the `--set` numbers applied."""
        return apply_system_settings(load_system(name), self.settings)

    def command(self, name: str) -> str:
        """The command line that makes figure `name` (or `all`) with these options; flags a figure ignores are
        left out."""
        wanted = {f for f, figure in FIGURE_OPTIONS.items() if name in ("all", figure)}
        parts = ["coxmoe reproduce", name, "--out", shlex.quote(str(self.out))]
        if self.quick:
            parts.append("--quick")
        if "workers" in wanted and self.workers != 1:
            parts += ["--workers", str(self.workers)]
        if "engine" in wanted and self.engine != "local":
            parts += ["--engine", self.engine]
        if "profile" in wanted and self.profile:
            parts += ["--profile", shlex.quote(str(self.profile))]
        if "record" in wanted and self.record:
            parts += ["--record", shlex.quote(str(self.record))]
        if "points" in wanted:
            parts += [f"--points {shlex.quote(pattern)}" for pattern in self.points]
        if self.seed:
            parts += ["--seed", str(self.seed)]
        if name == "all":
            parts += [f"--keep {k}" for k in self.keep]
        if name not in UNSET_FIGURES:
            parts += [f"--set {shlex.quote(f'{k}={v}')}" for k, v in self.system_settings]
        return " ".join(parts)


@dataclass
class Reproduction:
    """What one figure produced: its table (also the CSV), the files written, and the result beside the claim."""

    name: str
    title: str
    claim: str
    finding: str
    table: pd.DataFrame
    files: list[Path] = field(default_factory=list)
    command: str = ""
    note: str = ""  # how the numbers were made, when the command's wall time alone would mislead


def reproduce(name: str, options: ReproduceOptions, settings_checked: bool = False) -> Reproduction:
    """One figure; `settings_checked` when `reproduce_all` already checked `--set` for every figure it runs."""
    if name not in FIGURES:
        raise SimInputError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}, all")
    if not settings_checked:
        options.check_settings([name])
    module = importlib.import_module(f"experiments.reproduce.{name}")
    result: Reproduction = module.reproduce(options)
    result.command = options.command(name)
    return result
