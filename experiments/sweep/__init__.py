"""Design-space sweeps: spec expansion and hashing, a crash-safe result store, and the runners."""

ENGINES = ("local", "ray")  # where `coxmoe sweep` runs points: a local process pool, or Ray
