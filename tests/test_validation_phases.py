"""The phase split of published runs: a configuration measured at several output lengths is split into prefill
and decode step by a line through its run times; the simulation by its own prefill and decode times."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from experiments.validation.phases import PREFILL_MIN_SHARE, phase_finding, phase_fits


def _runs(prefill: float, step: float, gens: list[int], sim_prefill: float, sim_step: float, batch: int = 2,
          group: str = "g", prompt: int = 16) -> list[dict]:
    rows = []
    for gen in gens:
        total = prefill + (gen - 1) * step
        rows.append({"group": group, "system": "s", "model": "m", "policy": "p", "batch": batch,
                     "prompt_len": prompt, "gen_len": gen, "mode": "published", "metric": "e2e_gen_tok_s",
                     "measured": batch * gen / total, "predicted": 1.0,
                     "prefill_s": sim_prefill, "decode_s": (gen - 1) * sim_step})
    return rows


def test_a_line_through_run_times_recovers_prefill_and_step_for_both():
    table = pd.DataFrame(_runs(3.0, 0.25, [16, 64, 512], sim_prefill=1.5, sim_step=0.2))
    (row,) = phase_fits(table).to_dict("records")
    assert row["runs"] == 3 and row["gen_lens"] == "16/64/512"
    assert row["measured_prefill_s"] == pytest.approx(3.0) and row["measured_step_s"] == pytest.approx(0.25)
    assert row["simulated_prefill_s"] == pytest.approx(1.5) and row["simulated_step_s"] == pytest.approx(0.2)
    assert row["prefill_ratio"] == pytest.approx(0.5) and row["step_ratio"] == pytest.approx(0.8)
    assert row["measured_fit_residual"] < 1e-9
    assert phase_finding(phase_fits(table)).endswith("g (1 configurations): simulated / measured decode step "
                                                     "0.80-0.80x, prefill 0.50-0.50x.")


def test_an_unresolved_prefill_is_left_blank_and_single_lengths_are_skipped():
    small = 0.5 * PREFILL_MIN_SHARE * (0.1 + 63 * 1.0)  # below the share of the shortest run
    two = pd.DataFrame(_runs(3.0, 0.25, [64, 512], 1.0, 0.2, group="two")      # two lengths: step only
                       + _runs(small, 1.0, [64, 128, 512], 1.0, 1.0, group="tiny")  # a prefill in the noise
                       + _runs(3.0, 0.25, [64], 1.0, 0.2, group="one"))         # one length: no line
    fits = phase_fits(two).set_index("group")
    assert set(fits.index) == {"two", "tiny"}
    assert np.isnan(fits.loc["two", "measured_prefill_s"]) and np.isnan(fits.loc["two", "prefill_ratio"])
    assert fits.loc["two", "step_ratio"] == pytest.approx(0.8)
    assert np.isnan(fits.loc["tiny", "prefill_ratio"]) and fits.loc["tiny", "step_ratio"] == pytest.approx(1.0)
    assert "prefill" not in phase_finding(fits.reset_index().iloc[:1])


def test_only_published_end_to_end_rates_enter():
    rows = _runs(3.0, 0.25, [16, 64, 512], 1.5, 0.2)
    search = [{**r, "mode": "search"} for r in rows]
    decode_only = [{**r, "metric": "decode_tok_s", "group": "d"} for r in rows]
    fits = phase_fits(pd.DataFrame(rows + search + decode_only))
    assert list(fits["group"]) == ["g"] and phase_fits(pd.DataFrame(search)).empty


def test_the_simulated_split_is_the_simulators_own_with_its_spread():
    rows = _runs(3.0, 0.25, [16, 64, 512], sim_prefill=1.0, sim_step=0.2)
    for row, prefill in zip(rows, (0.8, 1.0, 1.2), strict=True):  # each output length planned apart
        row["prefill_s"] = prefill
    rows[2]["decode_s"] = 511 * 0.3  # and a step that is not the same in every run
    (fit,) = phase_fits(pd.DataFrame(rows)).to_dict("records")
    assert fit["simulated_prefill_s"] == pytest.approx(1.0)  # the mean, not a line's intercept
    assert fit["simulated_prefill_spread"] == pytest.approx(0.4)
    assert fit["simulated_step_s"] == pytest.approx((15 * 0.2 + 63 * 0.2 + 511 * 0.3) / (15 + 63 + 511))
    assert fit["measured_prefill_s"] == pytest.approx(3.0) and fit["prefill_ratio"] == pytest.approx(1.0 / 3.0)
