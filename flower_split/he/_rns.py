"""Integer polynomials in RNS and NTT form, as SEAL's CKKS ciphertexts hold them.

We use CKKS ciphertexts with *coefficient* encoding: a vector of integers is placed
directly in the coefficients of the plaintext polynomial (no canonical-embedding FFT).
Arithmetic on coefficients is then exact, a ring product puts an inner product into the
constant coefficient, and a mask can be drawn uniformly modulo the ciphertext modulus.

A polynomial at a level with primes ``q_1..q_L`` is an [L, N] uint64 array: residues
modulo each prime, either as coefficients or as SEAL's negacyclic NTT of them. The NTT
is SEAL's own (same tables), so our arrays mean what SEAL thinks they mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as seal
from tenseal.sealapi import _sealapi_cpp

from flower_split.he import _random

_util = _sealapi_cpp.util


@dataclass(frozen=True)
class Level:
    """One level of the modulus chain: its SEAL parms_id, primes and NTT tables."""

    parms_id: tuple[int, ...]
    primes: tuple[int, ...]
    tables: tuple[Any, ...]
    degree: int

    @property
    def modulus(self) -> int:
        """Product of the level's primes."""
        return math.prod(self.primes)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of a polynomial array at this level."""
        return (len(self.primes), self.degree)


def chain(context: seal.SEALContext) -> list[Level]:
    """Data levels of ``context``, from the first (all data primes) down to the last."""
    levels = []
    data = context.first_context_data()
    while data is not None:
        parms = data.parms()
        degree = parms.poly_modulus_degree()
        primes = tuple(m.value() for m in parms.coeff_modulus())
        tables = tuple(_util.NTTTables(degree.bit_length() - 1, seal.Modulus(q)) for q in primes)
        levels.append(Level(tuple(data.parms_id()), primes, tables, degree))
        data = data.next_context_data()
    return levels


def residues(level: Level, coeffs: np.ndarray) -> np.ndarray:
    """Residues [L, N] of up to N integer coefficients (int64, or object array of big
    ints); missing high coefficients are zero."""
    if coeffs.ndim != 1 or coeffs.size > level.degree:
        raise ValueError(f"expected at most {level.degree} coefficients, got shape {coeffs.shape}")
    out = np.zeros(level.shape, dtype=np.uint64)
    for row, q in zip(out, level.primes):
        if coeffs.dtype == object:
            row[: coeffs.size] = (coeffs % q).astype(np.uint64)
        else:
            row[: coeffs.size] = np.mod(coeffs.astype(np.int64), np.int64(q)).astype(np.uint64)
    return out


def to_ntt(level: Level, coeff_residues: np.ndarray) -> np.ndarray:
    """SEAL's negacyclic NTT of each residue row."""
    return np.stack(
        [
            np.array(_util.ntt_negacyclic_harvey(row.tolist(), table), dtype=np.uint64)
            for row, table in zip(coeff_residues, level.tables)
        ]
    )


def from_ntt(level: Level, ntt_values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_ntt` (fully reduced)."""
    rows = []
    for row, table, q in zip(ntt_values, level.tables, level.primes):
        # The binding runs SEAL's lazy inverse NTT, which leaves values in [0, 2q).
        lazy = np.array(_util.inverse_ntt_negacyclic_harvey(row.tolist(), table), dtype=np.uint64)
        rows.append(lazy % np.uint64(q))
    return np.stack(rows)


def crt_centered(level: Level, coeff_residues: np.ndarray) -> np.ndarray:
    """Integers in (-Q/2, Q/2] with the given residues (object array of Python ints)."""
    modulus = level.modulus
    total = np.zeros(coeff_residues.shape[1], dtype=object)
    for row, q in zip(coeff_residues, level.primes):
        cofactor = modulus // q
        total = total + ((row.astype(object) * pow(cofactor, -1, q)) % q) * cofactor
    total = total % modulus
    return np.where(total > modulus // 2, total - modulus, total)


def constant_coefficient(level: Level, ntt_values: np.ndarray) -> int:
    """Centered constant coefficient of a polynomial given in NTT form.

    The NTT evaluates the polynomial at all N odd powers of a primitive 2N-th root; those
    evaluations sum to N times the constant coefficient, whatever SEAL's ordering.
    """
    const = []
    for row, q in zip(ntt_values, level.primes):
        const.append(int(row.astype(object).sum()) * pow(level.degree, -1, q) % q)
    value = crt_centered(level, np.array(const, dtype=np.uint64).reshape(-1, 1))[0]
    return int(value)


def random_with_constant(level: Level, constant: int) -> np.ndarray:
    """NTT form of a polynomial uniform modulo Q except for a fixed constant coefficient.

    Uniform NTT values with their sum fixed to ``N * constant`` (per prime) map, through
    the inverse NTT (a bijection), to coefficients 1..N-1 uniform and coefficient 0 equal
    to ``constant``.
    """
    rows = []
    for q in level.primes:
        row = _random.uniform_residues(q, level.degree)
        head = int(row[:-1].astype(object).sum())
        row[-1] = (level.degree * constant - head) % q
        rows.append(row)
    return np.stack(rows)
