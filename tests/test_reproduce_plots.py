"""Reproduced figures on edge inputs: any number of systems or kernel sets drawn, points that did not fit marked
(never a zero bar or 'nanx'), no crash when a figure has nothing feasible to show."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from experiments.reproduce import beyond, fig7, validation, vram
from experiments.reproduce.report import number
from experiments.reproduce.style import FILLED_MARKERS, markers_for, palette


@pytest.fixture
def figures(monkeypatch):
    """Capture each figure instead of saving it: module -> list of figures."""
    import matplotlib.pyplot as plt

    seen: list = []

    def keep(fig, out, stem):
        seen.append(fig)
        return []

    for module in (fig7, validation, vram, beyond):
        monkeypatch.setattr(module, "save_figure", keep)
    yield seen
    for fig in seen:
        plt.close(fig)


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]


def _legend_labels(fig) -> list[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    return [t.get_text() for leg in legends for t in leg.get_texts()]


def test_palette_and_markers_cover_any_number_of_categories():
    keys = [f"system-{i}" for i in range(25)]
    colors = palette(keys)
    assert list(colors) == keys and len(set(list(colors.values())[:20])) == 20
    markers = markers_for(["moe-gen", "flexgen", "new-one"], {"flexgen": "s"})
    assert markers["flexgen"] == "s"
    assert all(m in FILLED_MARKERS for m in markers.values()) and len(set(markers.values())) == 3


def _validation_rows(systems: int) -> pd.DataFrame:
    rows = []
    for i in range(systems):
        for policy, status in (("flexgen", "complete"), ("moe-gen", "incomplete")):
            rows.append({"id": f"p{i}-{policy}", "mode": "published", "system": f"machine-{i}", "policy": policy,
                         "status": status, "role": "held-out", "measured": 10.0 + i, "predicted": 12.0 + i,
                         "ratio": (12.0 + i) / (10.0 + i), "learned_ratio": 1.1})
    return pd.DataFrame(rows)


def test_validation_scatter_draws_every_system_and_policy(figures, tmp_path):
    validation.plot(_validation_rows(7), tmp_path)
    (fig,) = figures
    labels = _legend_labels(fig)
    assert {f"machine-{i}" for i in range(7)} <= set(labels) and {"flexgen", "moe-gen"} <= set(labels)
    # Every point drawn is visible: hollow points keep their edge colour (an "x" marker has none).
    for ax in fig.axes:
        for coll in ax.collections:
            if len(coll.get_offsets()):
                assert coll.get_edgecolor().size, coll


def test_validation_scatter_without_drawable_points_says_so(figures, tmp_path):
    table = _validation_rows(1)
    table["predicted"] = 0.0
    table["ratio"] = table["learned_ratio"] = 0.0
    validation.plot(table, tmp_path)
    assert any("no point" in t for t in _texts(figures[0]))
    table = _validation_rows(2)
    table.loc[0, ["predicted", "ratio", "learned_ratio"]] = 0.0
    validation.plot(table, tmp_path)
    assert sum("at 0 not drawn" in t for t in _texts(figures[1])) == 2


def test_kernel_plot_draws_a_sixth_set(figures, tmp_path):
    gpu = pd.DataFrame([{"set": f"gpu-set-{i}", "role": "held-out", "measured_s": 1e-3 * (i + 1),
                         "predicted_s": 1e-3} for i in range(6)])
    cpu = pd.DataFrame([{"set": f"cpu-set-{i}", "role": "held-out", "tokens_per_expert": t, "ratio": 1.0,
                         "ratio_no_overlap": 0.9} for i in range(6) for t in (1, 8)])
    validation.plot_kernels(gpu, cpu, tmp_path)
    labels = _legend_labels(figures[0])
    assert all(f"gpu-set-{i}" in labels and f"cpu-set-{i}" in labels for i in range(6))


def _fig7_table(**nan) -> pd.DataFrame:
    rows = [{"model": "mixtral-8x7b", "system": "a100-80g-8452y", "prompt_len": 97, "gen_len": 32,
             "policy": p, "status": "ok", "throughput_tok_s": t}
            for p, t in (("coxmoe", 30.0), ("moe-lightning", 10.0), ("flexgen", 5.0))]
    for r in rows:
        if r["policy"] in nan:
            r["status"], r["throughput_tok_s"] = "failed", np.nan
    return fig7.summarize(pd.DataFrame(rows))


@pytest.mark.parametrize("missing, expected", [("flexgen", "3.0x\n-"), ("moe-lightning", "-\n6.0x")])
def test_fig7_marks_a_run_that_did_not_fit(figures, tmp_path, missing, expected):
    fig7.plot(_fig7_table(**{missing: True}), tmp_path)
    (fig,) = figures
    assert expected in _texts(fig) and not any("nan" in t for t in _texts(fig))
    marks = [c for ax in fig.axes for c in ax.collections if len(c.get_offsets())]
    assert len(marks) == 1 and marks[0].get_offsets()[0][1] == 0  # an x at the base of the missing bar


def test_vram_with_no_placement_that_fits(figures, tmp_path):
    table = pd.DataFrame([{"attention": a, "system": "s", "batch": 8, "prompt_len": 4, "gen_len": 2,
                           "gpu_usable_gib": 40.0, "note": "needs 90 GiB"} for a in ("gpu", "cpu")])
    vram.plot(table, tmp_path)
    labels = [t.get_text() for t in figures[0].axes[0].get_yticklabels()]
    assert all("does not fit" in label for label in labels) and len(labels) == 2


def test_beyond_without_a_native_coxmoe_names_it(figures, tmp_path):
    rows = [{"model": "qwen3-30b-a3b", "design": d, "policy": p, "precision": prec, "batch": 8, "prompt_len": 4,
             "gen_len": 2, "throughput_tok_s": t, "total_s": 1.0, "vs_coxmoe_native": np.nan}
            for d, p, prec, t in (("coxmoe", "coxmoe", "native", np.nan), ("trimoe", "trimoe", "int8", 50.0))]
    table = pd.DataFrame(rows)
    text = beyond.finding(table)
    assert "nan" not in text and "CoX-MoE native did not fit" in text
    beyond.plot(table, tmp_path)
    assert any("did not fit" in t for t in _texts(figures[0]))
    ax = figures[0].axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == [50.0] and ax.get_ylabel() == "throughput (tok/s)"  # the run that fit is drawn, in tok/s


def test_report_numbers_are_plain():
    assert [number(v) for v in (10110.0, 2.3684, 0.5, 1234567.0)] == ["10110", "2.368", "0.5", "1234567"]


def test_table3_when_moe_lightning_does_not_fit(monkeypatch, tmp_path):
    """The steps that ran are drawn as having run and the finding says why there is no speed-up (it formatted
    None, a traceback, and labelled every step infeasible)."""
    import matplotlib.pyplot as plt

    from experiments.reproduce import ReproduceOptions, table3
    from sim.compare import ABLATION_STEPS

    def fake(*args, **kwargs):
        steps = [{"step": label, "options": opts, "feasible": i > 0, "throughput_tok_s": 100.0 + i if i else None,
                  "error": "" if i else "GPU (rtx6000ada) for moe-lightning memory exceeded: need 50 GiB",
                  "speedup_over_moe_lightning": None} for i, (label, _, opts) in enumerate(ABLATION_STEPS)]
        return {"steps": steps}

    monkeypatch.setattr(table3, "ablation", fake)
    table = table3.run(ReproduceOptions(out=tmp_path, quick=True))
    text = table3.finding(table)
    assert "nan" not in text.lower() and "None" not in text
    assert "MoE-Lightning does not fit: GPU (rtx6000ada) for moe-lightning memory exceeded, so" in text
    assert "((" not in text and "))" not in text
    assert "101.0 tok/s (no earlier step ran)" in text and "x1.01" in text  # 102 over 101
    seen = []
    monkeypatch.setattr(table3, "save_figure", lambda fig, out, stem: seen.append(fig) or [])
    table3.plot(table, tmp_path)
    labels = _texts(seen[0])
    plt.close(seen[0])
    assert labels[0] == "does not fit: GPU (rtx6000ada) for moe-lightning memory exceeded"
    assert labels[1] == "101.0 tok/s (MoE-Lightning does not fit)"
    assert sum(label.startswith("does not fit") for label in labels) == 1


def test_microbatch_keeps_points_that_do_not_fit_as_rows(monkeypatch, tmp_path):
    """A point the GPU cannot hold ended the whole figure (and `reproduce all`); now it is a row with the reason,
    drawn as an x, and the finding is computed over the points that ran."""
    import matplotlib.pyplot as plt

    from experiments.reproduce import ReproduceOptions, microbatch
    from sim.errors import CapacityError

    def too_big(*args, **kwargs):
        raise CapacityError("GPU (rtx6000ada) for coxmoe", 5 * 2**30, 4 * 2**30)

    monkeypatch.setattr(microbatch, "simulate", too_big)
    table = microbatch.run(ReproduceOptions(out=tmp_path, quick=True))
    assert len(table) == 6 and table["expert_s"].isna().all()
    assert (table["note"] == "GPU (rtx6000ada) for coxmoe memory exceeded").all()
    assert microbatch.finding(table).startswith("Too few points fit")
    rows = [{"micro_batch": m, "op3": op3, "expert_s": e, "non_expert_s": 0.01, "step_s": 0.1, "batch": 128,
             "prompt_len": 512, "note": "" if e == e else "GPU memory exceeded"}
            for op3, values in (("micro-batched", (0.02, np.nan, 0.05)), ("coalesced", (0.01, 0.01, 0.01)))
            for m, e in zip((128, 64, 32), values, strict=True)]
    mixed = pd.DataFrame(rows)
    text = microbatch.finding(mixed)
    assert "128->32: x2.50" in text and "nan" not in text and "Did not fit: micro-batched at micro-batch 64" in text
    seen = []
    monkeypatch.setattr(microbatch, "save_figure", lambda fig, out, stem: seen.append(fig) or [])
    microbatch.plot(mixed, tmp_path)
    labels = _legend_labels(seen[0])
    plt.close(seen[0])
    assert "does not fit (micro-batched OP3)" in labels and "does not fit (coalesced OP3)" not in labels


def test_fig7_labels_a_speedup_below_parity_with_two_decimals():
    assert [fig7._speedup_label(v) for v in (0.96, 1.04, 1.06, 2.14, np.nan)] == ["0.96x", "1.04x", "1.1x", "2.1x",
                                                                                  "-"]


def test_validation_scatter_keeps_a_far_underpredicted_point_inside(figures, tmp_path):
    rows = [{"id": i, "mode": "published", "system": "s", "policy": "flexgen", "status": "complete",
             "measured": m, "predicted": p, "ratio": p / m, "learned_ratio": np.nan, "train": False}
            for i, (m, p) in enumerate(((10.0, 3.0), (100.0, 110.0)))]
    validation.plot(pd.DataFrame(rows), tmp_path)
    ax = figures[0].axes[0]
    assert ax.get_ylim()[0] < 3.0 < 110.0 < ax.get_ylim()[1] and ax.get_xlim()[0] < 10.0


def test_vram_notes_a_search_that_finds_nothing_with_its_reason(monkeypatch, tmp_path):
    """A search's error starts "policy coxmoe: ..."; the note kept only "policy coxmoe"."""
    from experiments.reproduce import ReproduceOptions
    from sim.errors import NoFeasibleConfig

    def nothing_fits(*args, **kwargs):
        raise NoFeasibleConfig("policy coxmoe: no configuration fits its memory model on rtx6000ada (3.0 GiB of "
                               "GPU memory)")

    monkeypatch.setattr(vram, "simulate", nothing_fits)
    table = vram.run(ReproduceOptions(out=tmp_path, quick=True))
    assert (table["note"] == "no configuration fits its memory model on rtx6000ada (3.0 GiB of GPU memory)").all()


def test_validation_legend_names_the_band_and_the_finding_counts_one_point(figures, tmp_path):
    rows = [{"id": 0, "mode": "published", "system": "s", "policy": "flexgen", "status": "complete",
             "measured": 10.0, "predicted": 11.0, "ratio": 1.1, "learned_ratio": np.nan, "train": False}]
    validation.plot(pd.DataFrame(rows), tmp_path)
    assert "within +-20% of y = x" in _legend_labels(figures[0])
    text = validation.finding({"mechanisms": {"median_abs_error": 0.1, "points": 1, "within_1.5x": 1,
                                              "worst": "a (1.10x)"}})
    assert "over 1 point," in text
