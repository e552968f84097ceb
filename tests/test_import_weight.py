"""A simulation does not import pandas (with pyarrow: ~110 MB resident and ~0.25 s a process, issue 13): only the
functions that make frames or read profile tables do, when called."""

import subprocess
import sys

HEAVY = ("pandas", "pyarrow")

SCRIPT = f"""
import sys
import experiments.cli, sim.api, sim.compare, sim.engine, sim.policies, sim.search
from sim.api import simulate
r = simulate('mixtral-8x7b', 'a100-80g-8452y', 'coxmoe', batch=16, prompt_len=32, gen_len=4, decode_sample=2)
assert r.throughput_tok_s > 0
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


def test_a_simulation_imports_no_pandas():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_frame_still_imports_it_when_asked():
    """The lazy import in `Plan.to_frame` and `compare_table` gives the frames they gave."""
    script = ("import sys\nfrom sim.api import simulate\n"
              "r = simulate('mixtral-8x7b', 'a100-80g-8452y', 'coxmoe', batch=16, prompt_len=32, gen_len=4, "
              "decode_sample=2, keep_plan=True)\n"
              "frame = r.plan.to_frame()\n"
              "print(type(frame).__module__.split('.')[0], len(frame) == r.num_ops, 'pandas' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["pandas", "True", "True"]
