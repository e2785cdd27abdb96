"""Macro-F1 from per-class counts: the split strategy sums counts over Flower messages."""

from __future__ import annotations

import pytest
import torch

from flower_split.train.metrics import class_counts, macro_f1, macro_f1_from_counts


def test_macro_f1_of_a_hand_computed_case() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0])
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1, fn 0 -> 0.8; class 2: tp 0 -> 0; class 3 absent
    assert class_counts(predictions, labels, 4) == ([1, 2, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0])
    assert macro_f1(predictions, labels, 4) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_summed_counts_of_chunks_equal_the_whole() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (101,), generator=generator)
    predictions = torch.where(torch.rand(101, generator=generator) < 0.6, labels,
                              torch.randint(0, 7, (101,), generator=generator))
    total = [[0] * 7 for _ in range(3)]
    for start in range(0, 101, 32):
        for row, counts in zip(total, class_counts(predictions[start:start + 32], labels[start:start + 32], 7)):
            for c, value in enumerate(counts):
                row[c] += value
    assert macro_f1_from_counts(*total) == pytest.approx(macro_f1(predictions, labels, 7))
    assert 0.0 < macro_f1(predictions, labels, 7) < 1.0
