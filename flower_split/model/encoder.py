"""Cut a Hugging Face encoder into public embeddings and the frozen body.

The body is the encoder run from ``inputs_embeds`` with its own embedding layer replaced by a
pass-through: the model itself still builds the attention mask, so every architecture that
accepts ``inputs_embeds`` (BERT, RoBERTa, DistilBERT, MiniLM, ...) is supported unchanged.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel


class _PassThroughEmbeddings(nn.Module):
    """Stands in for the embedding layer inside the body: returns ``inputs_embeds`` as is."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:  # DistilBERT passes (input_ids, inputs_embeds, ...) positionally
            embeds = args[1]
        return embeds


class Embedder(nn.Module):
    """The public embedding layer (token + position + type embeddings, LayerNorm). Frozen."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)

    def train(self, mode: bool = True) -> "Embedder":  # frozen: dropout always off
        return super().train(False)


class Body(nn.Module):
    """The frozen transformer blocks, shared by all tenants. Never trained."""

    def __init__(self, encoder: PreTrainedModel) -> None:
        super().__init__()
        self.encoder = encoder
        self.requires_grad_(False)
        self.eval()

    def forward(self, f: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds=f, attention_mask=attention_mask).last_hidden_state

    def train(self, mode: bool = True) -> "Body":  # frozen: dropout always off
        return super().train(False)

    def fingerprint(self) -> str:
        """SHA-256 over all parameters: equal before and after training proves it is frozen."""
        digest = hashlib.sha256()
        for name, tensor in self.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def split_encoder(encoder: PreTrainedModel) -> tuple[Embedder, Body]:
    """Detach the embedding layer of ``encoder`` (in place) and return (embedder, body)."""
    module_name = _embeddings_attribute(encoder)
    embeddings = getattr(encoder, module_name)
    setattr(encoder, module_name, _PassThroughEmbeddings())
    return Embedder(embeddings), Body(encoder)


def hidden_size(encoder: PreTrainedModel) -> int:
    """Width of the encoder's hidden states (``hidden_size`` or DistilBERT's ``dim``)."""
    config = encoder.config
    return int(getattr(config, "hidden_size", None) or getattr(config, "dim"))


def _embeddings_attribute(encoder: PreTrainedModel) -> str:
    if isinstance(getattr(encoder, "embeddings", None), nn.Module):
        return "embeddings"
    raise ValueError(
        f"model: {type(encoder).__name__} has no 'embeddings' module; "
        "supported are BERT-family encoders (BERT, RoBERTa, DistilBERT, MiniLM, ...)"
    )
