"""Label protection with CKKS (``he`` mode): encrypted labels, encrypted loss and gradient.

Flow for one batch (see docs/he.md)::

    client                                   cloud
    keys = ClientKeys.generate()
    keys.public_bytes()          ──────▶     cloud_keys = CloudKeys.from_bytes(...)
    req = encrypt_labels(keys, y, C) ────▶   res = compute_loss_and_grad(cloud_keys, req, z)
                                  ◀──────    res.payload          (cloud keeps res.grad_mask)
    out = decrypt_loss_and_grad(keys, res.payload, envelope_digest(req))
    out.loss, out.grad_share  (stay on the client)

``out.grad_share + res.grad_mask`` (int64, wrapping) is the fixed-point gradient of the
mean cross-entropy with respect to z.
"""

from flower_split.he.labels import ClientResult, decrypt_loss_and_grad, encrypt_labels
from flower_split.he.loss import CloudResult, compute_loss_and_grad
from flower_split.he.envelope import digest as envelope_digest
from flower_split.he.fixed_point import decode_fixed, encode_fixed
from flower_split.he.keys import ClientKeys, CloudKeys
from flower_split.he.params import BatchBounds, HEParams, batch_bounds

__all__ = [
    "BatchBounds",
    "ClientKeys",
    "ClientResult",
    "CloudKeys",
    "CloudResult",
    "HEParams",
    "batch_bounds",
    "compute_loss_and_grad",
    "decode_fixed",
    "decrypt_loss_and_grad",
    "encode_fixed",
    "encrypt_labels",
    "envelope_digest",
]
