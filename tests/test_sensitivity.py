"""`coxmoe sensitivity`: one system number at a time, the point simulated again, the throughput change ranked;
by default every number whose source is marked [assumed] or [borrowed]."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.cli import main
from experiments.sensitivity import default_values, parse_vary, run_sensitivity, unmeasured_fields, variants
from sim.config import SimConfig
from sim.errors import SimInputError
from sim.specs import load_system

POINT = dict(model="mixtral-8x7b", system="a100-80g-8452y", policy="coxmoe", batch=16, prompt_len=16, gen_len=3,
             routing="table:mixtral-8x7b", decode_sample=1)
ARGV = ["sensitivity", "--model", "mixtral-8x7b", "--system", "a100-80g-8452y", "--policy", "coxmoe", "--batch",
        "16", "--prompt-len", "16", "--gen-len", "3", "--routing", "table:mixtral-8x7b", "--decode-sample", "1"]


def test_unmeasured_fields_are_the_marked_numbers_and_defaults_stay_in_range():
    fields = unmeasured_fields(load_system("a100-80g-8452y"))
    assert {"cpu.amx_efficiency", "gpu.hbm_efficiency", "cpu.op_overhead_s", "gpu_reserved_bytes"} <= set(fields)
    assert "cpu.dram_efficiency" not in fields  # measured (Intel MLC on the 8452Y)
    assert default_values("gpu.hbm_efficiency", 0.85) == [0.425, 1.0]  # a fraction stops at 1
    assert default_values("gpu.gemm_efficiency", 1.0) == [0.5]  # already at the top: only down
    assert default_values("gpu_reserved_bytes", 3) == [2, 6]  # whole numbers stay whole (1.5 rounds to 2)


def test_vary_parses_and_refuses_in_one_line():
    assert parse_vary(["cpu.amx_efficiency=0.073, 0.15", "cpu.amx_efficiency=0.5"]) == {
        "cpu.amx_efficiency": ["0.073", "0.15", "0.5"]}
    for bad in ("cpu.amx_efficiency", "=0.1", "cpu.amx_efficiency=,"):
        with pytest.raises(SimInputError, match="must look like FIELD=V1"):
            parse_vary([bad])
    with pytest.raises(SimInputError, match="amx_efficiency must be in"):  # checked before anything runs
        variants(SimConfig(**POINT), {"cpu.amx_efficiency": ["0.1", "3"]})


def test_ranked_rows_with_the_base_first_and_the_speedup_against_a_baseline():
    table = run_sensitivity(SimConfig(**POINT), {"cpu.amx_efficiency": ["0.073", "0.289"],
                                                 "gpu.gemm_efficiency": ["0.4"]}, against="moe-lightning",
                            progress=False)
    assert list(table["field"])[0] == "(base)" and len(table) == 4
    assert table.loc[0, "change"] == 0 and table.loc[0, "speedup_change"] == 0
    changes = table["change"].iloc[1:].abs().tolist()
    assert changes == sorted(changes, reverse=True)
    same = table[(table["field"] == "cpu.amx_efficiency") & (table["value"] == "0.289")].iloc[0]
    assert same["change"] == 0 and same["was"] == "0.289"  # the preset's own value: no change
    slow = table[(table["field"] == "cpu.amx_efficiency") & (table["value"] == "0.073")].iloc[0]
    assert slow["throughput_tok_s"] < table.loc[0, "throughput_tok_s"]  # its CPU experts run slower
    assert slow["speedup"] == pytest.approx(slow["throughput_tok_s"] / slow["against_tok_s"])
    assert "[borrowed]" in slow["source"]


def test_cli_prints_json_and_refuses_bad_input(capsys, tmp_path):
    code = main([*ARGV, "--vary", "gpu.hbm_efficiency=0.5", "--json", "--csv", str(tmp_path / "s.csv"),
                 "--plot", str(tmp_path / "s.png")])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(out)
    assert [r["field"] for r in rows] == ["(base)", "gpu.hbm_efficiency"]
    assert (tmp_path / "s.csv").is_file() and (tmp_path / "s.png").stat().st_size > 0
    for extra, message in ((["--vary", "gpu.hbm_effic=0.5"], "--vary 'gpu.hbm_effic': not a numeric field of gpu"),
                           (["--vary", "cpu.amx_efficiency=0.1,abc"], "--vary 'cpu.amx_efficiency': 'abc' is not a"),
                           (["--vary", "cpu.dram_bytes_per_s=-1"], "with --vary: cpu: cpu xeon-8452y: dram_bytes"),
                           (["--vary", "gpu.hbm_efficiency"], "must look like FIELD=V1"),
                           (["--against", "no-such-policy"], "not a policy")):
        code = main([*ARGV, *extra])
        out, err = capsys.readouterr()
        assert code == 2 and message in err and err.count("\n") == 1 and out == ""


def test_default_variants_skip_numbers_set_cannot_reach_alone():
    config = SimConfig(**{**POINT, "system": "2x-h100-sxm-nvlink-8480"})
    pairs = variants(config, None)
    assert pairs and not any(path.startswith(("gpu.", "link.")) for path, _ in pairs)


def test_a_variant_that_does_not_fit_is_a_row_of_nan_ranked_last(capsys):
    table = run_sensitivity(SimConfig(**POINT), {"dram_bytes": ["50000000000"], "gpu.gemm_efficiency": ["0.5"]},
                            progress=False)
    assert list(table["field"]) == ["(base)", "gpu.gemm_efficiency", "dram_bytes"]
    last = table.iloc[-1]
    assert np.isnan(last["throughput_tok_s"]) and np.isnan(last["change"]) and "DRAM" in last["note"]
    code = main([*ARGV, "--vary", "dram_bytes=50000000000"])
    out, err = capsys.readouterr()
    assert code == 0 and "n/a" in out and "DRAM" in out


def test_rank_by_speedup_and_skipped_defaults_are_named(capsys):
    table = run_sensitivity(SimConfig(**POINT), {"gpu.gemm_efficiency": ["0.5"], "cpu.amx_efficiency": ["0.1"]},
                            against="moe-lightning", progress=False, rank_by="speedup")
    changes = table["speedup_change"].iloc[1:].abs().tolist()
    assert changes == sorted(changes, reverse=True)
    with pytest.raises(SimInputError, match="needs --against"):
        run_sensitivity(SimConfig(**POINT), {"gpu.gemm_efficiency": ["0.5"]}, progress=False, rank_by="speedup")
    skipped: list[str] = []
    variants(SimConfig(**{**POINT, "system": "2x-h100-sxm-nvlink-8480"}), None, skipped)
    assert skipped and all("has 2 GPUs" in line for line in skipped)


def test_whole_numbers_print_whole():
    table = run_sensitivity(SimConfig(**POINT), {"gpu_reserved_bytes": ["536870912"]}, progress=False)
    assert table.iloc[1]["was"] == "1073741824"


def test_a_variant_whose_machine_cannot_hold_the_kv_cache_is_a_row_not_a_stop():
    """The KV cache past every memory (refused before a trace is drawn) is a capacity error like a plan that does
    not fit: the variant's row says so and the other variants run."""
    config = SimConfig(model="olmoe-1b-7b", system="gcp-t4-n1", policy="coxmoe", batch=2048, prompt_len=512,
                       gen_len=2, decode_sample=1)
    table = run_sensitivity(config, {"dram_bytes": ["20e9"]})
    small = table[table["field"] == "dram_bytes"].iloc[0]
    assert np.isnan(small["throughput_tok_s"]) and "memory exceeded" in small["note"]
    assert np.isfinite(table.iloc[0]["throughput_tok_s"])


