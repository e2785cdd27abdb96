"""Tokenization and dynamically padded batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import PreTrainedTokenizerBase

from flower_split.data.datasets import TextDataset


@dataclass
class Batch:
    """A padded batch: token ids, attention mask, labels and the dataset rows it came from."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device), self.indices)


class TokenizedDataset:
    """Token ids per example (unpadded), tokenized once up front."""

    def __init__(self, data: TextDataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        encoded = tokenizer(data.texts, truncation=True, max_length=max_length)
        self.input_ids: list[list[int]] = encoded["input_ids"]
        self.labels = data.labels
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.labels)

    def collate(self, indices: list[int]) -> Batch:
        """Pad the selected rows to the longest among them."""
        width = max(len(self.input_ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            tokens = self.input_ids[i]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return Batch(ids, mask, labels, torch.tensor(indices))

    def batches(self, batch_size: int, shuffle: bool,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        """All rows in batches, shuffled with ``generator`` if asked."""
        rows = torch.randperm(len(self), generator=generator).tolist() if shuffle else list(range(len(self)))
        for start in range(0, len(rows), batch_size):
            yield self.collate(rows[start : start + batch_size])
