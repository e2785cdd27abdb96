"""Cloud side: cross-entropy loss and its gradient on encrypted labels.

In ``he`` mode the logits z are opened to the cloud (a documented leak), the labels are
not. From Enc(y) and z the cloud returns, without any ciphertext x ciphertext product:

* Enc(loss terms): per ciphertext j, Enc(y_j) x a_j(X), with a the fixed-point
  -log_softmax(z) laid out so that the constant coefficient of the product is
  sum_k y_k a_k; summed over j, re-randomized with a public-key encryption of zero, and
  masked by a polynomial that is uniform modulo the ciphertext modulus in every
  coefficient but the constant one. That one carries the batch's total loss plus
  flooding noise that statistically hides the client's own encryption noise times a —
  the only trace of the per-sample terms left.
* Enc(g - m): per ciphertext, plaintext(round(2**s * softmax(z)) - mu) - Enc(y), with mu
  the cloud's fresh mask, uniform over a range at least 2**stat_sec * B * C times wider
  than the values; the cloud keeps m = round(mu / unit), its share of g in the
  fixed-point ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import tenseal.sealapi as seal

from flower_split.he import _rns, _sealio, envelope, packing
from flower_split.he.keys import CloudKeys
from flower_split.he.material import LossMaterial, MaterialPool, fresh_material
from flower_split.he.params import batch_bounds


@dataclass(frozen=True)
class CloudResult:
    """The cloud's output for one labels message.

    Attributes:
        payload: result envelope for the client (Enc(loss terms), Enc(g - m)).
        grad_mask: [B, C] int64, the cloud's additive share m of g in Z_2^64 (``frac_bits``
            fractional bits): client share + grad_mask = round(2**frac_bits * g) +- 1.
    """

    payload: bytes
    grad_mask: torch.Tensor


def _check_logits(logits: torch.Tensor, batch_size: int, num_classes: int) -> np.ndarray:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits: expected a 2-D tensor [batch_size, num_classes]")
    if logits.shape[0] != batch_size:
        raise ValueError(
            f"logits: batch size {logits.shape[0]} does not match the labels' batch size {batch_size}"
        )
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits: {logits.shape[1]} classes do not match the labels' {num_classes} classes")
    z = logits.detach().cpu().to(torch.float64).numpy()
    if not np.isfinite(z).all():
        raise ValueError("logits: contain NaN or infinity")
    return z


def _loss(keys: CloudKeys, cts: list[seal.Ciphertext], neg_logp: np.ndarray, material: LossMaterial) -> bytes:
    """Serialized Enc(loss terms): constant coefficient = 2**(s+f_a) * total loss + flood."""
    params = keys.params
    top, final = keys.levels[0], keys.levels[-1]
    ev = keys.evaluator
    a_scale = 2.0**params.logprob_frac_bits
    a = np.rint(np.clip(neg_logp, 0.0, params.max_neg_log_prob) * a_scale).astype(np.int64)
    acc = material.loss_start  # Enc(0) + flood mask, used once
    for ct, run in zip(cts, packing.pack(a, params.poly_modulus_degree)):
        if run.any():  # SEAL refuses a product with the zero plaintext
            prod = seal.Ciphertext()
            ev.multiply_plain(ct, keys.plaintext(top, packing.reverse_negacyclic(run), a_scale), prod)
            ev.add_inplace(acc, prod)
    ev.rescale_to_next_inplace(acc)
    while tuple(acc.parms_id()) != final.parms_id:
        ev.mod_switch_to_next_inplace(acc)  # drops a prime; only the constant coefficient matters
    return _sealio.dump(acc)


def _grad(keys: CloudKeys, cts: list[seal.Ciphertext], prob: np.ndarray, material: LossMaterial) -> list[bytes]:
    """Serialized Enc(2**s * (softmax - y) - mu) per ciphertext (mu from ``material``)."""
    params = keys.params
    top = keys.levels[0]
    ev = keys.evaluator
    degree = params.poly_modulus_degree
    # 2**s * p is exact in float64, so rint gives the true round(2**s * p); it is below 2**62.
    target = np.rint(np.ldexp(prob.reshape(-1), params.label_scale_bits)).astype(np.int64)
    primes = np.array(top.primes, dtype=np.uint64).reshape(-1, 1)
    out = []
    for j, ct in enumerate(cts):
        ntt = _rns.to_ntt(top, _rns.residues(top, target[j * degree : (j + 1) * degree]))
        ntt = (ntt + material.grad_offsets[j]) % primes  # NTT(target - mu): both below q < 2**61
        grad = seal.Ciphertext()
        ev.negate(ct, grad)
        ev.add_plain_inplace(grad, keys.ntt_plaintext(top, ntt, 2.0**params.label_scale_bits))
        ev.rescale_to_next_inplace(grad)
        out.append(_sealio.dump(grad))
    return out


def _check_material(material: LossMaterial, keys: CloudKeys, batch_size: int, num_classes: int) -> None:
    if material.key_id != keys.key_id or material.shape != (batch_size, num_classes):
        raise ValueError(f"loss material for key {material.key_id.hex()} and shape {material.shape} does not fit "
                         f"key {keys.key_id.hex()} and batch shape {(batch_size, num_classes)}")


def compute_loss_and_grad(keys: CloudKeys, labels_envelope: bytes, logits: torch.Tensor,
                          material: LossMaterial | MaterialPool | None = None) -> CloudResult:
    """Encrypted mean cross-entropy and gradient share for one batch.

    Args:
        keys: the tenant's public context (see :class:`CloudKeys`).
        labels_envelope: bytes from :func:`flower_split.he.labels.encrypt_labels`.
        logits: [B, C] logits z, opened to the cloud in ``he`` mode.
        material: the batch's randomness made ahead (:mod:`~flower_split.he.material`), a pool
            to take it from, or None to make it now. Used once, whatever happens.

    Raises:
        ValueError: envelope under another key, garbled, or not matching the logits' shape.
    """
    if not isinstance(keys, CloudKeys):
        raise ValueError(f"compute_loss_and_grad needs CloudKeys, got {type(keys).__name__}")
    params = keys.params
    msg = envelope.decode_labels(labels_envelope, key_id=keys.key_id, degree=params.poly_modulus_degree)
    z = _check_logits(logits, msg.batch_size, msg.num_classes)
    batch_bounds(params, msg.batch_size, msg.num_classes)  # a shape the parameters cannot hold fails here
    top = keys.levels[0]
    cts = [keys.load_ciphertext(data, top, 2.0**params.label_scale_bits) for data in msg.ciphertexts]
    if isinstance(material, MaterialPool):
        if material.keys.key_id != keys.key_id:
            raise ValueError(f"loss material pool of key {material.keys.key_id.hex()}, not {keys.key_id.hex()}")
        material = material.take(msg.batch_size, msg.num_classes)
    elif material is None:
        material = fresh_material(keys, msg.batch_size, msg.num_classes)
    _check_material(material, keys, msg.batch_size, msg.num_classes)
    material.claim()
    shifted = z - z.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss_ct = _loss(keys, cts, -logp, material)
    grad_cts = _grad(keys, cts, np.exp(logp), material)
    grad_mask = material.grad_mask.reshape(msg.batch_size, msg.num_classes)
    result = envelope.ResultMessage(
        key_id=keys.key_id,
        batch_size=msg.batch_size,
        num_classes=msg.num_classes,
        request_digest=envelope.digest(labels_envelope),
        loss_ciphertext=loss_ct,
        grad_ciphertexts=tuple(grad_cts),
    )
    return CloudResult(payload=envelope.encode_result(result), grad_mask=torch.from_numpy(grad_mask))
