"""`coxmoe reproduce --set`: the simulated paper figures run on machines with the set numbers, the report and
each figure's command say so, validation and calibration keep their own machines, and bad input is refused
before any figure runs."""

from __future__ import annotations

import pytest

from experiments.reproduce import ReproduceOptions, reproduce
from sim.errors import SimInputError

SET = (("cpu.amx_efficiency", "0.073"),)


def test_options_check_settings_up_front_and_name_them_in_commands(tmp_path):
    options = ReproduceOptions(tmp_path, quick=True, system_settings=SET)
    assert options.system("rtx6000ada-8452y").cpu.amx_efficiency == 0.073
    assert options.command("table3").endswith("--set cpu.amx_efficiency=0.073")
    assert options.command("all").endswith("--set cpu.amx_efficiency=0.073")
    assert "--set" not in options.command("validation") and "--set" not in options.command("calibration")
    with pytest.raises(SimInputError, match="--set with --keep"):
        ReproduceOptions(tmp_path, keep=("fig7",), system_settings=SET)
    with pytest.raises(SimInputError, match="not a numeric field of cpu"):
        ReproduceOptions(tmp_path, system_settings=(("cpu.amx_effciency", "0.1"),))
    with pytest.raises(SimInputError, match="amx_efficiency must be in"):
        ReproduceOptions(tmp_path, system_settings=(("cpu.amx_efficiency", "2"),))


def test_a_figure_runs_on_the_set_machine(tmp_path):
    base = reproduce("table3", ReproduceOptions(tmp_path / "base", quick=True)).table
    slow = reproduce("table3", ReproduceOptions(tmp_path / "slow", quick=True, system_settings=SET)).table
    assert set(slow["system"]) == {"rtx6000ada-8452y[cpu.amx_efficiency=0.073]"}
    assert set(base["system"]) == {"rtx6000ada-8452y"}
    cox = slow["step"].str.contains("coalesced experts with AMX")
    assert (slow.loc[cox, "throughput_tok_s"].to_numpy() < base.loc[cox, "throughput_tok_s"].to_numpy()).all()
    baseline = slow["step"] == "MoE-Lightning (baseline)"
    assert (slow.loc[baseline, "throughput_tok_s"].to_numpy()
            == base.loc[baseline, "throughput_tok_s"].to_numpy()).all()
