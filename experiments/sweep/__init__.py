"""Design-space sweeps: spec expansion and hashing, a crash-safe result store, and the runners."""
