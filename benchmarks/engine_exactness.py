"""Exactness fingerprints for engine and plan-builder changes (issue 13): a refactor that makes the simulator
faster must leave every op's start and end, the busy times, the memory peaks and the plan itself unchanged.

Simulates a fixed set of points (three models x five systems x every policy at B=128, 96/8, plus five larger
points) and hashes, per point, the plan's `to_frame()` CSV and the engine record (every op's start and end ns,
busy ns per stream, peak bytes per pool). A point that does not fit is recorded by its error's type. Write the
fingerprints before a change, then compare after it:

    python benchmarks/engine_exactness.py --out /tmp/before.json
    python benchmarks/engine_exactness.py --compare /tmp/before.json   # exit 1 and the differing points if any

`--quick` runs one model on two systems (a smoke check in seconds). The full set takes about 90 s on a 2-vCPU
VM; it is a benchmark-side check (its run time does not fit the unit tests), the golden tests cover throughput.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from experiments.cli.common import ScriptParser

MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite")
SYSTEMS = ("a100-80g-8452y", "gcp-t4-n1", "rtx6000ada-8452y", "2x-h100-sxm-nvlink-8480", "a100-80g-8452y-ndp8")
LARGER = (  # (model, system, policy, batch, prompt_len, gen_len, decode_sample)
    ("mixtral-8x7b", "a100-80g-8452y", "coxmoe", 1024, 800, 256, 8),
    ("mixtral-8x7b", "a100-80g-8452y", "moe-lightning", 1024, 800, 256, 8),
    ("qwen3-30b-a3b", "a100-80g-8452y", "coxmoe", 1024, 800, 64, 0),
    ("deepseek-v2-lite", "rtx6000ada-8452y", "fiddler", 256, 512, 32, 0),
    ("mixtral-8x7b", "gcp-t4-n1", "flexgen", 256, 512, 32, 4),
)


def cases(quick: bool) -> list[tuple]:
    """The points, each (model, system, policy, batch, prompt_len, gen_len, decode_sample)."""
    from sim.policies import POLICIES

    models, systems = (MODELS[:1], SYSTEMS[:2]) if quick else (MODELS, SYSTEMS)
    grid = [(m, s, p, 128, 96, 8, 0) for m in models for s in systems for p in POLICIES]
    return grid if quick else grid + list(LARGER)


def fingerprint(case: tuple) -> dict:
    """The point's hashes (plan CSV, engine record) and throughput, or the type of the error that refused it."""
    from sim.api import simulate
    from sim.errors import SimInputError

    model, system, policy, batch, prompt_len, gen_len, sample = case
    try:
        r = simulate(model, system, policy, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
                     decode_sample=sample, keep_plan=True)
    except SimInputError as exc:
        return {"refused": type(exc).__name__}
    rec = r.record
    record_hash = hashlib.sha256()
    for array in (rec.start_ns, rec.end_ns):
        record_hash.update(array.astype("<i8").tobytes())
    record_hash.update(json.dumps([rec.busy_ns, rec.peak_bytes], sort_keys=True).encode())
    plan_csv = r.plan.to_frame().to_csv(index=False).encode()
    return {"plan": hashlib.sha256(plan_csv).hexdigest()[:16], "record": record_hash.hexdigest()[:16],
            "throughput_tok_s": r.throughput_tok_s, "ops": r.num_ops}


def main() -> int:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the fingerprints to this JSON file")
    parser.add_argument("--compare", type=Path, help="compare with fingerprints written before; exit 1 on a change")
    parser.add_argument("--quick", action="store_true", help="one model on two systems")
    args = parser.parse_args()
    before = json.loads(args.compare.read_text()) if args.compare else None  # (read first: --out may be the file)
    t0 = time.perf_counter()
    prints = {"/".join(map(str, c)): fingerprint(c) for c in cases(args.quick)}
    refused = sum("refused" in v for v in prints.values())
    print(f"{len(prints)} points ({refused} refused) in {time.perf_counter() - t0:.1f} s")
    if args.out:
        args.out.write_text(json.dumps(prints, indent=1, sort_keys=True) + "\n")
    if before is not None:
        changed = sorted(k for k in prints.keys() | before.keys() if prints.get(k) != before.get(k))
        for key in changed:
            print(f"changed: {key}: {before.get(key)} -> {prints.get(key)}")
        print(f"{len(changed)} of {len(prints)} points changed")
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
