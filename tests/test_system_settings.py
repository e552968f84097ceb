"""`--set FIELD=VALUE` (`SimConfig.system_settings`): one number of the system spec set by its path, checked like
a spec file, named in the result, carried through sweeps; bad settings are one-line errors (exit 2)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiments.cli import main
from experiments.sweep.spec import expand
from sim.api import simulate
from sim.config import SimConfig
from sim.errors import SimInputError
from sim.specs import load_system
from sim.specs.overrides import apply_system_settings

SIM = ["simulate", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--policy", "coxmoe", "--batch", "64",
       "--prompt-len", "32", "--gen-len", "4", "--decode-sample", "2", "--json"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_setting_changes_that_number_only_and_names_the_system():
    base = load_system("a100-80g-8452y")
    s = apply_system_settings(base, {"cpu.amx_efficiency": "0.073", "dram_bytes": "274877906944",
                                     "link.h2d_efficiency": "0.5"})
    assert (s.cpu.amx_efficiency, s.dram_bytes, s.link.h2d_efficiency) == (0.073, 274877906944, 0.5)
    assert isinstance(s.dram_bytes, int)
    assert s.name == "a100-80g-8452y[cpu.amx_efficiency=0.073,dram_bytes=274877906944,link.h2d_efficiency=0.5]"
    assert s.cpu.sources["amx_efficiency"].startswith("set by hand (--set cpu.amx_efficiency=0.073); was ")
    assert (s.gpu, s.cpu.cores, s.link.d2h_efficiency) == (base.gpu, base.cpu.cores, base.link.d2h_efficiency)
    assert apply_system_settings(base, {}) is base


@pytest.mark.parametrize("setting, message", [
    ({"cpu.amx_efficiency": "1.5"}, "amx_efficiency must be in (0, 1]"),
    ({"cpu.amx_efficency": "0.1"}, "not a numeric field of cpu; choose from"),
    ({"gpu.name": "x"}, "not a numeric field of gpu"),
    ({"ssd.bw": "1"}, "the section must be one of gpu, cpu, link, ndp, disk"),
    ({"disk.read_bytes_per_s": "1e9"}, "system a100-80g-8452y has no disk"),
    ({"ndp.compute_efficiency": "0.5"}, "has no ndp"),
    ({"gpu.hbm_bytes": "2.5"}, "a whole number, got"),
    ({"gpu.gemm_efficiency": "nan"}, "needs a finite number"),
    ({"gpu.gemm_efficiency": "fast"}, "not a number"),
    ({"dram_bytes": "-1"}, "dram_bytes"),
])
def test_bad_settings_are_refused_naming_the_problem(setting, message):
    with pytest.raises(SimInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        apply_system_settings(load_system("a100-80g-8452y"), setting)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(system=st.sampled_from(["a100-80g-8452y", "2x-h100-sxm-nvlink-8480", "a100-80g-8452y-ndp8", "gcp-l4-g2"]),
       path=st.one_of(st.sampled_from(["cpu.amx_efficiency", "gpu.hbm_bytes", "link.latency_s", "dram_bytes",
                                       "cpu.cores", "gpu.kernel_launch_s", "cpu.has_amx", "name", "gpu.",
                                       "ndp.compute_efficiency", "ndp.dimms"]),
                      st.text(max_size=20)),
       value=st.one_of(st.text(max_size=12), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                       st.integers(min_value=-(2**70), max_value=2**70).map(str)))
def test_fuzzed_settings_give_a_valid_system_or_one_typed_error(system, path, value):
    base = load_system(system)
    try:
        s = apply_system_settings(base, {path: value})
    except SimInputError as exc:
        assert "\n" not in str(exc)
    else:  # the named field holds the number given, finite; every other field is the preset's
        assert s.name.startswith(f"{system}[")
        section, _, name = path.rpartition(".")
        got = getattr(getattr(s, section) if section else s, name)
        assert math.isfinite(got) and got == float(value)
        unchanged = dataclasses.replace(s, name=base.name)
        if section:
            unchanged = dataclasses.replace(unchanged, **{section: dataclasses.replace(
                getattr(s, section), **{name: getattr(getattr(base, section), name)})})
        else:
            unchanged = dataclasses.replace(unchanged, **{name: getattr(base, name)})
        assert unchanged == base


def _settable(system: str) -> list[str]:
    """The numeric fields --set accepts on a preset (not the CPU's descriptive core count, AMX fields only with AMX,
    GPU and link fields only on a one-GPU machine)."""
    from sim.specs.overrides import SECTIONS, _numeric_fields, _optional_numbers

    base = load_system(system)
    data = dataclasses.asdict(base)
    paths = list(_numeric_fields(data, _optional_numbers(base)))
    for section in SECTIONS:
        if isinstance(data.get(section), dict) and not (section in ("gpu", "link") and base.extra_gpus):
            spec = getattr(base, section)
            paths += [f"{section}.{f}" for f in _numeric_fields(data[section], _optional_numbers(spec))
                      if (section, f) != ("cpu", "cores") and (base.cpu.has_amx or not f.startswith("amx_"))]
    return paths


SETTABLE = {name: _settable(name) for name in ("a100-80g-8452y", "a100-80g-8452y-ndp8", "gcp-l4-g2", "gcp-t4-n1")}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), system=st.sampled_from(sorted(SETTABLE)), factor=st.floats(0.5, 1.0))
def test_in_range_settings_apply_exactly_that_number(data, system, factor):
    """Every settable field, set to a number in range (its preset value scaled by 0.5-1, or 1 when unset): the
    system is accepted, the field reads back as that number, and nothing else changes."""
    path = data.draw(st.sampled_from(SETTABLE[system]))
    base = load_system(system)
    section, _, name = path.rpartition(".")
    current = getattr(getattr(base, section) if section else base, name)
    if current is None:
        value = 1.0
    elif isinstance(current, int):
        value = max(1, int(current * factor)) if current > 0 else current
    else:
        value = current * factor
    s = apply_system_settings(base, {path: repr(value)})
    got = getattr(getattr(s, section) if section else s, name)
    assert got == value and type(got) is type(value)
    rest = dataclasses.replace(s, name=base.name)
    if section:
        rest = dataclasses.replace(rest, **{section: dataclasses.replace(getattr(s, section), **{name: current})})
    else:
        rest = dataclasses.replace(rest, **{name: current})
    assert rest == base


def test_cli_set_runs_the_changed_machine_and_refuses_bad_ones(capsys):
    code, out, err = run(capsys, *SIM)
    assert code == 0, err
    base = json.loads(out)
    code, out, err = run(capsys, *SIM, "--set", "cpu.amx_efficiency=0.073")
    assert code == 0, err
    slow = json.loads(out)
    assert slow["system"] == "a100-80g-8452y[cpu.amx_efficiency=0.073]"
    assert slow["throughput_tok_s"] < base["throughput_tok_s"]  # this plan runs experts on the CPU
    same = simulate(SimConfig("mixtral-8x7b", "a100-80g-8452y", "coxmoe", batch=64, prompt_len=32, gen_len=4,
                              decode_sample=2, system_settings={"cpu.amx_efficiency": 0.073}))
    assert same.throughput_tok_s == slow["throughput_tok_s"]
    for bad, message in ((["--set", "cpu.amx_efficiency"], "must look like KEY=VALUE"),
                         (["--set", "cpu.amx_efficiency=2"], "amx_efficiency must be in (0, 1]")):
        code, out, err = run(capsys, *SIM, *bad)
        assert code == 2 and message in err and err.count("\n") == 1 and out == ""


def test_sweep_axis_of_settings_keys_points_apart_and_keeps_old_keys():
    points = expand({"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 8, "prompt_len": 8,
                               "gen_len": 2},
                     "axes": {"system_settings": [{}, {"cpu.amx_efficiency": 0.073}]}})
    assert len(points) == 2 and len({p.key for p in points}) == 2
    plain, set_ = points
    assert "system_settings" not in plain.config  # at its default a point hashes as before the setting existed
    assert set_.config["system_settings"] == {"cpu.amx_efficiency": "0.073"}
    with pytest.raises(SimInputError, match="system_settings must be a mapping"):
        expand({"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "system_settings": "x"}})


def test_settings_that_would_reach_part_of_the_machine_or_nothing_are_refused():
    two = load_system("2x-h100-sxm-nvlink-8480")
    # the first GPU's reservation too (each extra GPU has its own; a topology audit found 20 GiB set on one of two)
    for path, value in (("gpu.gemm_efficiency", "0.5"), ("link.h2d_efficiency", "0.5"),
                        ("gpu_reserved_bytes", str(2**30))):
        with pytest.raises(SimInputError, match="has 2 GPUs and --set reaches only the first"):
            apply_system_settings(two, {path: value})
    assert apply_system_settings(load_system("h100-80g-8452y"), {"gpu_reserved_bytes": str(2**31)}).gpu_reserved_bytes \
        == 2**31
    assert apply_system_settings(two, {"cpu.dram_efficiency": "0.5"}).cpu.dram_efficiency == 0.5
    with pytest.raises(SimInputError, match="has no AMX, so the setting would do nothing"):
        apply_system_settings(load_system("gcp-l4-g2"), {"cpu.amx_efficiency": "0.5"})
    with pytest.raises(SimInputError, match="rates already count its cores"):  # read by no cost: it was ignored
        apply_system_settings(load_system("a100-80g-8452y"), {"cpu.cores": "1"})
    ndp = apply_system_settings(load_system("a100-80g-8452y-ndp8"), {"ndp.compute_efficiency": "0.5"})
    assert ndp.ndp.compute_efficiency == 0.5


def test_sweeps_check_settings_up_front_and_key_them_by_their_numbers():
    from sim.specs.overrides import normalised_settings

    assert normalised_settings(load_system("a100-80g-8452y"), {"cpu.amx_efficiency": "0.0730",
                                                              "dram_bytes": "2.5e11"}) == {
        "cpu.amx_efficiency": "0.073", "dram_bytes": "250000000000"}
    points = expand({"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 8, "prompt_len": 8,
                               "gen_len": 2},
                     "axes": {"system_settings": [{"cpu.amx_efficiency": "0.0730"}, {"cpu.amx_efficiency": 0.073}]}})
    assert len(points) == 1  # one machine, one point
    with pytest.raises(SimInputError, match="sweep point: system_settings 'cpu.amx_effciency': not a numeric field"):
        expand({"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y",
                          "system_settings": {"cpu.amx_effciency": 0.073}}})


def test_compare_runs_every_policy_on_the_set_machine(capsys):
    argv = ["compare", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--batch", "16", "--prompt-len", "16",
            "--gen-len", "2", "--policies", "coxmoe,fiddler", "--json"]
    code, out, err = run(capsys, *argv, "--set", "cpu.amx_efficiency=0.073")
    assert code == 0, err
    assert json.loads(out)["system"] == "a100-80g-8452y[cpu.amx_efficiency=0.073]"


def test_an_unset_optional_number_can_be_set():
    """`cpu.attention_overhead_s` is null until set (CPU attention then pays `op_overhead_s`): --set reaches it as a
    number (it was called not numeric), range-checked like any other, and the run slows by the extra call cost."""
    base = load_system("a100-80g-8452y")
    assert base.cpu.attention_overhead_s is None
    changed = apply_system_settings(base, {"cpu.attention_overhead_s": "0.001"})
    assert changed.cpu.attention_overhead_s == 0.001 and isinstance(changed.cpu.attention_overhead_s, float)
    assert "set by hand" in changed.cpu.sources["attention_overhead_s"]
    with pytest.raises(SimInputError, match="attention_overhead_s must be in"):
        apply_system_settings(base, {"cpu.attention_overhead_s": "2"})
    run = dict(model="mixtral-8x7b", policy="moe-lightning", batch=64, prompt_len=64, gen_len=4)
    assert simulate(system=changed, **run).total_s > simulate(system=base, **run).total_s
