"""Full-entropy masks for Flower's SecAgg+, installed on both sides of a sharing phase.

Flower 1.41's ``pseudo_rand_gen`` folds each 32-byte mask seed to 32 bits (the XOR of its
words) and draws from NumPy's MT19937. When a tenant is dropped after it sent its vector the
server removes its pairwise masks (it reconstructs the tenant's key, as SecAgg+ must), and the
vector is then hidden by a 2^32 seed: a hostile review (2026-12-03) recovered one tenant's
adapter halves bit-exactly after a search of 17 minutes on one core. With fewer than four
participants even the alive tenants' pairwise masks fall to a meet-in-the-middle.

:func:`install` replaces that function in the two Flower modules that call it (the tenants'
``secaggplus_mod`` and the cloud's ``SecAggPlusWorkflow``) by :func:`full_entropy_masks`: a
ChaCha20 keystream keyed with SHA-256 of the whole seed, reduced exactly uniformly modulo the
mask range. Masking is otherwise Flower's. Both sides must draw the same masks: this project's
cloud side names :data:`PRG_NAME` in every set-up it sends (:mod:`~flower_split.flower.sharing_server`)
and a tenant refuses a set-up that does not (:mod:`~flower_split.flower.sharing_policy`).
Proposed upstream; remove once Flower's own generator keeps the seed's entropy.
"""

from __future__ import annotations

import hashlib
import importlib
import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

PRG_NAME = "flower-split/chacha20-sha256/v1"
FLOWER_MODULES = ("flwr.client.mod.secure_aggregation.secaggplus_mod",  # (the package exports a function
                  "flwr.server.workflow.secure_aggregation.secaggplus_workflow")  # of the same name: by path)
_CONTEXT = b"flower-split/secagg-mask/v1"


def full_entropy_masks(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks uniform in ``[0, num_range)`` of the given shapes, from the whole ``seed`` (int64,
    as Flower's generator returns them; a 0-d shape gives a 0-d array)."""
    if not 1 < num_range <= 1 << 63:
        raise ValueError(f"num_range {num_range}: expected 2 .. 2^63")
    key = hashlib.sha256(_CONTEXT + seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    sizes = [math.prod(shape) for shape in dimensions_list]
    values = _uniform(stream, num_range, sum(sizes))
    out, start = [], 0
    for shape, size in zip(dimensions_list, sizes):
        out.append(values[start:start + size].reshape(shape))
        start += size
    return out


def _uniform(stream: object, num_range: int, count: int) -> np.ndarray:
    """``count`` integers uniform in ``[0, num_range)`` by rejection on the keystream's words."""
    bits = (num_range - 1).bit_length()
    mask = np.uint64((1 << bits) - 1)
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        want = (count - filled) * 2 + 8  # acceptance >= 1/2 per word
        words = np.frombuffer(stream.update(bytes(8 * want)), dtype="<u8") & mask  # type: ignore[attr-defined]
        kept = words[words < np.uint64(num_range)][: count - filled]
        out[filled:filled + kept.size] = kept.astype(np.int64)
        filled += kept.size
    return out


def install() -> None:
    """Use :func:`full_entropy_masks` in Flower's SecAgg+ client mod and server workflow (idempotent)."""
    for name in FLOWER_MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, "pseudo_rand_gen"):
            raise RuntimeError(f"{name} has no pseudo_rand_gen: this Flower version masks differently; "
                               "review flower_split.flower.secagg_prg before sharing")
        module.pseudo_rand_gen = full_entropy_masks


def installed() -> bool:
    """Whether both Flower modules mask with :func:`full_entropy_masks` now (a reload would undo :func:`install`)."""
    return all(getattr(importlib.import_module(name), "pseudo_rand_gen", None) is full_entropy_masks
               for name in FLOWER_MODULES)
