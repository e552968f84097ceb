"""`coxmoe` command line: a thin layer over the library, one module per command group. Bad input is one line on
stderr and exit status 2.

    common.py        the one-line usage error, argument types, JSON output, --max-gib
    config_flags.py  flags generated from `sim.config.SimConfig` (simulate, compare, ablation, execute, ...)
    sim_cmds.py      presets, policies, simulate, run-plan, compare, ablation
    real_cmds.py     execute, calibrate profile / isa / validate
    trace_cmds.py    trace gen / import / record / stats / validate, eas
    study_cmds.py    sweep, sweep-results, reproduce, timeline
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from experiments.cli import real_cmds, sim_cmds, study_cmds, trace_cmds
from experiments.cli.common import (
    EXIT_USAGE,
    WRITES,
    Parser,
    UsageError,
    add_limit_option,
    one_line,
    output_dests,
    refuse_outputs_that_are_inputs,
)
from sim.errors import SimInputError
from traces.errors import TraceError
from traces.limits import LIMIT_ENV

COMMAND_GROUPS = (sim_cmds, real_cmds, trace_cmds, study_cmds)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="coxmoe", description="Simulate CPU-GPU MoE inference policies (CoX-MoE and baselines).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in COMMAND_GROUPS:
        group.register(sub)
    add_limit_option(parser)
    return parser


TRACEBACK_ENV = "COXMOE_TRACEBACK"  # set: the generic input catches (nesting, memory) re-raise, for debugging


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    saved_limit = os.environ.get(LIMIT_ENV)
    try:
        WRITES.clear()
        args = parser.parse_args(argv)
        refuse_outputs_that_are_inputs(args, output_dests(parser))
        if args.max_gib is not None:  # read by the guards, here and in sweep workers, for this command only
            os.environ[LIMIT_ENV] = repr(args.max_gib)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except (SimInputError, TraceError) as exc:
        print(f"coxmoe: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except RecursionError:  # a JSON / YAML input nested deeper than the readers recurse (or an alias cycle)
        if os.environ.get(TRACEBACK_ENV):
            raise
        print("coxmoe: error: an input file is nested too deeply to read (JSON or YAML nesting, or an alias cycle)",
              file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:  # numpy's ArrayMemoryError included: the allocation was refused, nothing ran away
        if os.environ.get(TRACEBACK_ENV):
            raise
        print("coxmoe: error: the input needs more memory than this machine can allocate (a trace, plan or batch "
              "that large; see --max-gib)", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:  # torch's allocator refusing: a RuntimeError, not a MemoryError
        # ("CUDA error: out of memory" from a pinned host buffer, "CUBLAS_STATUS_ALLOC_FAILED" from cuBLAS'
        # workspace: the same refusal in other words)
        if os.environ.get(TRACEBACK_ENV) or not any(s in str(exc) for s in (
                "can't allocate memory", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED")):
            raise
        print("coxmoe: error: the model or batch needs more memory than this machine can allocate (fewer --layers, "
              "a smaller batch, or see --max-gib)", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        if "Exceeds the limit" in str(exc) and "value has" in str(exc):  # CPython's guard reading a huge integer
            print(f"coxmoe: error: an input holds an integer of more than {sys.get_int_max_str_digits()} digits",
                  file=sys.stderr)
            return EXIT_USAGE
        raise
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"coxmoe: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("coxmoe: interrupted", file=sys.stderr)
        return 130
    finally:
        if saved_limit is None:
            os.environ.pop(LIMIT_ENV, None)
        else:
            os.environ[LIMIT_ENV] = saved_limit

