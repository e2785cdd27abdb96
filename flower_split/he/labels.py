"""Client side: encrypt a batch's labels, decrypt the loss and the gradient share.

Nothing decrypted here may ever be sent to the cloud. A decrypted CKKS value carries the
encryption noise; given back to the party that chose the plaintext operands, it enables
recovery of the secret key (Li & Micciancio, EUROCRYPT 2021). The loss is for the
client's own convergence decision; the gradient share enters the 2PC backward as the
client's additive share, never in the clear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flower_split.he import _rns, envelope, packing
from flower_split.he.fixed_point import wrap_ints
from flower_split.he.keys import ClientKeys
from flower_split.he.params import batch_bounds, ring_unit


@dataclass(frozen=True)
class ClientResult:
    """What the client learns from one result message.

    Attributes:
        loss: mean cross-entropy over the batch (of the clamped log-probabilities).
        grad_share: [B, C] int64, the client's additive share of g = (softmax(z) - onehot(y)) / B
            in Z_2^64 with ``frac_bits`` fractional bits; the cloud holds the other share.
    """

    loss: float
    grad_share: torch.Tensor


def _require_client(keys: object, action: str) -> ClientKeys:
    if not isinstance(keys, ClientKeys):
        raise ValueError(
            f"{action} needs the tenant's ClientKeys (secret key); got {type(keys).__name__}. "
            "Public (cloud-side) keys cannot decrypt."
        )
    return keys


def encrypt_labels(keys: ClientKeys, labels: torch.Tensor, num_classes: int) -> bytes:
    """Enc(onehot(labels)) for one batch, as a labels envelope for the cloud.

    The [B, C] one-hot block is packed row-major into ceil(B*C/N) ciphertexts, one entry
    per coefficient, each entry 1 encoded as 2**label_scale_bits. Secret-key encryption
    lets SEAL send a seed instead of half of each ciphertext.
    """
    keys = _require_client(keys, "encrypt_labels")
    integer_types = (torch.int64, torch.int32, torch.int16, torch.uint8)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype not in integer_types:
        raise ValueError(
            f"labels: expected a 1-D integer tensor of class indices, got {labels!r:.60}"
        )
    batch_size = labels.numel()
    params = keys.params
    batch_bounds(params, batch_size, num_classes)  # refuse shapes the cloud could not process
    y = labels.detach().cpu().to(torch.int64).numpy()
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels: class indices must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    onehot = np.zeros((batch_size, num_classes), dtype=np.int64)
    onehot[np.arange(batch_size), y] = 1 << params.label_scale_bits
    top = keys.public.levels[0]
    scale = 2.0**params.label_scale_bits
    ciphertexts = tuple(
        keys.encrypt_symmetric(keys.public.plaintext(top, run, scale))
        for run in packing.pack(onehot, params.poly_modulus_degree)
    )
    msg = envelope.LabelsMessage(keys.key_id, batch_size, num_classes, ciphertexts)
    return envelope.encode_labels(msg)


def decrypt_loss_and_grad(keys: ClientKeys, result: bytes, request_digest: bytes) -> ClientResult:
    """Decrypt a result envelope that answers the labels envelope with ``request_digest``.

    The loss is the sum of all coefficients' masked terms, i.e. the constant coefficient
    of the loss polynomial; every other coefficient is uniform noise to the client. The
    gradient share is rounded to the fixed-point ring. Keep both on the client.
    """
    keys = _require_client(keys, "decrypt_loss_and_grad")
    params = keys.params
    msg = envelope.decode_result(
        result, key_id=keys.key_id, degree=params.poly_modulus_degree, request_digest=request_digest
    )
    batch_size, num_classes = msg.batch_size, msg.num_classes
    batch_bounds(params, batch_size, num_classes)
    levels = keys.public.levels
    grad_level, loss_level = levels[1], levels[-1]
    q_last = levels[0].primes[-1]
    loss_scale = 2.0 ** (params.label_scale_bits + params.logprob_frac_bits)

    loss_ct = keys.public.load_ciphertext(msg.loss_ciphertext, loss_level, loss_scale / q_last)
    const = _rns.constant_coefficient(loss_level, keys.decrypt(loss_ct, loss_level))
    loss = const * q_last / loss_scale / batch_size

    unit = ring_unit(params, batch_size)
    grad_scale = 2.0**params.label_scale_bits / q_last
    degree = params.poly_modulus_degree
    runs = []
    for j, data in enumerate(msg.grad_ciphertexts):
        ct = keys.public.load_ciphertext(data, grad_level, grad_scale)
        used = min(degree, batch_size * num_classes - j * degree)
        coeff_res = _rns.from_ntt(grad_level, keys.decrypt(ct, grad_level))[:, :used]
        coeffs = _rns.crt_centered(grad_level, coeff_res)
        runs.append((2 * coeffs * q_last + unit) // (2 * unit))  # round(d * q_last / unit)
    share = wrap_ints(np.concatenate(runs).reshape(batch_size, num_classes))
    return ClientResult(loss=float(loss), grad_share=torch.from_numpy(share))
