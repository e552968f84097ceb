"""What every `coxmoe` command shares: the one-line usage error, argument types, JSON output, `--max-gib`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from experiments.cli.config_flags import arg_type
from sim.config import int_at_least, length, probability
from traces.limits import DEFAULT_LIMIT_GIB as LIMIT_DEFAULT
from traces.limits import LIMIT_ENV, parse_gib

EXIT_USAGE = 2


class UsageError(Exception):
    """Raised by the parser instead of printing usage; main() prints one line and exits 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


class ScriptParser(argparse.ArgumentParser):
    """The argument parser of a script (experiments/*.py, benchmarks/): a bad argument is one line and exit 2, as
    in the CLI (argparse's default prints the usage line first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)}\n")


positive_int = arg_type(int_at_least(1))
nonneg_int = arg_type(int_at_least(0))
seed_int = arg_type(int_at_least(0, 2**64 - 1))  # numpy and torch take seeds below 2^64
run_count = arg_type(int_at_least(0, 1000))  # warm-ups, rounds, repeats of real runs: each can take minutes
positive_run_count = arg_type(int_at_least(1, 1000))
length_arg = arg_type(length)
probability_arg = arg_type(probability)


def positive_gib(text: str) -> float:
    try:
        return parse_gib(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The files the last parse named to write (`output_file`, `output_stem`): `refuse_outputs_that_are_inputs` checks
# them against the command's other arguments.
WRITES: list[str] = []


def output_dests(parser: argparse.ArgumentParser) -> set[str]:
    """The destinations of every argument, in `parser` and its sub-commands, whose type writes a file."""
    dests = set()
    for action in parser._actions:
        if getattr(action.type, "writes", False):
            dests.add(action.dest)
        for sub in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            dests |= output_dests(sub)
    return dests


def refuse_outputs_that_are_inputs(args: argparse.Namespace, outputs_at: set[str]) -> None:
    """A file a command writes that is also one it reads (`--timeline sys.json` with `--system-file sys.json`)
    was overwritten after the run: refused before any work. Inputs are the arguments other than `outputs_at`
    (`output_dests`) naming existing files, also inside `table:FILE` and `key=FILE` values."""
    outputs = {Path(w).resolve(): w for w in WRITES}
    if not outputs:
        return
    for dest, value in vars(args).items():
        if dest in outputs_at:
            continue
        for text in value if isinstance(value, list | tuple) else [value]:
            if not isinstance(text, str):
                continue
            for name in {text, text.partition(":")[2], text.partition("=")[2]} - {""}:
                path = Path(name)
                if path.is_file() and path.resolve() in outputs:
                    raise UsageError(f"coxmoe: error: {outputs[path.resolve()]} is both an output and an input "
                                     f"(--{dest.replace('_', '-')}) of this command: write it elsewhere")


IMAGE_SUFFIXES = ("", ".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")


def output_file(*suffixes: str, exact: bool = False) -> Callable[[str], str]:
    """An argparse type for a file to write: not a directory, with one of `suffixes` (checked before any work,
    so a long run never ends in an unwritable path). `exact`: the suffix as written, for writers that check it
    so (a trace's `.npz`: `-o A.NPZ` passed here and failed after the work); else in any case (images)."""

    def parse(text: str) -> str:
        path = Path(text)
        suffix = path.suffix if exact else path.suffix.lower()
        if suffix not in suffixes:
            shown = ", ".join(s or "(none)" for s in suffixes)
            raise argparse.ArgumentTypeError(f"{text}: unsupported file type {path.suffix or '(none)'!r}; "
                                             f"use {shown}")
        check_writable_file(text)
        WRITES.append(text)
        return text

    parse.writes = True  # type: ignore[attr-defined]
    return parse


def check_writable_file(text: str) -> None:
    """A file name to write, whatever its type: not a folder, in a folder that exists as one and is writable."""
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {path.parent} is not a directory")
    if path.parent.is_dir() and (not os.access(path.parent, os.W_OK | os.X_OK) or not _can_create_in(path.parent)):
        raise argparse.ArgumentTypeError(f"{text}: cannot write into {path.parent} (permissions, or a "
                                         "read-only or special file system)")


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be made in `folder`, tried (a file made and removed at once): permission bits do not
    tell for root, nor for /proc, /sys or a read-only mount."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".coxmoe-probe-"):
            return True
    except OSError:
        return False


def output_dir(text: str) -> str:
    """An argparse type for a folder to write into: a name (an empty one would write into the current folder), not
    an existing file, under a writable parent (checked before any work)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("give a folder name (an empty one would write into the current folder)")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not path.exists() and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise argparse.ArgumentTypeError(f"{text}: cannot create it under {parent}")
    return text


def output_stem(text: str) -> str:
    """An argparse type for a figure's stem (STEM.png and STEM.pdf are written): not a folder, a stem or a .png /
    .pdf name, in a writable folder."""
    path = Path(text)
    if path.suffix in (".png", ".pdf"):
        path = path.with_suffix("")
    check_writable_file(str(path))  # a stem may hold dots (run_1.5x.pdf); `timeline` judges the suffix
    WRITES.extend([text, f"{path}.png", f"{path}.pdf"])
    return text


output_stem.writes = True  # type: ignore[attr-defined]


def one_line(text: str) -> str:
    """An error message as one line whatever it quotes (a key with a newline, a multi-line parser message)."""
    return " ".join(text.split("\n")).replace("\r", " ")


def finite(obj: Any) -> Any:
    """The same structure with every NaN or infinite float as null: JSON output stays standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def emit_json(obj: Any) -> None:
    json.dump(finite(obj), sys.stdout, indent=2, sort_keys=False, allow_nan=False)
    sys.stdout.write("\n")


def add_limit_option(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """`--max-gib` on the top-level parser and on every (sub)command, so it may stand anywhere."""
    parser.add_argument("--max-gib", type=positive_gib, default=None if top else argparse.SUPPRESS,
                        help=f"memory a trace or plan may take before it is refused (default {LIMIT_DEFAULT:g} GiB, "
                             f"or {LIMIT_ENV})")
    for action in parser._actions:  # argparse keeps subcommands as a _SubParsersAction's choices
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                add_limit_option(child, top=False)


def run_script(main: Callable[[], object], name: str) -> None:
    """Run a script's `main` (the benchmarks'): a bad input (an unknown preset, a routing that does not fit the
    model) ends as one line and exit 2, as in the CLI, not as a traceback."""
    from sim.errors import SimInputError
    from traces.errors import TraceError

    try:
        main()
    except (SimInputError, TraceError) as exc:
        print(f"{name}: error: {one_line(str(exc))}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