def _drawn(monkeypatch, table, against=None):
    """The tornado chart's axes as drawn (tick labels, bar widths, x label), captured before saving."""
    import experiments.sensitivity as sens

    seen = {}

    def capture(fig, path, dpi=None):
        ax = fig.axes[0]
        seen.update(labels=[t.get_text() for t in ax.get_yticklabels()], widths=[p.get_width() for p in ax.patches],
                    xlabel=ax.get_xlabel(), texts=[t.get_text() for t in ax.texts], ylim=ax.get_ylim())

    monkeypatch.setattr(sens, "save_figure_file", capture)
    sens.tornado_plot(table, "unused.png", "title", against)
    return seen


def test_tornado_labels_every_variant_and_marks_one_that_does_not_run(monkeypatch):
    table = run_sensitivity(SimConfig(**POINT), {"dram_bytes": ["50000000000"], "gpu.gemm_efficiency": ["0.5"]},
                            progress=False)
    drawn = _drawn(monkeypatch, table)
    assert drawn["labels"] == ["dram_bytes = 50000000000", "gpu.gemm_efficiency = 0.5"]  # bottom to top
    assert drawn["widths"][0] == 0.0 and drawn["widths"][1] == pytest.approx(100 * table.iloc[1]["change"])
    assert any("does not run" in t for t in drawn["texts"])
    assert drawn["ylim"][0] < 0 < 1 < drawn["ylim"][1]  # both rows inside the axes
    assert drawn["xlabel"].startswith("throughput change")


