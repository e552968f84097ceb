"""Simulate the validation points: each with its published knobs and with its policy's own search.

A row per (point, mode): the predicted and measured metric, their ratio, and the simulated time breakdown
(prefill, decode, busy seconds per resource), so a disagreement can be explained from where the time goes.
Unsupported points (no policy models that system yet) are listed with the reason and not simulated.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from experiments.validation.schema import POINTS_DIR, ValidationPoint
from sim.api import SimulationResult, simulate
from sim.config import option_text
from sim.errors import SimInputError
from sim.plan import Plan
from sim.specs.catalog import is_spec_path
from traces.errors import TraceError

MODES = ("published", "search")
DECODE_SAMPLE = 8  # decode steps simulated per point (evenly spaced, scaled to the whole generation)


def metric_value(result: SimulationResult, metric: str) -> float:
    """The point's metric from a simulation, as `schema.METRIC_DEFINITIONS` defines it."""
    prompt = float(result.workload["prompt_tokens"])
    generated = float(result.generated_tokens)
    if metric == "e2e_gen_tok_s":
        return generated / result.total_s
    if metric == "e2e_total_tok_s":
        return (prompt + generated) / result.total_s
    if metric == "prefill_tok_s":
        return prompt / result.prefill_s
    if metric == "decode_tok_s":  # the decode steps' tokens: each request's first comes with the prefill
        if result.decode_s <= 0:
            raise SimInputError("metric decode_tok_s needs a decode phase (gen_len >= 2)")
        return (generated - float(result.workload["batch"])) / result.decode_s
    raise SimInputError(f"unknown metric {metric!r}")


def spec_path(name: str) -> str:
    """A preset name as it is; a relative spec file (`systems/...`, `models/...`) from the validation folder, so
    points name their own machines and model variants whatever the working directory."""
    if is_spec_path(name) and not Path(name).is_absolute():
        return str(POINTS_DIR.parent / name)
    return name


def spec_label(name: str) -> str:
    """How tables and plots name a preset (itself) or a spec file (its stem, as the simulator names the spec)."""
    return Path(name).stem if is_spec_path(name) else name


def _options(point: ValidationPoint, mode: str) -> dict[str, str]:
    knobs = point.knobs if mode == "published" else point.search_knobs
    return {k: option_text(v) for k, v in knobs.items()}  # an unquoted YAML off reaches the policy as off


def simulate_point(point: ValidationPoint, mode: str, decode_sample: int = DECODE_SAMPLE,
                   plans: dict[str, Plan] | None = None, seed: int = 0) -> dict:
    """One row: the point simulated in `mode`; a point that cannot run keeps its one-line reason. With `plans`,
    the published-knob plan is kept there under the point's id (for fitting framework factors). `seed` draws the
    routing trace (a popularity table's samples)."""
    wl = point.workload
    row = {"id": point.id, "group": point.group, "mode": mode, "system": spec_label(point.system),
           "model": spec_label(point.model),
           "policy": point.policy, "framework": point.runtime, "status": point.status, "train": point.train,
           "metric": point.metric,
           "measured": point.value, "batch": wl.batch, "prompt_len": wl.prompt_len, "gen_len": wl.gen_len,
           "options": ",".join(f"{k}={v}" for k, v in _options(point, mode).items()),
           "published_knobs": point.published_knobs, "source": point.source}
    if point.status == "unsupported":  # every row has a ratio column, so a table of such rows still summarises
        return {**row, "predicted": np.nan, "ratio": np.nan, "error": point.missing}
    t0 = time.perf_counter()
    try:
        r = simulate(spec_path(point.model), spec_path(point.system), point.policy, batch=wl.batch,
                     prompt_len=wl.prompt_len, gen_len=wl.gen_len, policy_options=_options(point, mode),
                     routing=point.routing, decode_sample=decode_sample, seed=seed,
                     keep_plan=plans is not None and mode == "published")
    except (SimInputError, TraceError) as exc:  # a routing the model cannot take is the point's error too
        return {**row, "predicted": np.nan, "ratio": np.nan, "error": str(exc)}
    if r.plan is not None:
        plans[point.id] = r.plan
    predicted = metric_value(r, point.metric)
    busy = {f"busy_{k}_s": v for k, v in sorted(r.busy_s.items())}
    knobs = {k: v for k, v in r.knobs.items() if not isinstance(v, dict | list)}
    return {**row, "predicted": predicted, "ratio": predicted / point.value, "error": "",
            "prefill_s": r.prefill_s, "decode_s": r.decode_s, "total_s": r.total_s,
            "chosen_knobs": ",".join(f"{k}={v}" for k, v in knobs.items()), **busy,
            "sim_wall_s": time.perf_counter() - t0}


def run_validation(points: Iterable[ValidationPoint], modes: Iterable[str] = MODES,
                   decode_sample: int = DECODE_SAMPLE, progress: bool = True,
                   plans: dict[str, Plan] | None = None, seed: int = 0) -> pd.DataFrame:
    """Every point in every mode, as one DataFrame (row order: points in file order, modes as given)."""
    jobs = [(p, m) for p in points for m in modes]
    rows = [simulate_point(p, m, decode_sample, plans, seed)
            for p, m in tqdm(jobs, desc="validation points", unit="run", disable=not progress)]
    return pd.DataFrame(rows)


E2E_METRICS = ("e2e_gen_tok_s", "e2e_total_tok_s")  # rates whose run time the workload implies


def run_tokens(metric: str, batch: int, prompt_len: int, gen_len: int) -> int | None:
    """The tokens an end-to-end rate counts over a run (None for a prefill-only or decode-only rate)."""
    generated = batch * gen_len
    return {"e2e_gen_tok_s": generated, "e2e_total_tok_s": generated + batch * prompt_len}.get(metric)


def measured_total_s(point: ValidationPoint) -> float:
    """The run's wall time implied by its metric and workload (the quantity the factors are fitted to)."""
    wl = point.workload
    tokens = run_tokens(point.metric, wl.batch, wl.prompt_len, wl.gen_len)
    if tokens is None:
        raise SimInputError(f"point {point.id}: metric {point.metric} is not an end-to-end rate")
    return tokens / point.value

