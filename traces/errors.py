"""Errors raised for malformed or inconsistent routing traces."""


class TraceError(ValueError):
    """A routing trace file or generator argument that cannot be used."""
