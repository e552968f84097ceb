"""The CPU-GEMM sensitivity study: its grids are Fig. 7's with only the 8452Y's AMX efficiency and/or its GEMM
overlap set, and its comparison pairs each grid point's throughputs and speedups across the variants."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from experiments.amx_sensitivity import GRIDS, STOCK_AMX, compare, summary
from experiments.reproduce.fig7 import spec as fig7_spec
from experiments.sweep.spec import expand, load_spec
from sim.api import config_system
from sim.config import SimConfig
from sim.specs import load_system


def test_the_stock_grid_is_the_fig7_grid_with_one_system_setting():
    root = Path(__file__).resolve().parents[1] / "experiments" / "specs"
    tuned, stock = load_spec(root / "fig7.yaml"), expand(fig7_spec(False, STOCK_AMX))
    assert len(tuned) == len(stock) == 108
    assert all(p.config["system_settings"] == {"cpu.amx_efficiency": "0.073"} for p in stock)
    assert {json.dumps(p.config, sort_keys=True) for p in tuned} == {
        json.dumps({k: v for k, v in p.config.items() if k != "system_settings"}, sort_keys=True) for p in stock}
    s = SimConfig.from_point(stock[0].config)
    system = config_system(s)
    assert system.cpu.amx_efficiency == pytest.approx(0.073)
    assert system.cpu.gemm_flops_per_s == pytest.approx(load_system(s.system).cpu.gemm_flops_per_s * 0.073 / 0.289)


def test_every_variant_sets_only_cpu_gemm_numbers():
    assert GRIDS["tuned"] is None
    for name, settings in GRIDS.items():
        if settings:
            assert set(settings) <= {"cpu.amx_efficiency", "cpu.gemm_overlap"}, name
    system = config_system(SimConfig("mixtral-8x7b", "a100-80g-8452y", "coxmoe", batch=8, prompt_len=8, gen_len=2,
                                     system_settings=GRIDS["stock-no-overlap"]))
    assert system.cpu.gemm_overlap == 0 and system.cpu.amx_efficiency == pytest.approx(0.073)


def test_compare_pairs_points_and_summary_reports_each_model():
    rows = []
    for rate, cox in (("tuned", 200.0), ("stock", 100.0), ("no-overlap", 150.0)):
        for policy, tput in (("coxmoe", cox), ("moe-lightning", 50.0), ("flexgen", 25.0)):
            rows.append({"model": "m", "system": "s", "prompt_len": 8, "gen_len": 4, "policy": policy,
                         "throughput_tok_s": tput, "rate": rate})
    df = pd.DataFrame(rows)
    table = compare(df[df.rate == "tuned"], ("stock", df[df.rate == "stock"]),
                    ("no-overlap", df[df.rate == "no-overlap"]))
    assert len(table) == 1
    row = table.iloc[0]
    assert row["coxmoe_stock_over_tuned"] == pytest.approx(0.5)
    assert row["coxmoe_no-overlap_over_tuned"] == pytest.approx(0.75)
    assert row["speedup_vs_moe-lightning_tuned"] == pytest.approx(4.0)
    assert row["speedup_vs_moe-lightning_stock"] == pytest.approx(2.0)
    assert row["speedup_vs_moe-lightning_no-overlap"] == pytest.approx(3.0)
    assert row["speedup_vs_flexgen_stock"] == pytest.approx(4.0)
    lines = summary(table)
    assert lines[0].startswith("m, stock: CoX-MoE at 0.50-0.50x") and "4.00-4.00x" in lines[0]
    assert lines[1].startswith("m, no-overlap: CoX-MoE at 0.75-0.75x") and "-> 3.00-3.00x" in lines[1]
    assert lines[-1].startswith("baselines' throughput moved by at most 0.00% (moe-lightning), 0.00% (flexgen)")


def test_a_results_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    """A full disk or an unwritable --work was a traceback from the sweep store's OSError."""
    import sys

    from experiments import amx_sensitivity

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(sys, "argv", ["amx_sensitivity", "--work", str(blocker / "work"), "--out",
                                      str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exc:
        amx_sensitivity.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("amx_sensitivity: error:") and err.count("\n") == 1
