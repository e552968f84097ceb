"""Summarise one run of `experiments/gpu_check.sh` as markdown, next to what the simulator predicts for it.

`python -m experiments.gpu_check_report DIR --out docs/results/gpu_check.md [--gemm-yaml FILE]` reads the folder
the script wrote (unpacked from gpu_check.tar.gz) and reports:
- each step's exit status and seconds, the machine (GPU, host CPU, torch / CUDA);
- GEMMs by shape measured on the GPU against the GPU preset's roofline (the same pricing as
  `experiments/validation/gpu_ops.py`), and, with `--gemm-yaml`, the measured set in `gpu_ops.yaml`'s format;
- copies (host-device by size, pinned and pageable; duplex) and host DRAM shared by a DMA loop and a CPU copy;
- the CUDA tests' summary line; each validation's end-to-end and per-class errors against the profile;
- each measured end-to-end point (`own_*.json`, forced knobs) against the simulator's prediction of the very same
  plan on the script's system preset, with the roofline (no profile): the cost model's own error on this machine.
Nothing here runs a GPU: it is the half of the check that needs none, so a lent machine's minutes go to measuring.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from experiments.tables import markdown_table
from experiments.validation.gpu_ops import _gemm_rows
from sim.atomic_files import write_atomic
from sim.errors import SimInputError

GPU_PRESET = "h200"  # the GPU of the system preset the script builds its plans for (h200-8452y)
# The lent GPU's preset by the name its driver reports (machine_bench.json), checked in this order.
# (The device tool lends H200s and H100s; name any other with --gpu.)
GPU_PRESETS_BY_NAME = (("H200", "h200"), ("H100 PCIe", "h100-pcie"), ("H100", "h100-sxm"))


def _json(path: Path) -> Any | None:
    """A JSON file's object, or None when it is missing or not JSON (a failed step leaves its error text)."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def gpu_preset_of(name: str | None) -> str | None:
    """The GPU preset of a driver's device name ("NVIDIA H100 80GB HBM3" -> h100-sxm), or None if unknown."""
    for needle, preset in GPU_PRESETS_BY_NAME:  # whole words: a GH200 is not an H200
        if name and re.search(rf"(?<![\w-]){re.escape(needle)}(?![\w-])", name, re.IGNORECASE):
            return preset
    return None


