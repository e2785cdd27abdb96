"""Randomized response on the training labels (label-DP, docs/PRIVACY.md)."""

from __future__ import annotations

import math

import pytest
import torch

from flower_split.config import ConfigError, RunConfig
from flower_split.protocol.label_rr import RandomizedLabels, keep_probability


def test_randomized_response_keeps_p_of_the_labels_and_spreads_the_rest_uniformly() -> None:
    epsilon, classes, n = 3.0, 5, 20_000
    rr = RandomizedLabels(epsilon, classes)
    labels = torch.randint(0, classes, (n,))
    noisy = rr.apply(labels, torch.arange(n))
    p = math.exp(epsilon) / (math.exp(epsilon) + classes - 1)
    assert rr.keep == pytest.approx(p) and keep_probability(epsilon, classes) == pytest.approx(p)
    kept = (noisy == labels).double().mean().item()
    assert abs(kept - p) < 4 * math.sqrt(p * (1 - p) / n)
    # a changed label is one of the K - 1 others, uniformly: the likelihood ratio is e^eps, no more
    changed = noisy != labels
    offsets = ((noisy[changed] - labels[changed]) % classes).bincount(minlength=classes)[1:].double()
    expected = changed.sum().item() / (classes - 1)
    assert offsets.sub(expected).abs().max().item() < 5 * math.sqrt(expected)
    assert noisy.min() >= 0 and noisy.max() < classes


def test_each_label_is_drawn_once_by_the_tenants_key() -> None:
    labels, rows = torch.randint(0, 77, (500,)), torch.arange(500)
    rr = RandomizedLabels(2.0, 77)
    first = rr.apply(labels, rows)
    assert torch.equal(first, rr.apply(labels, rows))  # every epoch sees the same labels: no composition
    assert torch.equal(first, RandomizedLabels(2.0, 77, rr.key).apply(labels, rows))  # restored from the key
    assert not torch.equal(first, RandomizedLabels(2.0, 77).apply(labels, rows))  # another key, another draw
    assert torch.equal(first[100:200], rr.apply(labels[100:200], rows[100:200]))  # per example, not per batch


def test_bad_settings_are_refused() -> None:
    for value in (-1.0, math.inf, True, "2"):
        with pytest.raises(ConfigError, match="^label_rr_epsilon"):
            RunConfig(label_rr_epsilon=value).validate()
    with pytest.raises(ConfigError, match="mode 'centralized'"):
        RunConfig(mode="centralized", label_rr_epsilon=2.0).validate()
    with pytest.raises(ValueError):
        keep_probability(0.0, 5)
    with pytest.raises(ValueError, match="32 bytes"):
        RandomizedLabels(1.0, 5, b"short")