def test_tornado_draws_the_speedup_change_when_ranked_by_it(monkeypatch):
    table = run_sensitivity(SimConfig(**POINT), {"gpu.gemm_efficiency": ["0.5"], "cpu.amx_efficiency": ["0.1"]},
                            against="moe-lightning", progress=False, rank_by="speedup")
    drawn = _drawn(monkeypatch, table, "moe-lightning")
    assert drawn["widths"] == pytest.approx(list(100 * table["speedup_change"].iloc[1:][::-1]))
    assert "speed-up over moe-lightning" in drawn["xlabel"]


def test_a_base_point_that_does_not_run_is_refused_before_any_variant(monkeypatch):
    import experiments.sensitivity as sens

    calls = []

    def point(config, settings, policy=None):
        calls.append(settings)
        return {"throughput_tok_s": np.nan, "total_s": np.nan, "prefill_s": np.nan, "decode_s": np.nan,
                "note": "GPU memory exceeded"}

    monkeypatch.setattr(sens, "_point", point)
    with pytest.raises(SimInputError, match="base point does not run: GPU memory exceeded"):
        run_sensitivity(SimConfig(**POINT), {"gpu.gemm_efficiency": ["0.5", "0.25"]}, against="gpu-only",
                        progress=False)
    assert calls == [{}]  # the base alone, not its baseline run nor any variant


def test_header_says_when_the_other_policy_does_not_run_and_csv_may_be_compressed(capsys, tmp_path, monkeypatch):
    import gzip

    import experiments.sensitivity as sens

    real = sens._point

    def point(config, settings, policy=None):  # the baseline never fits
        if policy is not None:
            return {"throughput_tok_s": np.nan, "total_s": np.nan, "prefill_s": np.nan, "decode_s": np.nan,
                    "note": "GPU (a100) for gpu-only memory exceeded"}
        return real(config, settings, policy)

    monkeypatch.setattr(sens, "_point", point)
    csv = tmp_path / "s.csv.gz"
    code = main([*ARGV, "--vary", "gpu.gemm_efficiency=0.5", "--against", "gpu-only", "--csv", str(csv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    head = out.splitlines()[0]
    assert "nan" not in head and "gpu-only does not run (GPU (a100) for gpu-only memory exceeded)" in head
    assert gzip.decompress(csv.read_bytes()).decode().startswith("field,")


def test_a_variant_whose_run_outlasts_the_clock_is_a_row_not_a_stop():
    """A rate near zero makes one variant's run longer than int64 nanoseconds: that row says so, the rest run."""
    config = SimConfig(model="mixtral-8x7b", system="a100-80g-8452y", policy="stream-experts", batch=8, prompt_len=16,
                       gen_len=4, system_settings={"link.h2d_bytes_per_s": "1000"})
    table = run_sensitivity(config, {"link.h2d_efficiency": ["0.003", "0.5"]}, progress=False)
    rows = {row["value"]: row for _, row in table.iloc[1:].iterrows()}
    assert np.isnan(rows["0.003"]["throughput_tok_s"]) and "the run would last" in rows["0.003"]["note"]
    assert np.isfinite(rows["0.5"]["throughput_tok_s"]) and np.isfinite(table.iloc[0]["throughput_tok_s"])
