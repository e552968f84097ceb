"""Reference executor: runs the simulator's plans with torch on real devices (CPU AMX, CUDA).

Not built yet: issue 4 adds real MoE layers, trace-forced routing, plan execution, microbenchmark profiles
and validation against the simulator. This package may import `sim` and `traces`; they never import it.
"""
