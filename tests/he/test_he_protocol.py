"""End-to-end correctness of the HE loss protocol against PyTorch's cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_split.he import (
    ClientKeys,
    CloudKeys,
    batch_bounds,
    compute_loss_and_grad,
    decode_fixed,
    decrypt_loss_and_grad,
    encode_fixed,
    encrypt_labels,
    envelope_digest,
)


def _run(keys: ClientKeys, cloud: CloudKeys, y: torch.Tensor, z: torch.Tensor):
    request = encrypt_labels(keys, y, z.shape[1])
    result = compute_loss_and_grad(cloud, request, z)
    out = decrypt_loss_and_grad(keys, result.payload, envelope_digest(request))
    return out, result


def _reference(y: torch.Tensor, z: torch.Tensor) -> tuple[float, torch.Tensor]:
    zz = z.clone().requires_grad_(True)
    loss = F.cross_entropy(zz, y)  # mean over the batch
    loss.backward()
    return loss.item(), zz.grad


@pytest.mark.parametrize("batch_size", [1, 32, 120])  # 120 x 77 spans two ciphertexts
def test_loss_and_gradient_match_torch(keys, cloud, batch_size):
    torch.manual_seed(batch_size)
    num_classes = 77
    y = torch.randint(0, num_classes, (batch_size,))
    z = 3 * torch.randn(batch_size, num_classes, dtype=torch.float64)
    out, result = _run(keys, cloud, y, z)
    ref_loss, ref_grad = _reference(y, z)

    bounds = batch_bounds(keys.params, batch_size, num_classes)
    # Tolerances, from the parameters (see BatchBounds): the loss carries flooding noise of
    # width 2^flood_bits at scale 2^(62+10) and fixed-point log-probs with 10 fractional
    # bits; the gradient shares are each rounded to 2^-16, plus CKKS noise far below that.
    assert bounds.loss_abs_error < 5e-3
    assert abs(out.loss - ref_loss) <= bounds.loss_abs_error
    total = out.grad_share + result.grad_mask  # int64 ring addition (wraps mod 2^64)
    assert bounds.grad_error_lsb < 1.1
    assert (total.double() - ref_grad * 2**16).abs().max().item() <= bounds.grad_error_lsb
    assert (total - encode_fixed(ref_grad, 16)).abs().max().item() <= 1
    assert torch.allclose(decode_fixed(total, 16), ref_grad, atol=2 * 2**-16, rtol=0)


def test_gradient_share_alone_is_not_the_gradient(keys, cloud):
    torch.manual_seed(1)
    y = torch.randint(0, 10, (16,))
    z = torch.randn(16, 10, dtype=torch.float64)
    out, result = _run(keys, cloud, y, z)
    _, ref_grad = _reference(y, z)
    expected = encode_fixed(ref_grad, 16)
    # Each share is a random-looking ring element, far from the gradient itself.
    for share in (out.grad_share, result.grad_mask):
        assert (share - expected).abs().float().median().item() > 2**40


def test_clamped_log_probs_define_the_loss(keys, cloud):
    # A sample whose true class has probability below exp(-32) counts as loss 32.
    y = torch.tensor([0, 1])
    z = torch.tensor([[-60.0, 0.0, 0.0], [0.0, 5.0, 0.0]], dtype=torch.float64)
    out, _ = _run(keys, cloud, y, z)
    clamped = F.cross_entropy(z, y, reduction="none").clamp(max=keys.params.max_neg_log_prob).mean()
    assert abs(out.loss - clamped.item()) <= batch_bounds(keys.params, 2, 3).loss_abs_error


@settings(max_examples=6, deadline=None)
@given(
    batch_size=st.integers(1, 40),
    num_classes=st.integers(2, 300),
    spread=st.floats(0.1, 20.0),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(keys, cloud, batch_size, num_classes, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen)
    z = spread * torch.randn(batch_size, num_classes, dtype=torch.float64, generator=gen)
    out, result = _run(keys, cloud, y, z)
    _, ref_grad = _reference(y, z)
    # Large spreads push some -log p beyond the documented clamp, so compare with it.
    ref_loss = F.cross_entropy(z, y, reduction="none").clamp(max=keys.params.max_neg_log_prob).mean().item()
    bounds = batch_bounds(keys.params, batch_size, num_classes)
    assert abs(out.loss - ref_loss) <= bounds.loss_abs_error
    total = (out.grad_share + result.grad_mask).double()
    assert (total - ref_grad * 2**16).abs().max().item() <= bounds.grad_error_lsb


def test_checkpointed_client_keys_still_decrypt(keys, cloud):
    restored = ClientKeys.from_bytes(keys.to_bytes())
    assert restored.key_id == keys.key_id
    y = torch.tensor([2, 0, 1])
    z = torch.randn(3, 4, dtype=torch.float64)
    request = encrypt_labels(keys, y, 4)
    result = compute_loss_and_grad(CloudKeys.from_bytes(cloud.to_bytes()), request, z)
    out = decrypt_loss_and_grad(restored, result.payload, envelope_digest(request))
    assert abs(out.loss - F.cross_entropy(z, y).item()) <= batch_bounds(keys.params, 3, 4).loss_abs_error