def measured_gpu(bench: Any, folder: Path | None = None) -> str | None:
    """The GPU name machine_bench.json records; without it (the step failed or was skipped), the first line of
    the env step's log (nvidia-smi, torch's device name) naming a GPU the presets know; else None."""
    name = _machine(bench).get("gpu")
    if name or folder is None:
        return name
    try:
        lines = (folder / "env.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.strip()[:120] for line in lines if gpu_preset_of(line)), None)


def lent_gpu(bench: Any, override: str | None = None, folder: Path | None = None) -> str:
    """The GPU preset to price the run with: `override`, else the one the driver's name maps to (machine_bench.json,
    else the env step's log in `folder`), else the system preset's own (GPU_PRESET)."""
    return override or gpu_preset_of(measured_gpu(bench, folder)) or GPU_PRESET


def lent_system(system: str, gpu: str) -> Any:
    """`system` (the preset the plans were built for) with the lent GPU's preset in place of its own: the
    simulated side of the own points runs on the GPU that measured them (the host stays the preset's)."""
    import dataclasses

    from sim.specs import load_system
    from sim.specs.catalog import component_preset

    spec = load_system(system)
    if spec.gpu.name == gpu:
        return spec
    return dataclasses.replace(spec, name=f"{spec.name} with {gpu}", gpu=component_preset("gpus", gpu))


def steps(folder: Path) -> list[str]:
    path = folder / "steps.txt"
    return path.read_text().splitlines() if path.exists() else []


def _machine(bench: Any) -> dict:
    """machine_bench.json's machine record ({} when the file or the record is missing or malformed)."""
    mach = bench.get("machine") if isinstance(bench, dict) else None
    return mach if isinstance(mach, dict) else {}


def gemm_rows(bench: dict) -> list[dict]:
    """The measured GEMM rows that are complete: positive integer m, n, k and positive seconds (a step cut short
    may leave others)."""
    rows = bench.get("gemm") if isinstance(bench.get("gemm"), list) else []
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0
    return [r for r in rows if isinstance(r, dict) and all(whole(r.get(k)) for k in "mnk")
            and isinstance(r.get("seconds"), int | float) and not isinstance(r.get("seconds"), bool)
            and r["seconds"] > 0]


def gemm_set(bench: dict, gpu: str = GPU_PRESET) -> dict:
    """The measured GEMMs as one `gemm_sets` entry of `gpu_ops.yaml` (seconds per call)."""
    mach = _machine(bench)
    return {"id": f"own-{gpu}-matmul", "gpu": gpu, "bytes_per_element": 2,
            "source": (f"measured here: executor.machine_bench on the lent {mach.get('gpu', '?')} "
                       f"({mach.get('measured_at', '?')}, torch {mach.get('torch', '?')}, "
                       f"CUDA {mach.get('cuda_version', '?')}):"
                       " bf16 x @ w.T, each call alone between CUDA events, median over rotated operand copies"),
            "gemms": [[r["m"], r["n"], r["k"], float(f"{r['seconds']:.4e}")] for r in gemm_rows(bench)]}


def gemm_table(bench: dict, gpu: str = GPU_PRESET) -> pd.DataFrame:
    """Measured against predicted seconds per GEMM, priced as `gpu_ops.py` prices its published sets."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "set.yaml"
        path.write_text(yaml.safe_dump({"gemm_sets": [gemm_set(bench, gpu)]}))
        table = pd.DataFrame(_gemm_rows(path))
    table["ratio"] = table["predicted_s"] / table["measured_s"]
    table["measured_tflops"] = [2 * r["m"] * r["n"] * r["k"] / r["seconds"] / 1e12 for r in gemm_rows(bench)]
    return table[["shape", "measured_s", "predicted_s", "ratio", "bound", "measured_tflops"]]


def step_status(folder: Path) -> dict[str, str]:
    """Each step's exit status as steps.txt records it ("own_flexgen_b128" -> "0")."""
    out = {}
    for line in steps(folder):
        m = re.match(r"(\S+)\s+rc=(\S+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def own_points(folder: Path, system: Any = "h200-8452y") -> pd.DataFrame:
    """Each measured end-to-end point against the simulation of the same plan (same model truncation, policy,
    knobs, lengths, routing and seed) on `system` (a preset name or spec) with the roofline. Every own step the
    script ran has a row: one that measured nothing says so, one whose step did not end cleanly is noted."""
    rows = []
    status = step_status(folder)
    names = sorted({p.stem for p in folder.glob("own_*.log")} | {p.stem for p in folder.glob("own_*.json")})
    for stem in names:
        rc = status.get(stem, "?")
        run = _json(folder / f"{stem}.json") or _json(folder / f"{stem}.log")
        if not isinstance(run, dict) or "total_s" not in run:
            rows.append({"point": stem[4:], "note": f"no measurement (step exit status {rc}; see its log)"})
            continue
        try:
            rows.append(_own_point(stem, run, rc, system))
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError, SimInputError) as exc:  # partial
            rows.append({"point": stem[4:], "note": f"incomplete measurement ({_what(exc)}; step exit status {rc})"})
    return pd.DataFrame(rows)


def _number(value: Any) -> Any:
    """A measured error as a float, or "n/a" (null where nothing was measured: a class with no ops)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def _what(exc: Exception) -> str:
    """What an incomplete measurement lacks, in a few words: the missing key, else the error's first line."""
    if isinstance(exc, KeyError):
        return f"missing {exc.args[0]!r}"
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120] or type(exc).__name__


