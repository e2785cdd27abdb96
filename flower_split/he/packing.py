"""Where each (sample, class) entry of a batch lives in the ciphertexts.

A [B, C] block is flattened row-major and cut into consecutive runs of N entries; run j
fills the coefficients of ciphertext j (the last one zero-padded). Both parties derive
the layout from (B, C, N) alone.
"""

from __future__ import annotations

import numpy as np


def pack(block: np.ndarray, degree: int) -> list[np.ndarray]:
    """Cut a [B, C] array (row-major) into zero-padded length-``degree`` coefficient runs."""
    flat = np.ascontiguousarray(block).reshape(-1)
    count = -(-flat.size // degree)
    padded = np.zeros(count * degree, dtype=flat.dtype)
    padded[: flat.size] = flat
    return [padded[j * degree : (j + 1) * degree] for j in range(count)]


def reverse_negacyclic(run: np.ndarray) -> np.ndarray:
    """Coefficients of a(X) = a_0 - sum_{k>=1} a_k X^(N-k).

    In Z[X]/(X^N + 1), the constant coefficient of y(X) * a(X) is then sum_k y_k a_k:
    a plaintext multiplication puts the inner product into coefficient 0.
    """
    out = np.empty_like(run)
    out[0] = run[0]
    out[1:] = -run[1:][::-1]
    return out
