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
    with pytest.raises(SimInputError, match="table3: --set 'cpu.amx_effciency': not a numeric field of cpu"):
        ReproduceOptions(tmp_path, system_settings=(("cpu.amx_effciency", "0.1"),)).check_settings(["table3"])
    with pytest.raises(SimInputError, match="amx_efficiency must be in"):  # before the figure runs
        reproduce("table3", ReproduceOptions(tmp_path, system_settings=(("cpu.amx_efficiency", "2"),)))


def test_a_figure_runs_on_the_set_machine(tmp_path):
    """The `beyond` figure (its quick grid runs in seconds; table3's took 13 s a run here) on a Xeon with AMX at
    7.3% of its peak: the one design that runs experts on the CPU slows down, the rest run as on the preset."""
    base = reproduce("beyond", ReproduceOptions(tmp_path / "base", quick=True)).table
    slow = reproduce("beyond", ReproduceOptions(tmp_path / "slow", quick=True, system_settings=SET)).table
    assert set(slow["system"]) == {"a100-80g-8452y-ndp8[cpu.amx_efficiency=0.073]"}
    assert set(base["system"]) == {"a100-80g-8452y-ndp8"}
    amx = (base["busy_cpu_experts_s"] > 0).to_numpy()
    assert amx.any() and not amx.all()
    assert (slow.loc[amx, "throughput_tok_s"].to_numpy() < base.loc[amx, "throughput_tok_s"].to_numpy()).all()
    assert (slow.loc[~amx, "throughput_tok_s"].to_numpy() == base.loc[~amx, "throughput_tok_s"].to_numpy()).all()


def test_each_figure_is_checked_against_its_own_machines(tmp_path):
    import importlib

    from experiments.reproduce import FIGURE_SYSTEMS, FIGURES, UNSET_FIGURES

    for name in FIGURES:  # the table of machines follows the modules' own constants
        module = importlib.import_module(f"experiments.reproduce.{name}")
        if name == "fig7":
            import yaml

            spec = yaml.safe_load(module.SPEC.read_text())
            assert FIGURE_SYSTEMS[name] == tuple(spec["axes"]["system"])
        elif name not in UNSET_FIGURES:
            assert FIGURE_SYSTEMS[name] == (module.SYSTEM,), name
    ndp = ReproduceOptions(tmp_path, system_settings=(("ndp.compute_efficiency", "0.5"),))
    ndp.check_settings(["beyond"])  # the one figure on the near-memory machine
    with pytest.raises(SimInputError, match="fig7: .*has no ndp"):
        ndp.check_settings(["fig7", "beyond"])
    with pytest.raises(SimInputError, match="validation keeps its own machines"):
        reproduce("validation", ReproduceOptions(tmp_path, system_settings=SET))