def _own_point(stem: str, run: dict, rc: str, system: Any) -> dict:
    """One measured point's row beside its simulation (KeyError, TypeError or ValueError when the JSON lacks what
    it needs)."""
    from executor.weights import truncated
    from sim.api import simulate
    from sim.policies import POLICIES
    from sim.specs import load_model

    name, layers = re.fullmatch(r"(.+?)(?:\[:(\d+)\])?", run["model"]).groups()
    spec = load_model(name)
    if layers:
        spec = truncated(spec, int(layers))
    options = POLICIES[run["policy"]].Options.__dataclass_fields__  # forced knobs only: not derived fields
    knobs = {k: str(v) for k, v in run["knobs"].items() if k in options}
    wl = run["workload"]
    sim = simulate(spec, system, run["policy"], batch=wl["batch"], prompt_len=wl["prompt_len_max"],
                   gen_len=wl["gen_len_max"], routing=run["routing"], policy_options=knobs)
    tokens = wl["generated_tokens"]
    return {"point": stem[4:], "policy": run["policy"], "batch": wl["batch"],
            "measured_tok_s": tokens / run["total_s"], "simulated_tok_s": sim.throughput_tok_s,
            "ratio": sim.throughput_tok_s * run["total_s"] / tokens,
            "measured_prefill_s": run["prefill_s"], "simulated_prefill_s": sim.prefill_s,
            "measured_decode_s": run["decode_s"], "simulated_decode_s": sim.decode_s,
            "devices": ", ".join(sorted(set(run.get("devices", {}).values()))),
            "note": "" if rc == "0" else f"step exit status {rc}: measured, but check its log"}


def _md(df: pd.DataFrame, float_format: str = "{:.3g}") -> str:
    """`markdown_table`, or a line saying there is nothing, each followed by a blank line."""
    return "(none)\n" if df.empty else markdown_table(df, float_format) + "\n"


