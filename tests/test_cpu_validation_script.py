"""experiments/cpu_validation.py's per-op table: every op of every case, measured beside predicted."""

from __future__ import annotations

from types import SimpleNamespace

from experiments import cpu_validation as cv


def test_per_op_table_has_a_row_per_op_of_each_case_in_run_order():
    def op(kind, step, layer, tokens):
        return SimpleNamespace(kind=kind, phase="decode", step=step, layer=layer, tokens=tokens)

    cases, results = [], []
    for k in range(len(cv.BATCHES) + 2):
        ops = [op("qkv", 1, 0, 16 + k), op("expert", 1, 0, 32 + k)]
        cases.append((SimpleNamespace(ops=ops), None))
        results.append({"_per_op": {"class": ["other", "cpu_experts"], "measured_s": [0.1 * k, 0.2],
                                    "predicted_s": [0.05, 0.3 * k]}})
    table = cv.per_op_table(cases, results)
    assert len(table) == 2 * len(cases)
    assert list(table["case"].unique()) == [f"batch {b}" for b in cv.BATCHES] + [
        "batch 256 coalesced", "batch 256 micro-batched"]
    last = table[table["case"] == "batch 256 micro-batched"]
    assert last["tokens"].tolist() == [20, 36] and last["op"].tolist() == [0, 1]
    assert last["measured_s"].tolist() == [0.4, 0.2] and last["predicted_s"].tolist() == [0.05, 1.2]
    assert last["class"].tolist() == ["other", "cpu_experts"]
