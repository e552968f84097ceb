"""`coxmoe reproduce` (quick grids): every figure writes PNG, PDF and CSV, the report links them, and timelines
draw simulated and measured decode steps from Chrome-trace JSON."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from experiments.cli import main
from experiments.reproduce import FIGURES
from experiments.reproduce.fig7 import summarize
from sim.errors import SimInputError


@pytest.fixture(scope="module")
def quick_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    # fig7's sweep on two local workers, as CI's two cores allow (26 s -> 16 s for its quick grid here)
    code = main(["reproduce", "all", "--out", str(out), "--quick", "--workers", "2"])
    return code, out


def test_reproduce_all_quick_writes_every_figure_and_the_report(quick_all):
    code, out = quick_all
    assert code == 0
    report = (out / "report.md").read_text()
    for name in FIGURES:
        for ext in ("png", "pdf"):
            data = (out / f"{name}.{ext}").read_bytes()
            assert data[:4] == (b"\x89PNG" if ext == "png" else b"%PDF"), name
        table = pd.read_csv(out / f"{name}.csv")
        assert len(table) > 0, name
        assert f"]({name}.png)" in report and f"coxmoe reproduce all --out {out} --quick --workers 2" in report
    assert report.count("- **Paper:**") == len(FIGURES)


def test_fig7_quick_numbers_are_consistent(quick_all):
    _, out = quick_all
    table = pd.read_csv(out / "fig7.csv")
    assert len(table) == 3 * 2  # quick: 3 models, one system, two workloads
    assert (table[["flexgen", "moe-lightning", "coxmoe"]] > 0).all().all()
    pd.testing.assert_series_equal(table["speedup_vs_flexgen"], table["coxmoe"] / table["flexgen"],
                                   check_names=False)
    # A rerun reuses the sweep's finished points instead of simulating them again.
    assert (out / "fig7_sweep" / "results.sqlite").is_file()


def test_microbatch_and_vram_show_the_mechanisms(quick_all):
    _, out = quick_all
    mb = pd.read_csv(out / "microbatch.csv")
    micro = mb[mb["op3"] == "micro-batched"].sort_values("micro_batch")
    coalesced = mb[mb["op3"] == "coalesced"].sort_values("micro_batch")
    # Smaller micro-batches cost micro-batched experts more; coalesced OP3 does not depend on them.
    assert micro["expert_s"].is_monotonic_decreasing and micro["expert_s"].iloc[0] > 1.3 * micro["expert_s"].iloc[-1]
    assert coalesced["expert_s"].max() < 1.05 * coalesced["expert_s"].min()
    vram = pd.read_csv(out / "vram.csv").set_index("attention")
    assert vram.loc["cpu", "expert weights_share"] > vram.loc["gpu", "expert weights_share"]
    assert vram.loc["gpu", "pool_kv_cache_gib"] > 0 and pd.isna(vram.loc["cpu", "pool_kv_cache_gib"])


def test_beyond_compares_designs_at_every_precision(quick_all):
    """Quick grid: CoX-MoE and MoE-Gen at native, INT8 and INT4 experts; INT8 experts are faster (fewer bytes,
    twice the compute rate) and the table is normalised to CoX-MoE at native precision."""
    _, out = quick_all
    table = pd.read_csv(out / "beyond.csv")
    assert set(table["precision"]) == {"native", "int8", "int4"} and set(table["design"]) == {"coxmoe", "moe-gen"}
    assert table["throughput_tok_s"].notna().all()
    by = table.set_index(["design", "precision"])["throughput_tok_s"]
    assert by[("coxmoe", "int8")] > by[("coxmoe", "native")] and by[("moe-gen", "int8")] > by[("moe-gen", "native")]
    base = table[(table["design"] == "coxmoe") & (table["precision"] == "native")]["vs_coxmoe_native"]
    assert float(base.iloc[0]) == pytest.approx(1.0)


def test_eas_and_calibration_numbers(quick_all):
    _, out = quick_all
    eas = pd.read_csv(out / "eas.csv")
    partial = eas[eas["resident_per_layer"] < eas["experts"]]
    wide = partial.pivot_table(index=["model", "resident_per_layer"], columns="method", values="hit_ratio")
    assert (wide["eas"] > wide["random"]).all() and (wide["oracle"] >= wide["eas"] - 0.01).all()
    runs = pd.read_csv(out / "eas_throughput.csv")  # each map under CoX-MoE's split and with cold experts on the CPU
    assert set(runs["placement"]) == {"coxmoe split", "cold on the CPU"} and len(runs) == 2 * 2 * 3
    assert (runs["throughput_tok_s"] > 0).all()
    cal = pd.read_csv(out / "calibration.csv")
    e2e = cal[cal["class"] == "end to end"]
    assert len(e2e) == 2 and (e2e["measured_s"] > 0).all() and (e2e["predicted_profile_s"] > 0).all()


@pytest.mark.parametrize("flags, cpu", [({"amx_bf16"}, "CPU (AMX) experts"), (set(), "CPU experts")])
def test_a_measured_timeline_names_the_cpu_that_ran_it(tmp_path, capsys, monkeypatch, flags, cpu):
    """`execute --timeline` labels the CPU tracks after this host's CPU, whatever system the plan was made for."""
    import executor.cpu_experts as cpu_experts
    from tests.test_calibration import _tiny_file

    monkeypatch.setattr(cpu_experts, "cpu_flags", lambda: flags)
    record = tmp_path / "measured.json"
    assert main(["execute", "--model-file", _tiny_file(tmp_path), "--system", "a5000-epyc7453-512g", "--policy",
                 "cpu-only", "--batch", "2", "--prompt-len", "2", "--gen-len", "2", "--cuda", "off", "--warmup", "0",
                 "--timeline", str(record)]) == 0
    names = {e["args"]["name"] for e in json.loads(record.read_text())["traceEvents"] if e.get("name") == "thread_name"}
    assert cpu in names and f"timeline: {record}" in capsys.readouterr().out  # says where it wrote


