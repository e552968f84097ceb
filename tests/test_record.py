"""Recording routing from tiny random-weight Hugging Face MoE checkpoints that the test builds (no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="recording needs transformers (the dev extra)")

from executor.record import _routers, read_prompts, record_trace  # noqa: E402
from traces import TraceError  # noqa: E402

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "far", "away", "quickly", "slowly", "red",
         "blue", "green"]


def tiny_checkpoint(path, family: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, initializer_range=0.5)  # (0.02: every token routed alike)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **common)
        model = transformers.MixtralForCausalLM(cfg)
    elif family == "deepseek_v2":  # MLA attention, a shared expert, one leading dense layer
        cfg = transformers.DeepseekV2Config(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
                                            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                            qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
                                            **{**common, "num_hidden_layers": 3, "num_key_value_heads": 4})
        model = transformers.DeepseekV2ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=24, intermediate_size=48, num_experts=8,
                                          num_experts_per_tok=2, head_dim=8, decoder_sparse_step=1, **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    torch.manual_seed(0)
    model.save_pretrained(path)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(path)
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen3", "deepseek_v2"])
def test_recording_matches_the_models_own_router(tmp_path, family):
    model = tiny_checkpoint(tmp_path / "m", family)
    prompts = ["the cat sat on the mat", "a dog ran far away quickly"]
    trace = record_trace(tmp_path / "m", prompts, gen_len=4, progress=False)
    assert trace.header.num_layers == 2 and trace.header.top_k == 2
    assert trace.prompt_lens.tolist() == [6, 6] and trace.gen_lens.tolist() == [4, 4]
    assert trace.num_tokens == 2 * (6 + 4 - 1)
    # The model's own routing of the full sequence (prompt + the tokens fed back) equals the recorded one.
    loaded = type(model).from_pretrained(tmp_path / "m", local_files_only=True, dtype=torch.float32).eval()
    seen = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: seen.append((out[0], out[2]))) for r in _routers(loaded)]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m", local_files_only=True)
    for r, text in enumerate(prompts):
        ids = tok(text, return_tensors="pt")["input_ids"]
        for _ in range(3):  # greedy continuation, as the recorder fed it back
            with torch.no_grad():
                nxt = loaded(ids).logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, nxt], dim=1)
        seen.clear()
        with torch.no_grad():
            loaded(ids)
        full = torch.stack([i.reshape(ids.shape[1], -1) for _, i in seen], dim=1).numpy()  # [T, L, k]
        logits = torch.stack([lg.reshape(ids.shape[1], -1) for lg, _ in seen], dim=1).numpy()  # [T, L, E]
        start = int(trace.token_offsets[r])
        got = trace.experts[start:start + ids.shape[1]]
        same = (np.sort(got, axis=-1) == np.sort(full, axis=-1)).all(axis=-1)  # [T, L]
        # Only a near-tie may differ: the recorder ran the prompt and each new token through the KV cache, this
        # check the whole sequence at once, so float noise (about 1e-6 here) may swap a k-th and (k+1)-th expert.
        ranked = -np.sort(-logits, axis=-1)
        margin = ranked[..., trace.header.top_k - 1] - ranked[..., trace.header.top_k]
        assert same[margin > 1e-4].all() and same.mean() > 0.9
    for h in hooks:
        h.remove()
    assert trace.gate_weights is not None and (trace.gate_weights >= 0).all()
    assert (np.diff(trace.gate_weights, axis=-1) <= 0).all()  # first choice first, whatever the router's order


def test_record_command_and_bad_inputs(capsys, tmp_path):
    from experiments.cli import main
    from traces import load_trace

    tiny_checkpoint(tmp_path / "m", "mixtral")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": t}) for t in ["the cat sat", "a red dog ran"]) + "\n")
    out = tmp_path / "t.npz"
    assert main(["trace", "record", "--model-dir", str(tmp_path / "m"), "--prompts", str(prompts), "--gen-len", "3",
                 "-o", str(out)]) == 0
    assert load_trace(out).num_requests == 2
    capsys.readouterr()
    assert main(["trace", "record", "--model-dir", str(tmp_path / "nope"), "--prompts", str(prompts),
                 "-o", str(out)]) == 2
    assert "no config.json" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(TraceError, match="text field"):
        read_prompts(bad)


def test_a_recording_too_long_or_too_large_is_refused_before_it_runs(capsys, tmp_path):
    """--gen-len past 2^24 ran on (a growing cache, for minutes) and could only fail validation after all the work;
    a recording whose ids, gates and cache exceed --max-gib is refused before the first forward."""
    from experiments.cli import main

    tiny_checkpoint(tmp_path / "m", "mixtral")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "the cat sat"}) + "\n")
    base = ["trace", "record", "--model-dir", str(tmp_path / "m"), "--prompts", str(prompts), "-o",
            str(tmp_path / "t.npz")]
    assert main([*base, "--gen-len", "100000000000"]) == 2
    assert "must be at most 16777216" in capsys.readouterr().err
    assert main(["--max-gib", "0.001", *base, "--gen-len", "16000000"]) == 2
    err = capsys.readouterr().err
    assert "error: recording 1 prompts x 16,000,000 generated tokens" in err and err.count("\n") == 1
    assert not (tmp_path / "t.npz").exists()
