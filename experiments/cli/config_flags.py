"""CLI flags generated from `sim.config.SimConfig`: one field, one flag (or a preset/file pair), same help text,
same parser. A command picks the groups it takes and may change a default; `config_from_args` reads them back."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from sim.config import MAPPING_SETTINGS, SimConfig, refuse_seed_with_trace, settings
from sim.policies import parse_kv_pairs
from sim.specs.catalog import as_spec_path


def arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A `sim.config` parser as an argparse type: its ValueError becomes argparse's one-line usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in its messages
    return convert


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, groups: Iterable[str], *, defaults: dict[str, Any] | None = None,
                     exclude: Iterable[str] = ()) -> None:
    """Add the flags of every `SimConfig` field in `groups` but `exclude`. `defaults` overrides a field's default
    (shown in its help); a target (model, system) is required unless it has a default here."""
    defaults = defaults or {}
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    skipped = set(exclude)
    for f in (f for g in groups for f in settings(g) if f.name not in skipped):
        meta = f.metadata
        help_text = meta["help"]
        if f.name in defaults:
            help_text += f" (default {defaults[f.name]})"
        elif f.name == "policy":
            help_text += f" (default {f.default}, the plain offloading baseline)"
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if f.name in MAPPING_SETTINGS:
            parser.add_argument(flag_of(f), action="append", **kwargs)
            continue
        if meta["parse"] is not None:
            kwargs["type"] = arg_type(meta["parse"])
        default = defaults.get(f.name, None if f.default is dataclasses.MISSING else f.default)
        if meta["file_flag"]:  # --model NAME | --model-file PATH
            required = f.name not in defaults
            group = parser.add_mutually_exclusive_group(required=required)
            group.add_argument(flag_of(f), default=default, **kwargs)
            file_flag, file_help = meta["file_flag"]
            group.add_argument(file_flag, dest=f.name + "_file", help=file_help)
            continue
        partner = meta["exclusive"]
        if partner:
            group = exclusive.get(partner) or parser.add_mutually_exclusive_group()
            exclusive[f.name] = group
            group.add_argument(flag_of(f), default=default, **kwargs)
            continue
        parser.add_argument(flag_of(f), default=default, **kwargs)


def simulation_config(args: argparse.Namespace) -> SimConfig:
    """`config_from_args` for the commands that only simulate (simulate, compare, ablation, sensitivity): there
    `--seed` only draws synthetic routing and lengths, so beside `--trace`, which brings its own, it is refused
    (the executor's `--seed` also seeds its weights, and stays allowed)."""
    config = config_from_args(args)
    refuse_seed_with_trace(config)
    return config


def config_from_args(args: argparse.Namespace, **overrides: Any) -> SimConfig:
    """The `SimConfig` a parsed command line names (fields the command has no flag for keep their defaults)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(SimConfig):
        if f.metadata["file_flag"] and getattr(args, f.name + "_file", None):
            values[f.name] = as_spec_path(getattr(args, f.name + "_file"))  # a file, never a preset name
        elif f.name in MAPPING_SETTINGS and hasattr(args, f.name):
            values[f.name] = parse_kv_pairs(getattr(args, f.name), "policy option" if f.name == "policy_options"
                                            else "--set")
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return SimConfig(**{**values, **overrides})


def workload_kwargs(config: SimConfig) -> dict[str, Any]:
    """The workload group of a config as keyword arguments (for `compare` and `ablation`)."""
    return {f.name: getattr(config, f.name) for f in settings("workload")}
