"""Reference executor: runs the simulator's plans with torch on real devices (CPU with AMX or AVX-512, CUDA),
times every op in the simulator's record schema, and profiles this machine's kernels into data the simulator
reads (`profile`, `validate`). This package may import `sim` and `traces`; they never import it.
"""
