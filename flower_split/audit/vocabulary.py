"""The public embedding of every vocabulary token at every position: the inversion attacks' codebook.

The embedder is public (it is the pretrained model's), and its output for token ``v`` at
position ``p`` is ``LayerNorm(word[v] + position[p] + token_type[0])``: it depends on the
position, so a nearest-neighbour lookup must compare an ``f`` row with the table of its own
position. Supported: embedders that take ``position_ids`` (BERT, MiniLM, RoBERTa; RoBERTa's
positions start after its padding index).
"""

from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm

from flower_split.model import Embedder


class VocabularyTable:
    """``e(v, p)`` for all tokens ``v``, computed one position at a time; positions are kept
    while they fit in ``cache_bytes`` (MiniLM: 47 MB a position) and recomputed otherwise."""

    def __init__(self, embedder: Embedder, chunk: int = 4096, cache_bytes: int = 1 << 30) -> None:
        embeddings = embedder.embeddings
        if "position_ids" not in inspect.signature(embeddings.forward).parameters:
            raise ValueError(f"audit: {type(embeddings).__name__} takes no position_ids; the vocabulary "
                             "table supports BERT-style embeddings")
        self.embeddings = embeddings
        self.vocab_size = int(embeddings.word_embeddings.num_embeddings)
        padding_idx = getattr(embeddings, "padding_idx", None)  # RoBERTa numbers positions after it
        self.offset = 0 if padding_idx is None else int(padding_idx) + 1
        self.chunk = chunk
        self.cache_bytes = cache_bytes
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def rows(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``e(token_ids[i], positions[i])`` [N, d]: the exact public embedding of given tokens."""
        ids = token_ids.reshape(-1, 1).long()
        position_ids = positions.reshape(-1, 1).long() + self.offset
        return self.embeddings(input_ids=ids, position_ids=position_ids)[:, 0].float()

    def at(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The table of ``position`` [V, d] and its squared row norms [V]."""
        if position in self._cache:
            return self._cache[position]
        ids = torch.arange(self.vocab_size)
        table = self.rows(ids, torch.full_like(ids, position))
        entry = (table, (table * table).sum(1))
        if (len(self._cache) + 1) * table.numel() * table.element_size() <= self.cache_bytes:
            self._cache[position] = entry
        return entry

    @torch.no_grad()
    def nearest(self, x: torch.Tensor, positions: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """For each row of ``x`` [N, d], the token whose embedding at that row's position is
        nearest in Euclidean distance [N]."""
        out = torch.empty(x.shape[0], dtype=torch.long)
        x = x.float()
        for position in tqdm(positions.unique().tolist(), desc="nearest token", disable=not progress):
            where = (positions == position).nonzero().squeeze(1)
            table, norms = self.at(int(position))
            for start in range(0, len(where), self.chunk):
                rows = where[start:start + self.chunk]
                out[rows] = (2 * x[rows] @ table.T - norms).argmax(1)
        return out
