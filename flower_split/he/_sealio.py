"""Bytes <-> SEAL objects, and NTT-form plaintexts built from raw values.

TenSEAL's SEAL bindings (``tenseal.sealapi``) save and load only through file paths.
We give them an anonymous in-memory file (``memfd``), so serialized objects — secret
keys included — never touch a disk; platforms without memfd fall back to a private
(0700) temporary directory that is removed at once.

The bindings also cannot fill a plaintext with chosen coefficients, which the integer
coefficient encoding (see ``_rns``) needs. :func:`plaintext_from_ntt` writes SEAL's own
serialization of a ``Plaintext`` (uncompressed) and loads it, so SEAL validates it
against the context like any other input.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import numpy as np
import tenseal.sealapi as seal

_SEAL_MAGIC = 0xA15E
# magic, header size, version major, version minor, compression, reserved, total size
_HEADER = struct.Struct("<HBBBBHQ")
_COMPR_NONE = 0


@contextmanager
def _memory_file() -> Iterator[tuple[str, int]]:
    """A path SEAL can open, backed by memory, and a descriptor to read/write it."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("flower-split-he", os.MFD_CLOEXEC)
        try:
            yield f"/proc/self/fd/{fd}", fd
        finally:
            os.close(fd)
    else:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "seal-object")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                yield path, fd
            finally:
                os.close(fd)


def dump(obj: Any) -> bytes:
    """Serialize a SEAL object (SEAL's format, zstd-compressed by SEAL's default)."""
    with _memory_file() as (path, fd):
        obj.save(path)
        size = os.fstat(fd).st_size
        chunks, offset = [], 0
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)


def load(obj: Any, data: bytes, context: seal.SEALContext) -> None:
    """Load ``data`` into ``obj`` for ``context``; any SEAL complaint becomes ValueError."""
    with _memory_file() as (path, fd):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        try:
            obj.load(context, path)
        except Exception as exc:  # SEAL raises a variety of C++ exception types
            raise ValueError(f"SEAL rejected the {type(obj).__name__} bytes: {exc}") from exc


@lru_cache(maxsize=1)
def _seal_version() -> tuple[int, int]:
    """(major, minor) of the SEAL build, as it writes into its own headers."""
    blob = dump(seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS))
    return blob[3], blob[4]


def _header(total_size: int) -> bytes:
    major, minor = _seal_version()
    return _HEADER.pack(_SEAL_MAGIC, _HEADER.size, major, minor, _COMPR_NONE, 0, total_size)


def plaintext_from_ntt(
    context: seal.SEALContext, parms_id: list[int], values: np.ndarray, scale: float
) -> seal.Plaintext:
    """A CKKS plaintext in NTT form at ``parms_id`` whose data are exactly ``values``.

    ``values`` is [L, N] uint64: the NTT of the polynomial modulo each of the L primes of
    that level, in SEAL's order (as produced by ``_rns.to_ntt``). ``scale`` is metadata
    SEAL checks when the plaintext meets a ciphertext.
    """
    data = np.ascontiguousarray(values, dtype="<u8").tobytes()
    count = values.size
    dyn_array = _header(_HEADER.size + 8 + len(data)) + struct.pack("<Q", count) + data
    body = struct.pack("<4Q", *parms_id) + struct.pack("<Qd", count, scale) + dyn_array
    plain = seal.Plaintext()
    load(plain, _header(_HEADER.size + len(body)) + body, context)
    return plain


def plaintext_values(plain: seal.Plaintext, shape: tuple[int, int]) -> np.ndarray:
    """The raw data of an NTT-form plaintext as a [L, N] uint64 array."""
    count = shape[0] * shape[1]
    if plain.coeff_count() != count:
        raise ValueError(f"plaintext holds {plain.coeff_count()} values, expected {count}")
    return np.fromiter(map(plain.__getitem__, range(count)), dtype=np.uint64, count=count).reshape(shape)
