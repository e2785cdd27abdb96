"""Split a Hugging Face encoder into embed / head / body / tail, plus the adapters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flower_split.model.adapters import (
    HeadAdapter, InitRandom, PolyActivation, TailAdapter, adapter_random, masked_mean, masked_mean_backward,
)
from flower_split.model.loading import load_encoder, load_tokenizer, minilm_path
from flower_split.model.encoder import Body, Embedder, hidden_size, split_encoder
from flower_split.model.prior import log_label_frequencies


@dataclass
class SplitParts:
    """The four pieces of the split model. The client runs embedder, head and tail."""

    embedder: Embedder
    head: HeadAdapter
    body: Body
    tail: TailAdapter


def build_split(model: str, num_classes: int, head_rank: int, tail_bottleneck: int,
                activation: str = "quad", seed: int = 0, tail_input: str = "tokens",
                rng: InitRandom | None = None, prior: torch.Tensor | None = None) -> SplitParts:
    """Load ``model`` and cut it; adapters start at identity so the split equals the original.

    ``seed`` seeds only the public model (the ``tiny`` encoder's random weights); the adapters'
    random weights come from ``rng``, a fresh CSPRNG stream when None (see :class:`InitRandom`).
    ``prior``: the tenant's prior offset on the logits (:mod:`flower_split.model.prior`), or None.
    """
    encoder = load_encoder(model, seed=seed)
    dim = hidden_size(encoder)
    embedder, body = split_encoder(encoder)
    rng = InitRandom() if rng is None else rng
    head = HeadAdapter(dim, head_rank, activation, rng)
    tail = TailAdapter(dim, tail_bottleneck, num_classes, activation, tail_input, rng, prior)
    return SplitParts(embedder, head, body, tail)


__all__ = [
    "Body", "Embedder", "HeadAdapter", "InitRandom", "PolyActivation", "SplitParts", "TailAdapter",
    "adapter_random", "build_split", "hidden_size", "load_encoder", "load_tokenizer", "log_label_frequencies",
    "masked_mean", "masked_mean_backward", "minilm_path", "split_encoder",
]
