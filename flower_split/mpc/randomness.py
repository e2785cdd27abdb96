"""Cryptographically secure uniform ring tensors.

Two sources, both uniform over Z_2^64 element-wise:

* ``random_ring`` draws from OS entropy (``os.urandom``); it is used for masks that
  nobody else needs to reproduce (input sharing, dealer seeds).
* ``RingStream`` expands a 32-byte seed with AES-256 in counter mode (the keystream
  is AES_seed(0), AES_seed(1), ... with a 128-bit big-endian counter starting at
  zero).  Whoever holds the seed can reproduce the stream, so dealer material can be
  sent to a party as a seed instead of tensors; without the seed the stream is
  indistinguishable from random (AES as a PRF).

Bytes become int64 elements little-endian, 8 bytes each, in row-major order, so the
dealer and a party on different machines expand a seed to identical tensors.

``torch.randint`` / ``torch.manual_seed`` (a Mersenne twister, predictable from its
output) are never used for masks.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Sequence

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch import Tensor

SEED_BYTES = 32
"""Length of a ``RingStream`` seed: an AES-256 key."""


def _ring_from_bytes(data: bytes, shape: Sequence[int]) -> Tensor:
    """Interpret ``data`` (8 bytes per element, little-endian) as an int64 tensor of ``shape``."""
    if not data:
        return torch.empty(tuple(shape), dtype=torch.int64)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if sys.byteorder == "big":
        raw = raw.view(-1, 8).flip(-1).reshape(-1)
    return raw.view(torch.int64).reshape(tuple(shape))


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"shape must be a sequence of non-negative ints, got {tuple(shape)}")
        count *= size
    return count


def random_ring(shape: Sequence[int]) -> Tensor:
    """A fresh tensor of independent uniform ring elements from OS entropy."""
    return _ring_from_bytes(os.urandom(8 * _numel(shape)), shape)


def new_seed() -> bytes:
    """A fresh uniformly random 32-byte seed for ``RingStream``."""
    return secrets.token_bytes(SEED_BYTES)


class RingStream:
    """A deterministic stream of uniform ring tensors expanded from a 32-byte seed.

    Successive ``next`` calls continue the same AES-256-CTR keystream, so the order
    and shapes of the draws are part of what two holders of the seed must agree on.
    """

    __slots__ = ("_encryptor",)

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, (bytes, bytearray)):
            raise TypeError(f"seed must be bytes, got {type(seed).__name__}")
        if len(seed) != SEED_BYTES:
            raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
        self._encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(bytes(16))).encryptor()

    def next(self, shape: Sequence[int]) -> Tensor:
        """The next tensor of uniform ring elements of ``shape``."""
        return _ring_from_bytes(self._encryptor.update(bytes(8 * _numel(shape))), shape)
