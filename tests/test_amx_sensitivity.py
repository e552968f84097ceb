"""The AMX-rate sensitivity study: its system files change only the 8452Y's AMX efficiency, and its comparison
pairs each grid point's throughputs and speedups under both rates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from experiments.amx_sensitivity import compare, summary
from experiments.sweep.spec import load_spec
from sim.specs import load_system

SYSTEMS = Path(__file__).resolve().parents[1] / "experiments" / "specs" / "systems"


@pytest.mark.parametrize("preset", ["rtx6000ada-8452y", "a100-80g-8452y", "h100-80g-8452y"])
def test_stock_amx_systems_differ_from_their_preset_only_in_the_amx_rate(preset):
    base, stock = load_system(preset), load_system(str(SYSTEMS / f"{preset}-stock-amx.yaml"))
    assert base.cpu.amx_efficiency == pytest.approx(0.289) and stock.cpu.amx_efficiency == pytest.approx(0.073)
    assert stock.cpu.gemm_flops_per_s == pytest.approx(base.cpu.gemm_flops_per_s * 0.073 / 0.289)
    same_cpu = dataclasses.replace(stock.cpu, name=base.cpu.name, amx_efficiency=base.cpu.amx_efficiency,
                                   sources=base.cpu.sources)
    assert dataclasses.replace(stock, name=base.name, cpu=same_cpu) == base


def test_the_stock_grid_is_the_fig7_grid_on_the_stock_systems():
    root = Path(__file__).resolve().parents[1] / "experiments" / "specs"
    tuned, stock = load_spec(root / "fig7.yaml"), load_spec(root / "fig7_stock_amx.yaml")

    def key(point, rename):
        cfg = dict(point.config)
        cfg["system"] = rename(str(cfg["system"]))
        return tuple(sorted((k, str(v)) for k, v in cfg.items()))

    assert len(tuned) == len(stock) == 108
    assert {key(p, str) for p in tuned} == {key(p, lambda s: Path(s).name.removesuffix("-stock-amx.yaml"))
                                            for p in stock}


def test_compare_pairs_points_and_summary_reports_each_model():
    rows = []
    for rate, cox in (("tuned", 200.0), ("stock", 100.0)):
        for policy, tput in (("coxmoe", cox), ("moe-lightning", 50.0), ("flexgen", 25.0)):
            rows.append({"model": "m", "system": "s", "prompt_len": 8, "gen_len": 4, "policy": policy,
                         "throughput_tok_s": tput, "rate": rate})
    df = pd.DataFrame(rows)
    table = compare(df[df.rate == "tuned"], df[df.rate == "stock"])
    assert len(table) == 1
    row = table.iloc[0]
    assert row["coxmoe_stock_over_tuned"] == pytest.approx(0.5)
    assert row["speedup_vs_moe-lightning_tuned"] == pytest.approx(4.0)
    assert row["speedup_vs_moe-lightning_stock"] == pytest.approx(2.0)
    assert row["speedup_vs_flexgen_stock"] == pytest.approx(4.0)
    lines = summary(table)
    assert lines[0].startswith("m: CoX-MoE at 0.50-0.50x") and "4.00-4.00x" in lines[0]
    assert lines[-1].startswith("baselines' throughput moved by at most 0.00%")
