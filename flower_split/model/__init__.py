"""Split a Hugging Face encoder into embed / head / body / tail, plus the adapters."""

from __future__ import annotations

from dataclasses import dataclass

from flower_split.model.adapters import HeadAdapter, PolyActivation, TailAdapter, masked_mean, masked_mean_backward
from flower_split.model.loading import load_encoder, load_tokenizer, minilm_path
from flower_split.model.encoder import Body, Embedder, hidden_size, split_encoder


@dataclass
class SplitParts:
    """The four pieces of the split model. The client runs embedder, head and tail."""

    embedder: Embedder
    head: HeadAdapter
    body: Body
    tail: TailAdapter


def build_split(model: str, num_classes: int, head_rank: int, tail_bottleneck: int,
                activation: str = "quad", seed: int = 0, tail_input: str = "tokens") -> SplitParts:
    """Load ``model`` and cut it; adapters start at identity so the split equals the original."""
    import torch

    encoder = load_encoder(model, seed=seed)
    dim = hidden_size(encoder)
    embedder, body = split_encoder(encoder)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # adapter init only; never used for cryptographic masks
    head = HeadAdapter(dim, head_rank, activation)
    tail = TailAdapter(dim, tail_bottleneck, num_classes, activation, tail_input)
    torch.random.set_rng_state(state)
    return SplitParts(embedder, head, body, tail)


__all__ = [
    "Body", "Embedder", "HeadAdapter", "PolyActivation", "SplitParts", "TailAdapter",
    "build_split", "hidden_size", "load_encoder", "load_tokenizer", "masked_mean", "masked_mean_backward",
    "minilm_path", "split_encoder",
]
