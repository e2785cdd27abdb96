"""The tenant's prior offset (``prior_offset``, :mod:`flower_split.model.prior`): the log of its own
label frequencies added to its logits in training and prediction, a buffer that is saved with the
tail but never trained, never shared, and refused where it would break a guarantee."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flower_split.backends import backend_for
from flower_split.config import ConfigError, RunConfig
from flower_split.flower.sharing_params import PLAIN_NAMES
from flower_split.model import TailAdapter, log_label_frequencies
from flower_split.model.adapters import InitRandom


def test_log_frequencies_are_a_smoothed_distribution() -> None:
    prior = log_label_frequencies([0, 0, 0, 2], 4)
    assert prior.shape == (4,) and torch.isfinite(prior).all()  # class 1 and 3 never seen: still finite
    assert float(prior.exp().sum()) == pytest.approx(1.0)
    assert prior[0] > prior[2] > prior[1] and float(prior[1]) == float(prior[3]) == pytest.approx(math.log(1 / 8))
    for bad in ([0, 4], [-1], [[0, 1]]):
        with pytest.raises(ValueError, match="class indices"):
            log_label_frequencies(bad, 4)


@pytest.mark.parametrize("tail_input", ["tokens", "pooled"])
def test_the_offset_is_added_to_the_logits_and_is_a_buffer(tail_input: str) -> None:
    prior = log_label_frequencies([1, 1, 2], 3)
    with_prior = TailAdapter(8, 4, 3, tail_input=tail_input, rng=InitRandom.insecure_from_seed(0), prior=prior)
    without = TailAdapter(8, 4, 3, tail_input=tail_input, rng=InitRandom.insecure_from_seed(0))
    h, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.long)
    assert torch.allclose(with_prior(h, mask), without(h, mask) + prior)
    assert "prior" in with_prior.state_dict() and "prior" not in without.state_dict()
    assert "prior" not in dict(with_prior.named_parameters())  # never trained ...
    assert not any(name.endswith("prior") for scope in PLAIN_NAMES.values() for name in scope)  # ... nor shared
    with pytest.raises(ValueError, match="prior: expected shape"):
        TailAdapter(8, 4, 3, prior=torch.zeros(4))


def test_training_with_the_offset_leaves_the_tenants_skew_out_of_the_classifier() -> None:
    """Labels independent of the input and 90 % one class: without the offset the classifier's bias
    learns the skew (what averaging would then spread to every tenant); with it, it need not."""
    torch.manual_seed(0)
    labels = torch.where(torch.rand(512) < 0.9, 0, torch.randint(1, 4, (512,)))
    h, mask = torch.randn(512, 1, 8), torch.ones(512, 1, dtype=torch.long)

    def bias_spread(prior: torch.Tensor | None) -> float:
        tail = TailAdapter(8, 4, 4, tail_input="pooled", rng=InitRandom.insecure_from_seed(1), prior=prior)
        start = tail.classifier.bias.detach().clone()
        optimizer = torch.optim.SGD(tail.parameters(), lr=0.5)
        for rows in torch.arange(512).split(32):
            optimizer.zero_grad()
            F.cross_entropy(tail(h[rows], mask[rows]), labels[rows]).backward()
            optimizer.step()
        moved = tail.classifier.bias.detach() - start
        return float(moved.max() - moved.min())

    plain, offset = bias_spread(None), bias_spread(log_label_frequencies(labels, 4))
    assert plain > 1.0  # the skew went into the bias
    assert offset < 0.25 * plain


def test_the_offset_is_refused_where_it_would_break_a_guarantee() -> None:
    backend_for(RunConfig(model="tiny", prior_offset=True).validate())  # split-plain: fine
    # secure: added where only the tenant sees the logits (``client`` labels); ``he`` computes the
    # loss on the cloud, which would need the offset in the clear
    backend_for(RunConfig(model="tiny", security="secure", label_protection="client", prior_offset=True).validate())
    he = RunConfig(model="tiny", security="secure", label_protection="he", prior_offset=True).validate()
    with pytest.raises(ConfigError, match="prior_offset: label protection 'he' computes the loss on the cloud"):
        backend_for(he)
    for privacy in ({"label_rr_epsilon": 2.0}, {"label_dp_noise": 1.0}):
        with pytest.raises(ConfigError, match="outside the label-DP guarantee"):
            RunConfig(model="tiny", prior_offset=True, **privacy).validate()
    with pytest.raises(ConfigError, match="prior_offset: expected true or false"):
        RunConfig(model="tiny", prior_offset="yes").validate()
