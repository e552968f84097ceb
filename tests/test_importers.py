"""Importers: published routing data into trace format v1, exact on the shared fixtures, strict on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.cli import main
from traces import (
    SynthConfig,
    TraceError,
    generate_trace,
    import_jsonl,
    import_switch_csv,
    load_trace,
    read_count_table,
    save_trace,
    trace_from_counts,
)
from traces.format import validate
from traces.synth import popularity_matrix

DATA = Path(__file__).parent / "data"
MIXTRAL_COUNTS = Path(__file__).parents[1] / "traces" / "data" / "mixtral-8x7b_expert_frequencies.npy"


def test_switch_csv_matches_the_parsed_fixture(tmp_path):
    trace = import_switch_csv(DATA / "switch_base_32_cnn_dailymail.csv")
    derived = json.loads((DATA / "switch_base_32_routing_top1_derived.json").read_text())
    want = np.array([s["experts_by_decoder_moe_layer"] for seq in derived["sequences"] for s in seq["steps"]])
    assert (trace.header.num_layers, trace.header.num_experts, trace.header.top_k) == (6, 32, 1)
    assert trace.gen_lens.tolist() == [len(seq["steps"]) for seq in derived["sequences"]]
    np.testing.assert_array_equal(trace.experts[:, :, 0], want)
    assert (trace.gate_weights > 0).all() and (trace.gate_weights <= 1).all()
    back = load_trace(save_trace(trace, tmp_path / "switch.npz"))
    np.testing.assert_array_equal(back.experts, trace.experts)


def _jsonl_lines(trace):
    lines = []
    for r in range(trace.num_requests):
        start, p = int(trace.token_offsets[r]), int(trace.prompt_lens[r])
        for t in range(int(trace.routed_lens[r])):
            for layer in range(trace.header.num_layers):
                ids = trace.experts[start + t, layer].tolist()
                lines.append({"request": r, "token": t, "phase": "prefill" if t < p else "decode", "layer": layer,
                              "experts": ids, "probs": [1.0 / len(ids)] * len(ids)})
    return lines


def _write(path, lines):
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return path


def test_jsonl_round_trip(tmp_path):
    src = generate_trace(SynthConfig("m", 3, 8, 2, "zipf:1.0", 0.2, 1), np.array([3, 5]), np.array([2, 4]))
    lines = _jsonl_lines(src)
    trace = import_jsonl(_write(tmp_path / "r.jsonl", lines[::-1]), model="m", num_experts=8)  # any order
    np.testing.assert_array_equal(trace.experts, src.experts)
    assert trace.prompt_lens.tolist() == [3, 5] and trace.gen_lens.tolist() == [2, 4]
    assert trace.gate_weights is not None and np.allclose(trace.gate_weights, 0.5)


@pytest.mark.parametrize("mutate, message", [
    (lambda ls: ls + ["{not json"], "not JSON"),
    # issue 11's reproductions: each was a hang, a traceback or a silently coerced value
    (lambda ls: ls + [{**ls[0], "token": 9, "layer": 1_000_000_000}], "layer: Input should be less than 4096"),
    (lambda ls: [{**x, "experts": []} for x in ls], "experts: List should have at least 1 item"),
    (lambda ls: [{**ls[0], "request": 0.7}] + ls[1:], "request: Input should be a valid integer, got 0.7"),
    (lambda ls: [{**ls[0], "experts": [True, 2]}] + ls[1:], "experts.0: Input should be a valid integer, got True"),
    (lambda ls: [{**ls[0], "experts": [1, 1]}] + ls[1:], "an expert twice"),
    (lambda ls: [{**ls[0], "experts": [1, 70000]}] + ls[1:], "experts.1: Input should be less than 65536"),
    (lambda ls: [{**ls[0], "probs": [float("nan"), 0.5]}] + ls[1:], "probs.0: Input should be a finite number"),
    (lambda ls: ls + ["[1, 2]"], "JSON object"),
    (lambda ls: [{**ls[0], "prob": [0.5, 0.5]}] + ls[1:], r"unknown field 'prob' \(did you mean probs\?\)"),
    (lambda ls: [x for x in ls if not (x["token"] == 1 and x["layer"] == 2)], "lacks layer"),
    (lambda ls: ls + [ls[0]], "appears twice"),
    (lambda ls: [{**x, "experts": [1], "probs": [1.0]} if x["token"] == 0 and x["layer"] == 0 else x for x in ls],
     "expected 2"),
    (lambda ls: [{**x, "phase": "decode"} if x["request"] == 0 and x["token"] == 0 else x for x in ls],
     "prefill tokens first"),
    (lambda ls: [x for x in ls if x["token"] != 1], "none missing"),
    (lambda ls: [{**x, "phase": "train"} for x in ls], "phase: Input should be 'prefill' or 'decode'"),
    (lambda ls: [{**x, "probs": [1.0]} for x in ls], "probs"),
    (lambda ls: [], "no records"),
    # probs on some records only: the others would have been stored as gate weight 0
    (lambda ls: [{k: v for k, v in x.items() if k != "probs"} if i == 0 else x for i, x in enumerate(ls)],
     "probs on some records but not others"),
])
def test_malformed_jsonl(tmp_path, mutate, message):
    src = generate_trace(SynthConfig("m", 3, 8, 2, "uniform", 0.0, 0), np.array([2, 2]), np.array([2, 1]))
    with pytest.raises(TraceError, match=message):
        import_jsonl(_write(tmp_path / "bad.jsonl", mutate(_jsonl_lines(src))))


def test_count_tables_reproduce_every_count(tmp_path):
    table = np.array([[3, 1, 2, 2], [0, 4, 4, 0]])
    trace = trace_from_counts(table, top_k=2)
    validate(trace)
    np.testing.assert_array_equal(trace.expert_counts(np.arange(trace.num_tokens)), table)
    csv = tmp_path / "c.csv"
    csv.write_text("layer,e0,e1,e2,e3\n0,3,1,2,2\n1,0,4,4,0\n")
    np.testing.assert_array_equal(read_count_table(csv), table)
    np.save(tmp_path / "c.npy", table)
    p = popularity_matrix(f"table:{tmp_path / 'c.npy'}", 2, 4, 0)
    assert np.allclose(p.sum(axis=1), 1) and p[1, 0] == 0


@pytest.mark.parametrize("text, message", [("layer,a\n0,-1\n", "non-negative"), ("layer,a\n0,x\n", "numbers"),
                                          ("layer,a\n0,1.5\n", "integers"),
                                          ("layer,a,b\n0,1,1\n0,2,0\n", "layer column"),
                                          ("layer,a,b\n1,1,1\n2,2,0\n", "layer column")])
def test_bad_count_tables(tmp_path, text, message):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        read_count_table(path)


def test_count_table_rows_follow_their_layer_column(tmp_path):
    path = tmp_path / "shuffled.csv"
    path.write_text("layer,e0,e1,e2\n1,10,0,10\n0,0,10,10\n")
    np.testing.assert_array_equal(read_count_table(path), [[0, 10, 10], [10, 0, 10]])


def test_text_inputs_are_bounded_and_utf8(tmp_path, monkeypatch, capsys):
    from traces.limits import LIMIT_ENV

    bad = tmp_path / "p.jsonl"
    bad.write_bytes(b'{"text": "hi \xff"}\n')
    from executor.record import read_prompts

    with pytest.raises(TraceError, match="not UTF-8"):
        read_prompts(bad)
    big = _write(tmp_path / "big.jsonl", _jsonl_lines(generate_trace(SynthConfig("m", 3, 8, 2, "uniform", 0.0, 0),
                                                                      np.array([40] * 20), np.array([2] * 20))))
    monkeypatch.setenv(LIMIT_ENV, repr(big.stat().st_size * 5 / 2**30))  # the file fits, its parsed records not
    with pytest.raises(TraceError, match="parsing"):
        import_jsonl(big)


def test_count_tables_that_no_trace_can_match():
    with pytest.raises(TraceError, match="same multiple"):
        trace_from_counts(np.array([[2, 2], [1, 2]]), top_k=2)
    with pytest.raises(TraceError, match="more often"):
        trace_from_counts(np.array([[4, 0, 0, 0]]), top_k=2)


def test_trace_import_command(capsys, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["trace", "import", str(DATA / "switch_base_32_cnn_dailymail.csv"), "--format", "switch-csv",
                 "-o", str(out)]) == 0
    assert load_trace(out).num_tokens == 135
    counts = tmp_path / "counts.npz"
    mixtral = np.round(np.load(MIXTRAL_COUNTS) * 200).astype(np.int64)  # shares of top-2 picks, 100 tokens
    mixtral[:, 0] += 200 - mixtral.sum(axis=1)  # rounding: rows sum to exactly k x 100
    np.save(tmp_path / "mixtral.npy", mixtral)
    assert main(["trace", "import", str(tmp_path / "mixtral.npy"), "--format", "counts", "--top-k", "2", "-o",
                 str(counts)]) == 0
    capsys.readouterr()
    assert main(["trace", "import", str(tmp_path / "mixtral.npy"), "--format", "counts", "-o", str(counts)]) == 2
    assert "--top-k" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert main(["trace", "import", str(bad), "--format", "jsonl", "-o", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:1: not JSON" in err and not (tmp_path / "x.npz").exists()
    # a flag of another format is refused, not ignored in silence
    for fmt, extra, message in (("jsonl", ["--top-k", "3"], "--format jsonl does not use --top-k (it takes --experts)"),
                                ("counts", ["--top-k", "2", "--experts", "8"], "counts does not use --experts"),
                                ("switch-csv", ["--seed", "9"], "--format switch-csv does not use --seed")):
        assert main(["trace", "import", str(bad), "--format", fmt, *extra, "-o", str(tmp_path / "y.npz")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and not (tmp_path / "y.npz").exists()


@pytest.mark.parametrize("text", [
    "\ufefflayer,e0,e1,e2,e3\n0,3,1,0,2\n1,2,2,1,1\n",  # a byte-order mark (Excel): the layer column shifted ids by one
    ",0,1,2,3\n0,3,1,0,2\n1,2,2,1,1\n",  # pandas' to_csv: the index column's header is empty
    "layer,e0,e1,e2,e3\n0,3,1,0,2\n1,2,2,1,1\n",
])
def test_count_tables_as_spreadsheets_and_pandas_write_them(tmp_path, text):
    from traces.importers import read_count_table

    path = tmp_path / "c.csv"
    path.write_text(text, encoding="utf-8")
    assert read_count_table(path).tolist() == [[3, 1, 0, 2], [2, 2, 1, 1]]


def test_a_huge_top_k_is_an_argument_error(capsys, tmp_path):
    np.save(tmp_path / "c.npy", np.array([[3, 1, 0, 2]]))
    assert main(["trace", "import", str(tmp_path / "c.npy"), "--format", "counts", "--top-k", str(2**63), "-o",
                 str(tmp_path / "o.npz")]) == 2
    assert "must be at most 256" in capsys.readouterr().err


def test_repeated_archive_members_and_header_keys_are_refused(tmp_path):
    """numpy keeps the last of two members named alike (other readers the first), json the last of two keys."""
    import zipfile

    from traces import TraceError, generate_trace
    from traces.format import save_trace
    from traces.synth import SynthConfig

    good = save_trace(generate_trace(SynthConfig("m", 2, 4, 2, "uniform", 0.0, 0), np.full(2, 3), np.full(2, 2)),
                      tmp_path / "t.npz")
    dup = tmp_path / "dup.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(dup, "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info))
        with pytest.warns(UserWarning, match="Duplicate name"):
            out.writestr("experts.npy", src.read("experts.npy"))
    with pytest.raises(TraceError, match="'experts.npy' appears more than once"):
        load_trace(dup)
    arrays = dict(np.load(good, allow_pickle=False))
    header = arrays["header"].tobytes().decode()
    arrays["header"] = np.frombuffer(header.replace('"num_layers": 2', '"num_layers": 2, "num_layers": 9').encode(),
                                     np.uint8)
    np.savez(tmp_path / "keys.npz", **arrays)
    with pytest.raises(TraceError, match="header repeats key 'num_layers'"):
        load_trace(tmp_path / "keys.npz")


def test_float64_request_features_beyond_float32_are_refused():
    from traces import RoutingTrace, TraceError, TraceHeader

    header = TraceHeader("m", 1, 4, 1)
    ones = np.ones(1, np.int32)
    with pytest.raises(TraceError, match="must fit float32"):
        RoutingTrace(header, ones, ones, np.zeros((1, 1, 1), np.uint8), request_features=np.full((1, 2), 1e39))
