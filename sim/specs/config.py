"""The pydantic configuration every spec dataclass carries (read by `sim.specs.schema` at the boundary)."""

from pydantic import ConfigDict

# No NaN or infinity in any number; no field the dataclass does not declare.
SPEC_CONFIG = ConfigDict(allow_inf_nan=False, extra="forbid")
