"""The encrypted loss's randomness made ahead (flower_split.he.material): same results, used once."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from flower_split.he import (
    ClientKeys,
    CloudKeys,
    batch_bounds,
    compute_loss_and_grad,
    decrypt_loss_and_grad,
    encrypt_labels,
    envelope_digest,
)
from flower_split.he._sealio import dump
from flower_split.he.material import MaterialPool, fresh_material


def _batch(seed: int, batch_size: int = 8, num_classes: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return torch.randint(0, num_classes, (batch_size,)), 3 * torch.randn(batch_size, num_classes, dtype=torch.float64)


def _check(keys: ClientKeys, cloud: CloudKeys, y: torch.Tensor, z: torch.Tensor, material) -> None:
    request = encrypt_labels(keys, y, z.shape[1])
    result = compute_loss_and_grad(cloud, request, z, material)
    out = decrypt_loss_and_grad(keys, result.payload, envelope_digest(request))
    zz = z.clone().requires_grad_(True)
    loss = F.cross_entropy(zz, y)
    loss.backward()
    bounds = batch_bounds(keys.params, *z.shape)
    assert abs(out.loss - loss.item()) <= bounds.loss_abs_error
    total = (out.grad_share + result.grad_mask).double()
    assert (total - zz.grad * 2**16).abs().max().item() <= bounds.grad_error_lsb


def test_material_made_ahead_gives_the_loss_and_gradient(keys, cloud):
    y, z = _batch(0, batch_size=120)  # two label ciphertexts: one offset per ciphertext
    _check(keys, cloud, y, z, fresh_material(cloud, 120, 77))
    pool = MaterialPool(cloud, depth=2, background=False)
    for seed in (1, 2, 3):  # more batches than the pool holds: it refills
        y, z = _batch(seed)
        _check(keys, cloud, y, z, pool)


def test_material_is_used_once(keys, cloud):
    """A second use of mu would hand the tenant g1 - g2 (its two shares' difference)."""
    y, z = _batch(4)
    request = encrypt_labels(keys, y, 77)
    material = fresh_material(cloud, 8, 77)
    compute_loss_and_grad(cloud, request, z, material)
    with pytest.raises(ValueError, match="already used"):
        compute_loss_and_grad(cloud, request, z, material)


def test_material_must_fit_the_key_and_the_batch(keys, cloud):
    y, z = _batch(5)
    request = encrypt_labels(keys, y, 77)
    with pytest.raises(ValueError, match="does not fit"):
        compute_loss_and_grad(cloud, request, z, fresh_material(cloud, 9, 77))
    other = CloudKeys.from_bytes(ClientKeys.generate(keys.params).public_bytes())
    with pytest.raises(ValueError, match="does not fit"):
        compute_loss_and_grad(cloud, request, z, fresh_material(other, 8, 77))
    with pytest.raises(ValueError, match="pool of key"):
        compute_loss_and_grad(cloud, request, z, MaterialPool(other, background=False))


def test_pool_hands_out_distinct_items_and_keeps_its_depth(cloud):
    pool = MaterialPool(cloud, depth=2, background=False)
    pool.refill((8, 77))
    assert pool.ready(8, 77) == 2
    first, second = pool.take(8, 77), pool.take(8, 77)
    assert first is not second
    assert not (first.grad_mask == second.grad_mask).any()  # fresh 120-bit masks collide with prob ~2^-58
    assert dump(first.loss_start) != dump(second.loss_start)
    assert pool.ready(8, 77) == 2  # each take refilled the shape
    with pytest.raises(ValueError, match="at least one"):
        MaterialPool(cloud, depth=0)


def test_background_refill_fills_the_pool(cloud):
    pool = MaterialPool(cloud, depth=1)
    pool.refill((4, 77))
    deadline = time.monotonic() + 60  # generous: the pool needs ~10 ms; the VM may be loaded
    while pool.ready(4, 77) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.ready(4, 77) == 1


def test_pool_keeps_only_the_most_recent_shapes(cloud):
    """A tenant picks its batch shapes: cycling through many must not grow the cloud's memory."""
    pool = MaterialPool(cloud, depth=1, shapes=2, background=False)
    for batch_size in range(1, 6):
        pool.take(batch_size, 77)
    assert [pool.ready(b, 77) for b in range(1, 6)] == [0, 0, 0, 1, 1]
    assert len(pool._ready) == 2
    pool.take(4, 77)  # the older of the two is asked again: it becomes the most recent
    pool.refill((6, 77))
    assert [pool.ready(b, 77) for b in (4, 5, 6)] == [1, 0, 1]
    with pytest.raises(ValueError, match="at least one"):
        MaterialPool(cloud, shapes=0)
