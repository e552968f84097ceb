"""Errors the simulator raises for bad user input; the CLI turns them into one line and exit status 2."""


class SimInputError(ValueError):
    """A spec, preset, workload or policy option that cannot be used as given."""


class RunTooLong(SimInputError):
    """A run whose length does not fit the engine's int64 nanosecond clock: some rate or efficiency is near zero."""


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
