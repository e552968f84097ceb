"""Errors the simulator raises for bad user input; the CLI turns them into one line and exit status 2."""

import reprlib

_BRIEF = reprlib.Repr()  # Python 3.11's Repr takes its limits as attributes
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict, _BRIEF.maxset = 2, 4, 4, 4, 4
_BRIEF.maxstring, _BRIEF.maxlong, _BRIEF.maxother = 60, 40, 60


def brief(value: object) -> str:
    """A bad value as an error message shows it: its repr cut short (a 1 KB YAML alias bomb's repr is 250 MB; a
    400-digit integer or a 20 MB string would fill the line)."""
    return _BRIEF.repr(value)


def named(value: object) -> str:
    """A name (a field, key or id from an input) as a message shows it: as it is when printable text, else
    `brief` of it (a key such as "\\n" would break the message's one line)."""
    return value if isinstance(value, str) and value.isprintable() else brief(value)


class SimInputError(ValueError):
    """A spec, preset, workload or policy option that cannot be used as given."""


class RunTooLong(SimInputError):
    """A run whose length does not fit the engine's int64 nanosecond clock: some rate or efficiency is near zero."""


class UnsupportedModel(SimInputError):
    """A policy that has no form for the model as given (e.g. FlexGen and weights stored at a file's bits): a
    comparison reports that policy as infeasible and runs the others."""


class CapacityError(SimInputError):
    """A plan needs more memory than a device has."""

    def __init__(self, pool: str, needed_bytes: int, available_bytes: int, what: str = ""):
        self.pool = pool
        self.needed_bytes = int(needed_bytes)
        self.available_bytes = int(available_bytes)
        detail = f" ({what})" if what else ""
        super().__init__(
            f"{pool} memory exceeded: needs {needed_bytes / 2**30:.2f} GiB{detail}, "
            f"{available_bytes / 2**30:.2f} GiB available"
        )


class NoFeasibleConfig(CapacityError):
    """A policy's search found no configuration that fits its memory model."""

    def __init__(self, message: str):  # noqa: D107 - the message says it all
        ValueError.__init__(self, message)
        self.pool, self.needed_bytes, self.available_bytes = "GPU", 0, 0
