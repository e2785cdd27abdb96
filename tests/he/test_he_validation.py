"""Malformed, misaddressed or mismatched HE inputs fail with a ValueError that says why."""

from __future__ import annotations

import pytest
import torch

from flower_split.he import (
    ClientKeys,
    CloudKeys,
    HEParams,
    compute_loss_and_grad,
    decrypt_loss_and_grad,
    encrypt_labels,
    envelope_digest,
)


@pytest.fixture(scope="module")
def request_bytes(keys: ClientKeys) -> bytes:
    return encrypt_labels(keys, torch.tensor([0, 2, 1, 2]), 3)


def _logits(batch_size: int = 4, num_classes: int = 3) -> torch.Tensor:
    return torch.randn(batch_size, num_classes, dtype=torch.float64)


def test_valid_request_is_accepted(keys, cloud, request_bytes):
    # Control for the rejections below: the untouched request goes through, and what the client
    # decrypts is the batch's cross-entropy and its share of the gradient.
    logits = _logits()
    result = compute_loss_and_grad(cloud, request_bytes, logits)
    out = decrypt_loss_and_grad(keys, result.payload, envelope_digest(request_bytes))
    labels = torch.tensor([0, 2, 1, 2])
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    assert abs(out.loss - expected) < 1e-2, (out.loss, expected)
    grad = (out.grad_share + result.grad_mask).double() / 2**keys.params.frac_bits
    truth = (torch.softmax(logits, -1) - torch.nn.functional.one_hot(labels, 3)) / len(labels)
    assert (grad - truth).abs().max() < 1e-3


def test_ciphertext_under_another_tenants_key_is_rejected(request_bytes):
    other = CloudKeys.from_bytes(ClientKeys.generate().public_bytes())
    with pytest.raises(ValueError, match="key id .* does not match"):
        compute_loss_and_grad(other, request_bytes, _logits())


def test_rotated_key_rejects_old_ciphertexts(keys, request_bytes):
    rotated = keys.rotate()
    assert rotated.key_id != keys.key_id and rotated.params == keys.params
    with pytest.raises(ValueError, match="rotated key"):
        compute_loss_and_grad(CloudKeys.from_bytes(rotated.public_bytes()), request_bytes, _logits())


@pytest.mark.parametrize("where", [10, 100, 5000, -3])
def test_garbled_bytes_are_rejected(cloud, request_bytes, where):
    garbled = bytearray(request_bytes)
    garbled[where] ^= 0x40
    with pytest.raises(ValueError, match="integrity check failed|bad magic"):
        compute_loss_and_grad(cloud, bytes(garbled), _logits())


@pytest.mark.parametrize("keep", [0, 20, 200, -1])
def test_truncated_bytes_are_rejected(cloud, request_bytes, keep):
    with pytest.raises(ValueError, match="truncated|integrity"):
        compute_loss_and_grad(cloud, request_bytes[:keep], _logits())


def test_wrong_batch_size_is_rejected(cloud, request_bytes):
    with pytest.raises(ValueError, match="batch size 5 does not match the labels' batch size 4"):
        compute_loss_and_grad(cloud, request_bytes, _logits(batch_size=5))


def test_wrong_class_count_is_rejected(cloud, request_bytes):
    with pytest.raises(ValueError, match="4 classes do not match the labels' 3 classes"):
        compute_loss_and_grad(cloud, request_bytes, _logits(num_classes=4))


def test_non_finite_logits_are_rejected(cloud, request_bytes):
    z = _logits()
    z[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compute_loss_and_grad(cloud, request_bytes, z)


def test_result_for_another_request_is_rejected(keys, cloud, request_bytes):
    result = compute_loss_and_grad(cloud, request_bytes, _logits())
    other_request = encrypt_labels(keys, torch.tensor([0, 2, 1, 2]), 3)
    with pytest.raises(ValueError, match="request digest mismatch"):
        decrypt_loss_and_grad(keys, result.payload, envelope_digest(other_request))


def test_result_is_not_a_labels_message(cloud, request_bytes):
    result = compute_loss_and_grad(cloud, request_bytes, _logits())
    with pytest.raises(ValueError, match="wrong message kind"):
        compute_loss_and_grad(cloud, result.payload, _logits())


def test_label_values_are_checked(keys):
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\)"):
        encrypt_labels(keys, torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        encrypt_labels(keys, torch.tensor([[0.0, 1.0]]), 2)


def test_oversized_batch_is_refused_up_front(keys):
    with pytest.raises(ValueError, match="batch 4096x77"):
        encrypt_labels(keys, torch.zeros(4096, dtype=torch.int64), 77)


def test_malformed_key_material_is_rejected(keys):
    with pytest.raises(ValueError, match="bad magic"):
        CloudKeys.from_bytes(b"XXXX" + keys.public_bytes()[4:])
    with pytest.raises(ValueError, match="truncated"):
        CloudKeys.from_bytes(keys.public_bytes()[:-10])
    with pytest.raises(ValueError, match="not a client checkpoint"):
        ClientKeys.from_bytes(keys.public_bytes())


@pytest.mark.parametrize(
    "field, value",
    [
        ("poly_modulus_degree", 3000),
        ("data_prime_bits", (60,)),
        ("data_prime_bits", (60, 60, 60, 60)),  # 270 bits: beyond the 128-bit bound for N=8192
        ("label_scale_bits", 63),
        ("stat_sec", 8),
    ],
)
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        HEParams(**{field: value})


def test_params_round_trip_through_json():
    params = HEParams(logprob_frac_bits=8)
    assert HEParams.from_json(params.to_json()) == params
    with pytest.raises(ValueError, match="HEParams JSON"):
        HEParams.from_json('{"poly_modulus_degree": 8192}')
