"""Record routing traces from a local Hugging Face MoE checkpoint: prefill, then greedy decode, with every
MoE layer's router choices captured by forward hooks.

Supported families are those whose routers are `*TopKRouter` / `*TopkRouter` modules returning
(logits, top-k weights, top-k indices): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 in transformers
5. Files are read locally only (`local_files_only`). A checkpoint with random weights routes close to
uniformly; recorded skew needs trained weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from traces import RoutingTrace, TraceError, TraceHeader
from traces.format import expert_dtype
from traces.importers import JSONL_PARSED_PER_BYTE, read_utf8
from traces.limits import MAX_LENGTH, check_memory

# A recorded expert choice in memory until the trace is built: its int64 id and float32 gate as the router returns
# them, their reordered copies, and the int id and float gate of the final arrays.
RECORD_BYTES_PER_CHOICE = 32


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts from a JSONL file with a `text` field per line."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"prompts file not found: {path}")
    out = []
    for n, line in enumerate(read_utf8(path, JSONL_PARSED_PER_BYTE).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TraceError(f"{path}:{n}: expected a JSON object with a text field") from None
        if not isinstance(text, str) or not text:
            raise TraceError(f"{path}:{n}: text must be a non-empty string")
        out.append(text)
        if limit and len(out) >= limit:
            break
    if not out:
        raise TraceError(f"{path}: no prompts")
    return out


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for _, m in model.named_modules() if type(m).__name__.lower().endswith("topkrouter")]


def _check_recording_memory(cfg, prompts: int, gen_len: int, max_prompt_tokens: int | None) -> None:  # noqa: ANN001
    """What the loop keeps, charged before the weights load: every generated token's ids and gates at every layer
    (the prompts' share is unknown until tokenized), and one prompt's float32 KV cache over its tokens."""
    layers = int(getattr(cfg, "num_hidden_layers", 1) or 1)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(cfg, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(cfg, "head_dim", 0) or int(getattr(cfg, "hidden_size", heads)) // heads)
    top_k = int(getattr(cfg, "num_experts_per_tok", 0) or 8)
    check_memory(prompts * gen_len * layers * top_k * RECORD_BYTES_PER_CHOICE
                 + ((max_prompt_tokens or 0) + gen_len) * 2 * layers * kv_heads * head_dim * 4,
                 f"recording {prompts:,} prompts x {gen_len:,} generated tokens")


def check_model_dir(model_dir: str | Path) -> Path:
    """A local Hugging Face checkpoint folder that recording can load (a config and safetensors weights), checked
    before any other work (`coxmoe eas --model-dir` embeds its prompts first)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise TraceError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    if not any(model_dir.glob("*.safetensors")):
        raise TraceError(f"{model_dir}: no *.safetensors weights (pickled checkpoints such as pytorch_model.bin are "
                         "never loaded; convert them to safetensors first)")
    return model_dir


def record_trace(model_dir: str | Path, prompts: list[str], gen_len: int, max_prompt_tokens: int | None = None,
                 progress: bool = True) -> RoutingTrace:
    """Route every prompt through the model (prefill) and `gen_len - 1` greedy decode steps; record top-k
    expert ids and gate weights of every token at every MoE layer."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise TraceError("recording needs transformers (pip install -e '.[dev]')") from None
    model_dir = check_model_dir(model_dir)
    if not 1 <= gen_len <= MAX_LENGTH:
        raise TraceError(f"gen_len must be in [1, {MAX_LENGTH:,}], got {gen_len}")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TraceError(f"{model_dir}: cannot load ({str(exc).splitlines()[0]})") from None
    _check_recording_memory(config, len(prompts), gen_len, max_prompt_tokens)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32,
                                                     use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise TraceError(f"{model_dir}: cannot load ({str(exc).splitlines()[0]})") from None
    model.eval()
    routers = _routers(model)
    if not routers:
        raise TraceError(f"{model_dir}: no MoE router modules found ({type(model).__name__})")
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [r.register_forward_hook(lambda _m, _i, out: captured.append((out[2].detach(), out[1].detach())))
               for r in routers]
    experts, gates, prompt_lens = [], [], []
    top_k = None
    try:
        with torch.no_grad():
            for text in tqdm(prompts, desc="recording", unit="prompt", disable=None if progress else True):
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
                if max_prompt_tokens:
                    ids = ids[:, :max_prompt_tokens]
                if ids.shape[1] == 0:
                    raise TraceError("a prompt tokenizes to nothing")
                prompt_lens.append(int(ids.shape[1]))
                past, feed = None, ids
                for _ in range(gen_len):
                    captured.clear()
                    with warnings.catch_warnings():  # transformers 5.x renames past_key_values; both work now
                        warnings.simplefilter("ignore", FutureWarning)
                        out = model(input_ids=feed, past_key_values=past, use_cache=True)
                    if len(captured) != len(routers):
                        raise TraceError(f"expected {len(routers)} router calls per forward, saw {len(captured)}")
                    idx = torch.stack([c[0].reshape(feed.shape[1], -1) for c in captured], dim=1)  # [T, L, k]
                    w = torch.stack([c[1].reshape(feed.shape[1], -1) for c in captured], dim=1)
                    # step 0 feeds the prompt, step s the token generated at step s - 1; the last generated
                    # token is never fed back, so a request routes prompt + gen_len - 1 tokens
                    # routers with sorted=False (DeepSeek) list top-k in any order: put the first choice first
                    by_weight = torch.argsort(w.float(), dim=-1, descending=True, stable=True)
                    experts.append(torch.gather(idx, -1, by_weight).numpy())
                    gates.append(torch.gather(w.float(), -1, by_weight).numpy())
                    past = out.past_key_values
                    feed = out.logits[:, -1:].argmax(dim=-1)
                top_k = idx.shape[-1]
    finally:
        for h in handles:
            h.remove()
    num_experts = int(getattr(model.config, "num_local_experts", 0) or getattr(model.config, "num_experts", 0)
                      or getattr(model.config, "n_routed_experts", 0))
    ids_all = np.concatenate(experts)
    header = TraceHeader(model_dir.name, len(routers), num_experts, int(top_k), source=f"recorded:{model_dir.name}")
    return RoutingTrace(header, np.asarray(prompt_lens, dtype=np.int32), np.full(len(prompts), gen_len, np.int32),
                        ids_all.astype(expert_dtype(num_experts)),
                        np.clip(np.concatenate(gates), 0.0, 1.0).astype(np.float32))
