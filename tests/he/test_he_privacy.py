"""What each party can and cannot learn: no secret key on the cloud, no labels in the
cloud's bytes, no per-sample losses or log-probabilities for the client."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal
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
from flower_split.he import _rns, envelope, packing


def _walk(obj, seen=None):
    """Every object reachable from ``obj`` through attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    children = []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    for child in children:
        yield from _walk(child, seen)


def test_cloud_keys_hold_no_secret_key_and_cannot_decrypt(keys, cloud):
    assert not any(isinstance(o, (seal.SecretKey, seal.Decryptor)) for o in _walk(cloud))
    # Control: the same walk does find the secret key on the client side.
    assert any(isinstance(o, seal.SecretKey) for o in _walk(keys))
    request = encrypt_labels(keys, torch.tensor([0, 1]), 3)
    result = compute_loss_and_grad(cloud, request, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot decrypt"):
        decrypt_loss_and_grad(cloud, result.payload, envelope_digest(request))


def test_public_bytes_contain_no_secret_key(keys):
    secret = keys._secret_key_bytes
    probe = secret[len(secret) // 2 : len(secret) // 2 + 64]
    assert probe not in keys.public_bytes()
    assert probe in keys.to_bytes()  # control: the probe does find it where it is


def test_cloud_refuses_key_material_with_a_secret_key(keys):
    with pytest.raises(ValueError, match="secret key"):
        CloudKeys.from_bytes(keys.to_bytes())


def test_labels_envelope_contains_no_plaintext_labels(keys):
    num_classes, label = 8, 3
    y = torch.full((64,), label)
    request = encrypt_labels(keys, y, num_classes)
    onehot = np.eye(num_classes)[y.numpy()]
    shift = np.uint64(keys.params.label_scale_bits)
    encodings = {  # ways the labels could appear in the clear, and a probe for each
        "onehot float64": onehot.astype(np.float64).tobytes(),
        "onehot float32": onehot.astype(np.float32).tobytes(),
        "onehot int64": onehot.astype(np.int64).tobytes(),
        "onehot uint8": onehot.astype(np.uint8).tobytes(),
        "onehot coefficients": (onehot.astype(np.uint64) << shift).tobytes(),
        "labels int64": y.numpy().astype(np.int64).tobytes(),
        "labels uint8": y.numpy().astype(np.uint8).tobytes(),
    }
    for name, clear in encodings.items():
        probe = clear[:32]
        assert probe in clear  # control: the probe finds labels sent in the clear
        assert probe not in request, name
    # Encryption is randomized: the same labels never give the same bytes.
    assert encrypt_labels(keys, y, num_classes) != request


def _decrypted_loss_coefficients(keys: ClientKeys, payload: bytes, digest: bytes) -> np.ndarray:
    """Centered coefficients of the client's decryption of the loss ciphertext."""
    msg = envelope.decode_result(
        payload, key_id=keys.key_id, degree=keys.params.poly_modulus_degree, request_digest=digest
    )
    level, q_last = keys.public.levels[-1], keys.public.levels[0].primes[-1]
    scale = 2.0 ** (keys.params.label_scale_bits + keys.params.logprob_frac_bits) / q_last
    ct = keys.public.load_ciphertext(msg.loss_ciphertext, level, scale)
    return _rns.crt_centered(level, _rns.from_ntt(level, keys.decrypt(ct, level)))


def _unmasked_loss_ciphertext(
    keys: ClientKeys, cloud: CloudKeys, request: bytes, z: torch.Tensor
) -> seal.Ciphertext:
    """What the cloud would return if it skipped re-randomization, mask and flood."""
    params, top = keys.params, cloud.levels[0]
    msg = envelope.decode_labels(request, key_id=cloud.key_id, degree=params.poly_modulus_degree)
    a = np.rint(-F.log_softmax(z, dim=1).numpy() * 2**params.logprob_frac_bits).astype(np.int64)
    acc = None
    for data, run in zip(msg.ciphertexts, packing.pack(a, params.poly_modulus_degree)):
        ct = cloud.load_ciphertext(data, top, 2.0**params.label_scale_bits)
        prod = seal.Ciphertext()
        plain = cloud.plaintext(top, packing.reverse_negacyclic(run), 2.0**params.logprob_frac_bits)
        cloud.evaluator.multiply_plain(ct, plain, prod)
        if acc is None:
            acc = prod
        else:
            cloud.evaluator.add_inplace(acc, prod)
    cloud.evaluator.rescale_to_next_inplace(acc)
    while tuple(acc.parms_id()) != cloud.levels[-1].parms_id:
        cloud.evaluator.mod_switch_to_next_inplace(acc)
    return acc


def _log_probs_read_from(coeffs: np.ndarray, label: int, num_classes: int, scale: float) -> np.ndarray:
    """The single-sample attack: coefficient (label - k) mod N holds +-scale * a_k."""
    n = coeffs.size
    return np.array([abs(int(coeffs[(label - k) % n])) / scale for k in range(num_classes)])


def test_client_sees_only_the_total_loss(keys, cloud):
    torch.manual_seed(0)
    num_classes, label = 10, 4
    y = torch.tensor([label])
    z = 2 * torch.randn(1, num_classes, dtype=torch.float64)
    neg_logp = -F.log_softmax(z, dim=1)[0].numpy()
    q_last = keys.public.levels[0].primes[-1]
    scale = 2.0 ** (keys.params.label_scale_bits + keys.params.logprob_frac_bits) / q_last
    request = encrypt_labels(keys, y, num_classes)
    level = keys.public.levels[-1]

    # Control: without the cloud's protections, one sample's product reveals every log-prob.
    bare = _unmasked_loss_ciphertext(keys, cloud, request, z)
    bare_coeffs = _rns.crt_centered(level, _rns.from_ntt(level, keys.decrypt(bare, level)))
    assert np.allclose(_log_probs_read_from(bare_coeffs, label, num_classes, scale), neg_logp, atol=1e-2)

    result = compute_loss_and_grad(cloud, request, z)
    coeffs = _decrypted_loss_coefficients(keys, result.payload, envelope_digest(request))
    leaked = _log_probs_read_from(coeffs, label, num_classes, scale)
    others = np.arange(num_classes) != label  # k = label reads coefficient 0: the total itself
    assert not np.any(np.abs(leaked - neg_logp)[others] < 0.1)
    # Every coefficient but the constant one is uniform modulo q0 ...
    q0 = level.primes[0]
    rest = np.array([float(c) for c in coeffs[1:]]) / q0
    assert abs(np.mean(np.abs(rest) > 0.25) - 0.5) < 0.03
    # ... and the constant one carries exactly the total loss.
    bound = batch_bounds(keys.params, 1, num_classes).loss_abs_error
    assert abs(int(coeffs[0]) / scale - neg_logp[label]) <= bound


def test_per_coefficient_values_are_not_per_sample_losses(keys, cloud):
    torch.manual_seed(1)
    y = torch.randint(0, 77, (32,))
    z = torch.randn(32, 77, dtype=torch.float64)
    per_sample = F.cross_entropy(z, y, reduction="none").numpy()
    request = encrypt_labels(keys, y, 77)
    result = compute_loss_and_grad(cloud, request, z)
    coeffs = _decrypted_loss_coefficients(keys, result.payload, envelope_digest(request))
    q_last = keys.public.levels[0].primes[-1]
    scale = 2.0 ** (keys.params.label_scale_bits + keys.params.logprob_frac_bits) / q_last
    values = np.array([float(c) for c in coeffs[1:]]) / scale
    # Uniform values over +-2^16 land within 0.01 of one of the 32 losses about 0.04 times
    # per ciphertext by chance; the coefficients are huge, not loss-sized.
    near = np.abs(values[:, None] - per_sample[None, :]).min(axis=1) < 0.01
    assert near.sum() <= 3
    assert np.median(np.abs(values)) > 1e3 * per_sample.max()
    bound = batch_bounds(keys.params, 32, 77).loss_abs_error
    assert abs(int(coeffs[0]) / scale / 32 - per_sample.mean()) <= bound


def test_loss_ciphertext_is_rerandomized(keys, cloud):
    """Without a fresh encryption of zero, c1 of the loss ciphertext would be a known
    function of the client's c1 and the log-probabilities, revealing them."""
    torch.manual_seed(2)
    y = torch.randint(0, 5, (6,))
    z = torch.randn(6, 5, dtype=torch.float64)
    request = encrypt_labels(keys, y, 5)
    result = compute_loss_and_grad(cloud, request, z)
    msg = envelope.decode_result(
        result.payload,
        key_id=keys.key_id,
        degree=keys.params.poly_modulus_degree,
        request_digest=envelope_digest(request),
    )
    level, q_last = cloud.levels[-1], cloud.levels[0].primes[-1]
    scale = 2.0 ** (keys.params.label_scale_bits + keys.params.logprob_frac_bits) / q_last
    out = cloud.load_ciphertext(msg.loss_ciphertext, level, scale)
    bare = _unmasked_loss_ciphertext(keys, cloud, request, z)
    n = keys.params.poly_modulus_degree
    c1_out = np.array([out[i] for i in range(n, 2 * n)], dtype=np.uint64)
    c1_bare = np.array([bare[i] for i in range(n, 2 * n)], dtype=np.uint64)
    assert np.mean(c1_out == c1_bare) < 0.01
