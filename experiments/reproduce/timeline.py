"""Gantt of one decode step per resource: CoX-MoE's simulated schedule (Mixtral-8x7B on the RTX 6000 Ada system,
B = 1024, prompt 97), and beside it a measured executor timeline when `--record` names one (written by
`coxmoe execute --timeline`). The Chrome-trace JSON of the simulation is written too, for Perfetto."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.gantt import Events, gantt_figure, load_chrome_trace, process_name, step_events, track_names
from experiments.reproduce import ReproduceOptions, Reproduction
from experiments.reproduce.style import paper_style, save_csv, save_figure
from sim.api import simulate
from sim.timeline import chrome_trace_events, write_chrome_trace

MODEL, SYSTEM, ROUTING, PROMPT = "mixtral-8x7b", "rtx6000ada-8452y", "table:mixtral-8x7b", 97


def simulated_timeline(options: ReproduceOptions) -> tuple[Path, str, Events]:
    """Simulate the decode steps and write their Chrome-trace JSON; returns the file, a label and the events."""
    batch, gen = (128, 4) if options.quick else (1024, 32)
    r = simulate(MODEL, SYSTEM, "coxmoe", system_settings=options.settings, batch=batch, prompt_len=PROMPT,
                 gen_len=gen, routing=ROUTING,
                 seed=options.seed, decode_sample=4, keep_plan=True)
    assert r.plan is not None and r.record is not None
    events = chrome_trace_events(r.plan.ops, r.record.start_ns, r.record.end_ns,
                                 cpu_has_amx=r.plan.system.cpu.has_amx)
    path = write_chrome_trace(options.out / "timeline_sim.json", events,
                              {"model": MODEL, "system": options.system(SYSTEM).name, "policy": "coxmoe",
                               "knobs": r.knobs, "batch": batch, "prompt_len": PROMPT, "gen_len": gen,
                               "routing": ROUTING})
    return path, f"simulated: CoX-MoE, Mixtral-8x7B, RTX 6000 Ada, B={batch}", events


def step_table(label: str, events: list[dict], step: int) -> pd.DataFrame:
    """Busy milliseconds per resource and op kind within the drawn step (the numbers under the bars)."""
    _, ops = step_events(events, step)
    names = track_names(events)
    df = pd.DataFrame({"timeline": label, "resource": [names.get(e["tid"], str(e["tid"])) for e in ops],
                       "kind": [e["cat"] for e in ops], "busy_ms": [e["dur"] / 1e3 for e in ops]})
    out = df.groupby(["timeline", "resource", "kind"], as_index=False)["busy_ms"].sum()
    out["step"] = step
    out["step_ms"] = max(e["ts"] + e["dur"] for e in ops) / 1e3
    return out


def reproduce(options: ReproduceOptions) -> Reproduction:
    sim_path, sim_label, sim_events = simulated_timeline(options)
    timelines = [(sim_label, sim_events)]
    if options.record is not None:
        events, _ = load_chrome_trace(options.record)
        timelines.append((f"{process_name(events, 'measured')}: {options.record.name}", events))
    with paper_style():
        fig, steps = gantt_figure(timelines)
        files = [sim_path, *save_figure(fig, options.out, "timeline")]
    table = pd.concat([step_table(label, events, s) for (label, events), s in zip(timelines, steps, strict=True)],
                      ignore_index=True)
    files.insert(1, save_csv(table, options.out, "timeline"))
    step = steps[0]
    per = table.groupby(["timeline", "resource"])["busy_ms"].sum()
    sim_rows = per.loc[timelines[0][0]]
    finding = (f"Simulated decode step {step}: {table['step_ms'].iloc[0]:.1f} ms; busiest resources "
               + ", ".join(f"{k} {v:.1f} ms" for k, v in sim_rows.sort_values(ascending=False).head(3).items())
               + (". A measured timeline is drawn beside it." if len(timelines) > 1 else
                  ". No executor record given (--record FILE from `coxmoe execute --timeline`)."))
    claim = ("No figure in the paper; the paper's premise is that CPU (AMX) and GPU work overlap within a decode "
             "step under CoX-MoE's plan.")
    return Reproduction("timeline", "One decode step per resource (timeline)", claim, finding, table, files)