def test_timeline_with_a_measured_record(tmp_path, capsys):
    from tests.test_calibration import _tiny_file

    record = tmp_path / "measured.json"
    assert main(["execute", "--model-file", _tiny_file(tmp_path), "--policy", "coxmoe", "--batch", "4",
                 "--prompt-len", "4", "--gen-len", "3", "--cuda", "off", "--warmup", "0", "--timeline",
                 str(record)]) == 0
    out = tmp_path / "r"
    assert main(["reproduce", "timeline", "--out", str(out), "--quick", "--record", str(record)]) == 0
    table = pd.read_csv(out / "timeline.csv")
    assert table["timeline"].nunique() == 2 and (table["busy_ms"] > 0).all()
    sim = json.loads((out / "timeline_sim.json").read_text())
    assert any(e.get("ph") == "X" for e in sim["traceEvents"])
    capsys.readouterr()
    assert main(["timeline", str(out / "timeline_sim.json"), str(record), "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "g.pdf").is_file()
    assert main(["timeline", str(record), "--out", str(tmp_path / "h"), "--step", "99"]) == 2
    assert "decode step 99 is not in cox-moe execution (measured" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "fig9", "--out", "x"], "unknown figure 'fig9'"),
    (["reproduce", "calibration", "--out", "x", "--profile", "/nonexistent"], "no profile.json"),
    (["reproduce", "timeline", "--out", "x", "--record", "/nonexistent.json"], "no such file"),
    (["timeline", "/nonexistent.json", "--out", "x"], "no such file"),
    # a figure's flags given to another figure were ignored in silence
    (["reproduce", "vram", "--out", "x", "--engine", "ray", "--workers", "4", "--record", "r.json"],
     "reproduce vram does not use --workers, --engine, --record (for fig7, timeline)"),
    (["reproduce", "calibration", "--out", "x", "--workers", "2"], "does not use --workers (for fig7)"),
    (["reproduce", "fig7", "--out", "x", "--ray-address", "1.2.3.4:6379"], "needs --engine ray"),
    (["reproduce", "all", "--out", "x", "--ray-address", "1.2.3.4:6379"], "needs --engine ray"),
])
def test_bad_reproduce_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    argv = [a if a != "x" else str(tmp_path / "o") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_malformed_timeline_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"traceEvents": [{"ph": "X", "ts": 0}]}))
    assert main(["timeline", str(bad), "--out", str(tmp_path / "g")]) == 2
    assert "not a cox-moe timeline" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_summarize_keeps_failed_points_blank():
    rows = [{"model": "m", "system": "s", "prompt_len": 1, "gen_len": 1, "policy": p, "status": st,
             "throughput_tok_s": t} for p, st, t in (("coxmoe", "ok", 10.0), ("moe-lightning", "ok", 5.0),
                                                     ("flexgen", "failed", None))]
    table = summarize(pd.DataFrame(rows))
    assert table["speedup_vs_moe-lightning"].iloc[0] == 2.0 and pd.isna(table["speedup_vs_flexgen"].iloc[0])


def test_keep_carries_a_figure_from_the_earlier_report(tmp_path):
    from experiments.reproduce import ReproduceOptions
    from experiments.reproduce.report import kept_parts

    report = tmp_path / "report.md"
    report.write_text("# CoX-MoE reproduction report\n\n| figure | paper | here |\n|---|---|---|\n"
                      "| [calibration](#simulator-against-the-executor) | claim | 2.9% |\n\n"
                      "## Simulator against the executor\n\n- **Here:** 2.9%\n\n## Next section\n\ntext\n")
    kept = kept_parts(report, ("calibration",))
    row, section = kept["calibration"]
    assert row.startswith("| [calibration](") and "2.9%" in row
    assert section.startswith("## Simulator against the executor") and "Next section" not in section
    with pytest.raises(SimInputError, match="no section for it"):
        kept_parts(report, ("fig7",))
    with pytest.raises(SimInputError, match="unknown figure"):
        ReproduceOptions(tmp_path, keep=("nope",))
    assert "--keep calibration" in ReproduceOptions(tmp_path, keep=("calibration",)).command("all")


def test_fig7_takes_the_seed_it_is_given():
    """`--seed` reaches every fig7 point (the routing traces' draws) and so its sweep keys; 0 keeps the spec's."""
    from experiments.reproduce.fig7 import spec
    from experiments.sweep.spec import expand

    default, seeded = expand(spec(True)), expand(spec(True, seed=5))
    assert {p.config["seed"] for p in default} == {0} and {p.config["seed"] for p in seeded} == {5}
    assert not {p.key for p in default} & {p.key for p in seeded}
