"""The split model (embed -> head -> body -> tail) equals the unsplit encoder at identity init."""

from __future__ import annotations

import pytest
import torch

from flower_split.model import (
    PolyActivation, TailAdapter, build_split, load_encoder, masked_mean, masked_mean_backward,
)
from flower_split.model.adapters import QUAD_COEFFS


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[101, 2054, 2003, 1996, 3446, 102], [101, 7592, 102, 0, 0, 0]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("arch", ["tiny", "bert", "roberta", "distilbert"])
def test_split_forward_equals_unsplit_at_identity_init(arch: str, arch_dirs: dict[str, str]) -> None:
    spec = "tiny" if arch == "tiny" else arch_dirs[arch]
    parts = build_split(spec, num_classes=5, head_rank=4, tail_bottleneck=8)
    reference = load_encoder(spec)
    ids, mask = _batch()
    with torch.no_grad():
        split_hidden = parts.body(parts.head(parts.embedder(ids)), mask)
        full_hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(split_hidden[real], full_hidden[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(parts.tail(split_hidden, mask),
                               parts.tail(full_hidden, mask), rtol=0, atol=1e-5)


def test_attention_mask_reaches_the_body() -> None:
    """Padding must not change the real tokens' outputs (the body uses the mask)."""
    parts = build_split("tiny", 3, 4, 8)
    ids, mask = _batch()
    short = ids[1:, :3]
    with torch.no_grad():
        padded = parts.body(parts.embedder(ids[1:]), mask[1:])[0, :3]
        unpadded = parts.body(parts.embedder(short), mask[1:, :3])[0]
    torch.testing.assert_close(padded, unpadded, rtol=0, atol=1e-5)


def test_nonzero_head_changes_the_output() -> None:
    parts = build_split("tiny", 3, 4, 8)
    ids, mask = _batch()
    with torch.no_grad():
        before = parts.body(parts.head(parts.embedder(ids)), mask)
        parts.head.up.weight.normal_()
        after = parts.body(parts.head(parts.embedder(ids)), mask)
    assert (before - after).abs().max() > 1e-3


def test_body_and_embedder_are_frozen() -> None:
    parts = build_split("tiny", 3, 4, 8)
    assert not any(p.requires_grad for p in parts.body.parameters())
    assert not any(p.requires_grad for p in parts.embedder.parameters())
    parts.body.train()
    assert not parts.body.training  # dropout stays off in the frozen body


def test_poly_activation_is_the_quadratic() -> None:
    u = torch.linspace(-3, 3, 13)
    c0, c1, c2 = QUAD_COEFFS
    torch.testing.assert_close(PolyActivation()(u), c0 + c1 * u + c2 * u * u)


def test_masked_mean_ignores_padding() -> None:
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(x, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_masked_mean_backward_is_the_autograd_gradient() -> None:
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    grad = torch.randn(3, 4, dtype=torch.float64)
    (expected,) = torch.autograd.grad(masked_mean(x, mask), x, grad)
    torch.testing.assert_close(masked_mean_backward(grad, mask), expected)


def test_pooled_tail_pools_before_the_adapter() -> None:
    tokens, pooled = TailAdapter(8, 4, 3), TailAdapter(8, 4, 3, tail_input="pooled")
    torch.nn.init.normal_(tokens.adapter.up.weight)
    pooled.load_state_dict(tokens.state_dict())  # the same parameters, placed differently
    h, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(pooled(h, mask), pooled.classifier(pooled.adapter(masked_mean(h, mask))))
    assert not torch.allclose(pooled(h, mask), tokens(h, mask))  # the activation is not linear
    with pytest.raises(ValueError, match="tail_input"):
        TailAdapter(8, 4, 3, tail_input="per-token")


def test_unknown_model_path_names_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder(str(tmp_path / "nope"))
