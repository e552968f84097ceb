"""`coxmoe reproduce all`: every figure, then one Markdown report putting each result beside the paper's claim,
with the exact command that made it."""

from __future__ import annotations

import re
import time
from pathlib import Path

from experiments.reproduce import FIGURES, ReproduceOptions, Reproduction, reproduce
from experiments.reproduce.style import save_text
from experiments.sweep.store import versions
from experiments.tables import markdown_table
from sim.errors import SimInputError

REPORT = "report.md"
MAX_ROWS = 300  # rows of a figure's table in the report (the validation table has ~230)


def code_span(text: str) -> str:
    """`text` as one Markdown code span: fenced with one backtick more than its longest run of them (CommonMark), so
    a command line holding a backtick does not break the line it sits in."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    pad = " " if longest else ""
    return f"{'`' * (longest + 1)}{pad}{text}{pad}{'`' * (longest + 1)}"


def anchor(title: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def _section(r: Reproduction, out: Path, wall_s: float) -> str:
    images = [f for f in r.files if f.suffix == ".png"]
    others = [f for f in r.files if f.suffix != ".png"]
    lines = [f"## {r.title}", "", f"- **Paper:** {r.claim}", f"- **Here:** {r.finding}",
             f"- **Command:** {code_span(r.command)} ({wall_s:.0f} s{'; ' + r.note if r.note else ''})",
             "- **Files:** " + ", ".join(f"[{f.name}]({f.relative_to(out)})" for f in others), ""]
    lines += [f"![{r.name}]({f.relative_to(out)})" for f in images]
    shown = r.table.head(MAX_ROWS)
    cut = (f"The first {MAX_ROWS} of {len(r.table)} rows; every row is in "
           f"{next((f.name for f in others if f.suffix == '.csv'), 'the CSV')}.\n\n" if len(r.table) > MAX_ROWS
           else "")
    lines += ["", "<details><summary>numbers drawn</summary>", "", cut + markdown_table(shown, number), "",
              "</details>", ""]
    return "\n".join(lines)


def number(value: float) -> str:
    """Four significant digits, never in exponent notation where a plain number reads as well (10110, not
    1.011e+04)."""
    text = f"{value:.4g}"
    if "e" in text and 1e-3 <= abs(value) < 1e15:
        return f"{value:.0f}" if abs(value) >= 1 else f"{value:.4f}"
    return text


def kept_parts(report: Path, names: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """name -> (summary row, section) of figures carried over from an earlier report, unchanged."""
    if not report.is_file():
        raise SimInputError(f"--keep needs the earlier report {report}")
    text = report.read_text(encoding="utf-8")
    rows = {m.group(1): (m.group(0), m.group(2))
            for m in re.finditer(r"(?m)^\| \[([\w-]+)\]\(#([^)]+)\) \|.*$", text)}
    sections = {anchor(part.split("\n", 1)[0]): "## " + part.rstrip("\n") + "\n"
                for part in re.split(r"(?m)^## ", text)[1:]}
    out = {}
    for name in names:
        if name not in rows or rows[name][1] not in sections:
            raise SimInputError(f"--keep {name}: {report} has no section for it")
        out[name] = (rows[name][0], sections[rows[name][1]])
    return out


def reproduce_all(options: ReproduceOptions, names: list[str] | None = None) -> tuple[list[Reproduction], Path]:
    if options.points:  # before any figure runs or any file is written
        raise SimInputError("--points runs part of the validation set, and the report of `reproduce all` stands for "
                            "all of it: run `reproduce validation --points` instead")
    names = names or list(FIGURES)
    kept = kept_parts(options.out / REPORT, options.keep) if options.keep else {}
    options.check_settings([n for n in names if n not in kept])  # before the first (long) figure runs
    sections, results, rows = [], [], []
    t_all = time.perf_counter()
    for name in names:
        if name in kept:
            rows.append(kept[name][0])
            sections.append(kept[name][1])
            continue
        t0 = time.perf_counter()
        r = reproduce(name, options, settings_checked=True)
        results.append(r)
        rows.append(f"| [{r.name}](#{anchor(r.title)}) | {r.claim} | {r.finding} |")
        sections.append(_section(r, options.out, time.perf_counter() - t0))
    v = versions()
    head = ["# CoX-MoE reproduction report", "",
            f"Made by {code_span(options.command('all'))} in {time.perf_counter() - t_all:.0f} s "
            f"({', '.join(f'{k} {val}' for k, val in sorted(v.items()))}). Every number below comes from this "
            "run: the simulator with the sourced presets (no constant is fitted to the paper's end-to-end "
            "results), and the executor on this machine for the calibration.", "",
            "Read the comparison with these limits in mind: GPU and PCIe times come from datasheet peaks and "
            "published efficiencies (the presets name each source), not from a measured GPU; Mixtral-8x7B's "
            "routing follows its measured per-layer popularity, the other models' routing is synthetic (Zipf(1.0) "
            "in fig7, the synthesis presets tuned to published statistics elsewhere); the calibration measures "
            "this machine's CPU, which may lack AMX (its fingerprint says), so it checks the method, not the "
            "Xeon 8452Y's numbers.", "",
            "| figure | paper | here |", "|---|---|---|"]
    if kept:
        head[3:3] = ["", f"Carried unchanged from the earlier report in this folder (not rerun): {', '.join(kept)}; "
                     "their numbers come from the run that made that report."]
    if options.system_settings:
        settings = ", ".join(f"{k} = {v}" for k, v in options.system_settings)
        head[3:3] = ["", f"**Machines changed by `--set`:** {settings} on every simulated figure's system (the "
                     "presets' values otherwise); validation and calibration keep their own machines."]
    head += rows
    path = save_text("\n".join(head) + "\n\n" + "\n".join(sections), options.out / REPORT)
    return results, path
