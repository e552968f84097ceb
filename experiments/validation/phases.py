"""Prefill and per-step decode time of published runs, split the same way for measurement and simulation.

A published end-to-end rate gives one total time per run. Where a source measured one configuration (group,
system, model, policy, batch, prompt length) at several output lengths, the totals follow
`total = prefill + (gen_len - 1) x step` (the first token comes with the prefill), so a least-squares line
through them splits the measurement into its prefill and its decode step. The simulated runs
are split by the simulator itself (its prefill and decode times, which differ a little between the runs: each
output length has its own trace and, where a policy places experts by the run's load, its own placement), so the
prefill is their mean and the step their decode time over all their steps; the spread of the simulated prefill is
reported. This is the time breakdown a disagreement is explained from (fidelity rules), read from the data rather
than by hand.

The step (the slope) is well determined by two lengths far apart; the prefill (the intercept) is an
extrapolation, so it is reported only where three or more lengths were run and it is at least
PREFILL_MIN_SHARE of the shortest run (a small intercept is within the noise of the steps).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from experiments.validation.run import E2E_METRICS, run_tokens

GROUP_KEYS = ["group", "system", "model", "policy", "batch", "prompt_len"]
PREFILL_MIN_SHARE = 0.1


def run_time_s(rows: pd.DataFrame) -> pd.Series:
    """Each run's wall time as its end-to-end rate implies it (NaN for a prefill-only or decode-only rate)."""
    tokens = [run_tokens(*key) for key in zip(rows["metric"], rows["batch"], rows["prompt_len"], rows["gen_len"],
                                               strict=True)]
    return pd.Series([np.nan if t is None else t for t in tokens], index=rows.index, dtype=float) / rows["measured"]


def _line(steps: np.ndarray, totals: np.ndarray) -> tuple[float, float, float]:
    """(intercept, slope, largest relative residual) of totals against decode steps."""
    slope, intercept = np.polyfit(steps, totals, 1)
    fitted = intercept + slope * steps
    return float(intercept), float(slope), float(np.max(np.abs(fitted - totals) / totals))


def phase_fits(table: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration run at two or more output lengths (published knobs, simulated): measured and
    simulated prefill seconds and decode seconds per step, their ratios (simulated / measured: below 1 means
    the simulator is faster), how well the measured line fits (largest relative residual) and how much the
    simulated prefill spreads over the runs."""
    pub = table[(table["mode"] == "published") & table["predicted"].notna()
                & table["metric"].isin(E2E_METRICS)].copy()
    columns = [*GROUP_KEYS, "runs", "gen_lens", "measured_prefill_s", "simulated_prefill_s", "prefill_ratio",
               "measured_step_s", "simulated_step_s", "step_ratio", "measured_fit_residual",
               "simulated_prefill_spread"]
    if pub.empty:
        return pd.DataFrame(columns=columns)
    pub["measured_total_s"] = run_time_s(pub)
    rows = []
    for key, runs in pub.groupby(GROUP_KEYS, sort=False):
        gens = np.sort(runs["gen_len"].unique())
        if gens.size < 2:
            continue
        steps = (runs["gen_len"] - 1).to_numpy(dtype=float)
        measured = runs["measured_total_s"].to_numpy(dtype=float)
        m_pre, m_step, m_res = _line(steps, measured)
        if gens.size < 3 or m_pre < PREFILL_MIN_SHARE * measured.min():  # not resolved by these runs
            m_pre = np.nan
        prefill = runs["prefill_s"].to_numpy(dtype=float)
        s_pre = float(prefill.mean())
        s_step = float(runs["decode_s"].sum() / steps.sum()) if steps.sum() > 0 else np.nan
        spread = float((prefill.max() - prefill.min()) / s_pre) if s_pre > 0 else np.nan
        rows.append({**dict(zip(GROUP_KEYS, key, strict=True)), "runs": len(runs),
                     "gen_lens": "/".join(str(int(g)) for g in gens),
                     "measured_prefill_s": m_pre, "simulated_prefill_s": s_pre,
                     "prefill_ratio": s_pre / m_pre if m_pre > 0 else np.nan,  # NaN: not resolved
                     "measured_step_s": m_step, "simulated_step_s": s_step,
                     "step_ratio": s_step / m_step if m_step > 0 else np.nan,
                     "measured_fit_residual": m_res, "simulated_prefill_spread": spread})
    return pd.DataFrame(rows, columns=columns)


def phase_finding(phases: pd.DataFrame) -> str:
    """One sentence per group: the ranges of simulated / measured prefill and step times."""
    if phases.empty:
        return ""
    parts = []
    for group, g in phases.groupby("group", sort=False):
        pre = g["prefill_ratio"].dropna()
        step = g["step_ratio"].dropna()
        text = f"{group} ({len(g)} configurations): simulated / measured"
        if not step.empty:
            text += f" decode step {step.min():.2f}-{step.max():.2f}x"
        if not pre.empty:
            text += f"{',' if not step.empty else ''} prefill {pre.min():.2f}-{pre.max():.2f}x"
        if step.empty and pre.empty:
            text += " nothing resolved"
        parts.append(text)
    return "Time split by phase where a configuration ran at several output lengths (validation_phases.csv): " + \
        "; ".join(parts) + "."