def render(folder: Path, system: str = "h200-8452y", gpu: str | None = None) -> str:
    """The whole report as markdown; `gpu`: the lent GPU's preset (default: by the name machine_bench.json
    records, else the system's own)."""
    out = [f"# GPU check: `{folder.name}`\n", "Steps (experiments/gpu_check.sh; exit status, seconds):\n", "```"]
    out += steps(folder) or ["(no steps.txt)"]
    out.append("```\n")
    bench = _json(folder / "machine_bench.json")
    measured_name = measured_gpu(bench, folder)
    gpu = lent_gpu(bench, gpu, folder)
    named = (f" (the lent GPU: {measured_name})" if measured_name else
             " (no GPU named by machine_bench.json or env.log: the system preset's own, by default)")
    out.append(f"Priced with the `{gpu}` GPU preset{named}; the simulated own points run on `{system}` with that GPU "
               "(its host preset kept).\n")
    if isinstance(bench, dict):
        m = _machine(bench)
        def field(key: str, missing: str = "?") -> Any:
            return m.get(key) if m.get(key) is not None else missing

        out.append(f"Machine: {field('gpu', 'no GPU')}, host CPU {field('cpu_model')}, {field('threads')} torch "
                   f"threads, torch {field('torch')}, CUDA {field('cuda_version')}, measured {field('measured_at')}.\n")
        errors = bench.get("errors") if isinstance(bench.get("errors"), dict) else {}
        for part, error in errors.items():
            out.append(f"machine_bench part `{part}` failed: {error}\n")
        if bench.get("gemm_device") == "cuda" and gemm_rows(bench):
            out += [f"## GEMMs by shape against the `{gpu}` preset's roofline\n", _md(gemm_table(bench, gpu))]
        elif errors.get("gemm"):
            out.append("The GEMM part failed (above): no GEMM is priced.\n")
        else:
            out.append("GEMMs ran on the CPU (no CUDA): not priced against a GPU preset.\n")
        if all(k in bench for k in ("host_copies", "d2d_copy", "duplex")):
            try:
                copies = pd.DataFrame(bench["host_copies"])
                out += ["## Host-device copies\n", _md(copies[["direction", "pinned", "bytes", "gb_per_s"]]),
                        f"Device-to-device copy: {bench['d2d_copy']['gb_per_s']:.0f} GB/s (read + write). "
                        f"Duplex: {json.dumps({k: round(v, 1) for k, v in bench['duplex'].items()})}.\n"]
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a part written partly
                out.append(f"Host-device copies: incomplete measurement ({_what(exc)}).\n")
        if "dram_sharing" in bench:
            try:
                shared = {k: round(v, 2) for k, v in bench["dram_sharing"].items()}
                out.append(f"Host DRAM sharing: {json.dumps(shared)}\n")
            except (TypeError, AttributeError, ValueError) as exc:
                out.append(f"Host DRAM sharing: incomplete measurement ({_what(exc)}).\n")
    tests = (folder / "pytest_cuda.log")
    if tests.exists():
        last = [ln for ln in tests.read_text().splitlines() if ln.strip()][-1:] or ["(empty)"]
        out.append(f"CUDA tests: `{last[0]}`\n")
    vals = []
    for path in sorted(folder.glob("validate_*.log")):
        v = _json(path)
        if isinstance(v, dict) and "end_to_end" in v:
            try:
                row = {"plan": path.stem[9:],
                       **{f"{k} error": _number(v["end_to_end"][k]["error"]) for k in v["end_to_end"]},
                       **{f"{c} error": _number(d["error"]) for c, d in v["classes"].items()}}
            except (KeyError, TypeError, AttributeError) as exc:
                row = {"plan": path.stem[9:], "total_s error": f"incomplete ({_what(exc)})"}
            vals.append(row)
        else:
            vals.append({"plan": path.stem[9:], "total_s error": "failed (see its log)"})
    out += ["## Validations against the profile (predicted / measured - 1)\n", _md(pd.DataFrame(vals), "{:+.1%}")]
    out += [f"## Measured end-to-end points against the simulator (`{system}` with `{gpu}`, roofline)\n",
            _md(own_points(folder, lent_system(system, gpu)))]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the gpu_check folder (unpacked from gpu_check.tar.gz)")
    p.add_argument("--out", help="markdown file to write (default: print)")
    p.add_argument("--gemm-yaml", help="also write the measured GEMMs as a gpu_ops.yaml gemm set")
    p.add_argument("--system", default="h200-8452y", help="system preset the script's plans were built for")
    p.add_argument("--gpu", help="GPU preset of the lent machine (default: by the GPU name machine_bench.json "
                                 "records: H200 -> h200, H100 PCIe -> h100-pcie, other H100 -> h100-sxm)")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    try:
        if not folder.is_dir():
            raise SimInputError(f"{folder}: not a folder")
        bench = _json(folder / "machine_bench.json")
        gpu = lent_gpu(bench, args.gpu, folder)
        from sim.specs.catalog import component_preset

        component_preset("gpus", gpu)  # an unknown preset is refused here, naming the presets
        text = render(folder, args.system, gpu)
        if args.gemm_yaml:
            if not isinstance(bench, dict) or bench.get("gemm_device") != "cuda" or not gemm_rows(bench):
                raise SimInputError(f"{folder}: no GPU GEMMs measured (machine_bench.json missing or CPU-only)")
            write_atomic(args.gemm_yaml, lambda tmp: Path(tmp).write_text(
                yaml.safe_dump({"gemm_sets": [gemm_set(bench, gpu)]}, sort_keys=False)))
        if args.out:
            write_atomic(args.out, lambda tmp: Path(tmp).write_text(text))
        else:
            print(text)
    except SimInputError as exc:
        print(f"gpu_check_report: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gpu_check_report: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
