"""EAS from prompts: bundled all-MiniLM-L6-v2 embeddings, k-means, and probing a local checkpoint's routing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from executor.embed import embed_prompts
from experiments.cli import main
from traces.eas import cluster_requests, load_map

CODE = ["write a python function to sort a list", "fix this segmentation fault in my C code",
        "explain recursion in a javascript program", "debug a memory leak in my Java code"]
COOKING = ["a recipe for chocolate cake", "how long to roast a chicken", "best way to cook rice",
           "make pasta sauce from tomatoes"]


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_prompt_embeddings_separate_topics():
    texts = [t for pair in zip(CODE, COOKING, strict=True) for t in pair]
    emb = embed_prompts(texts, progress=False)
    assert emb.shape == (8, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    labels = cluster_requests(emb, 2, seed=0)
    assert adjusted_rand_score([0, 1] * 4, labels) == 1.0


def test_eas_probes_a_local_checkpoint(tmp_path, capsys):
    from test_record import WORDS, tiny_checkpoint

    tiny_checkpoint(tmp_path / "m", "qwen3")
    rng = np.random.default_rng(0)
    prompts = _jsonl(tmp_path / "p.jsonl", [" ".join(rng.choice(WORDS, size=6)) for _ in range(12)])
    out = tmp_path / "hot.npz"
    assert main(["eas", "--prompts", str(prompts), "--model-dir", str(tmp_path / "m"), "--vram-experts", "3",
                 "--clusters", "3", "--sample", "6", "-o", str(out)]) == 0
    hot = load_map(out)
    assert hot.ranking.shape == (2, 8) and hot.resident == 3
    assert hot.extra["probe"] == "model" and hot.extra["sample"] == 6
    assert hot.load.sum(axis=1).tolist() == [6 * 6 * 2] * 2  # 6 prototypes x 6 prompt tokens x top-2, per layer
    assert "36 probed prompt tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--vram-experts", "2"], "give --trace"),
    (["--vram-experts", "2", "--model-dir", "m"], "give --prompts"),
])
def test_eas_argument_errors(argv, message, tmp_path, capsys):
    assert main(["eas", *argv, "-o", str(tmp_path / "x.npz")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x.npz").exists()


def test_eas_refuses_a_model_dir_before_embedding_its_prompts(tmp_path, capsys, monkeypatch):
    """A --model-dir that is no checkpoint is one line and exit 2 before any prompt is embedded (it had come after
    embedding every prompt: 14 s for 400)."""
    import executor.embed

    def embedding(*args, **kwargs):
        raise AssertionError("prompts embedded before the checkpoint folder was checked")

    monkeypatch.setattr(executor.embed, "embed_prompts", embedding)
    prompts = _jsonl(tmp_path / "p.jsonl", CODE)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\0")
    for folder, message in (("missing", "not a Hugging Face model directory"), ("pickled", "no *.safetensors")):
        assert main(["eas", "--prompts", str(prompts), "--model-dir", str(tmp_path / folder), "--vram-experts", "2",
                     "-o", str(tmp_path / "x.npz")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not (tmp_path / "x.npz").exists()


def test_eas_prompts_must_match_the_trace(tmp_path, capsys):
    trace = tmp_path / "t.npz"
    assert main(["trace", "gen", "--preset", "mixtral-8x7b", "--requests", "5", "--prompt-len", "4", "--gen-len",
                 "2", "-o", str(trace)]) == 0
    prompts = _jsonl(tmp_path / "p.jsonl", CODE)
    assert main(["eas", "--prompts", str(prompts), "--trace", str(trace), "--vram-experts", "2",
                 "-o", str(tmp_path / "x.npz")]) == 2
    assert "4 prompts but the trace has 5" in capsys.readouterr().err
