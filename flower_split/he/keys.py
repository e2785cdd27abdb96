"""Per-tenant CKKS keys: the client's secret context and the cloud's public copy.

The client generates a CKKS key pair per tenant and keeps the secret key. The cloud gets
:meth:`ClientKeys.public_bytes` — parameters and public key only: no secret key, no
Galois keys (no rotations are used) and no relinearization keys (no ciphertext x
ciphertext products). :class:`CloudKeys` refuses key material that contains a secret key
and has no way to decrypt.

Every key pair has a ``key_id`` (a hash of the parameters and public-key bytes). Messages
carry it, so a ciphertext under another tenant's key — or under a key that has since been
rotated — is rejected before it is used.
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import tenseal.sealapi as seal

from flower_split.he import _rns, _sealio
from flower_split.he.params import HEParams

_MAGIC = b"FSHK"
_VERSION = 1
_KIND_PUBLIC = 1
_KIND_SECRET = 2
_HEAD = struct.Struct("<4sBB")
_LEN = struct.Struct("<I")


def _context(params: HEParams) -> seal.SEALContext:
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    bits = [*params.data_prime_bits, params.special_prime_bits]
    parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, bits))
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise ValueError(f"SEAL rejected the HE parameters: {context.parameters_error_message()}")
    return context


def _key_id(params: HEParams, public_key_bytes: bytes) -> bytes:
    digest = hashlib.sha256(b"flower-split/he/key-id/v1\0")
    digest.update(params.to_json().encode())
    digest.update(public_key_bytes)
    return digest.digest()[:16]


def _pack(kind: int, sections: list[bytes]) -> bytes:
    parts = [_HEAD.pack(_MAGIC, _VERSION, kind)]
    for section in sections:
        parts += [_LEN.pack(len(section)), section]
    return b"".join(parts)


def _unpack(data: bytes) -> tuple[int, list[bytes]]:
    if len(data) < _HEAD.size:
        raise ValueError("HE key material: truncated header")
    magic, version, kind = _HEAD.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError("HE key material: bad magic (not flower-split key bytes)")
    if version != _VERSION:
        raise ValueError(f"HE key material: unsupported version {version}")
    sections, offset = [], _HEAD.size
    while offset < len(data):
        if offset + _LEN.size > len(data):
            raise ValueError("HE key material: truncated section length")
        (size,) = _LEN.unpack_from(data, offset)
        offset += _LEN.size
        if offset + size > len(data):
            raise ValueError("HE key material: truncated section")
        sections.append(bytes(data[offset : offset + size]))
        offset += size
    return kind, sections


class CloudKeys:
    """A tenant's public CKKS context as the cloud holds it: it can encrypt, never decrypt.

    Build it with :meth:`from_bytes` on the bytes from :meth:`ClientKeys.public_bytes`.
    ``context``, ``levels`` and ``evaluator`` are the SEAL objects the rest of this
    package computes with.
    """

    def __init__(self, params: HEParams, public_key_bytes: bytes) -> None:
        self.params = params
        self.context = _context(params)
        self.levels = _rns.chain(self.context)
        self.evaluator = seal.Evaluator(self.context)
        self._public_key = seal.PublicKey()
        _sealio.load(self._public_key, public_key_bytes, self.context)
        self._public_key_bytes = public_key_bytes
        self._zero_encryptor = seal.Encryptor(self.context, self._public_key)
        self.key_id = _key_id(params, public_key_bytes)

    @classmethod
    def from_bytes(cls, data: bytes) -> CloudKeys:
        """Load public key material; ValueError if it holds a secret key or is malformed."""
        kind, sections = _unpack(data)
        if kind == _KIND_SECRET:
            raise ValueError(
                "HE key material contains a secret key: the cloud may only load the public "
                "context (ClientKeys.public_bytes), never the client's private checkpoint"
            )
        if kind != _KIND_PUBLIC or len(sections) != 2:
            raise ValueError(
                f"HE key material: expected a public context, got kind={kind} with {len(sections)} sections"
            )
        return cls(HEParams.from_json(sections[0].decode()), sections[1])

    def to_bytes(self) -> bytes:
        """The public context (parameters + public key), e.g. for the cloud's checkpoint."""
        return _pack(_KIND_PUBLIC, [self.params.to_json().encode(), self._public_key_bytes])

    def encrypt_zero(self, level: _rns.Level, scale: float) -> seal.Ciphertext:
        """A fresh public-key encryption of zero at ``level`` (for re-randomization)."""
        zero = seal.Ciphertext()
        self._zero_encryptor.encrypt_zero(list(level.parms_id), zero)
        zero.scale = scale
        return zero

    def plaintext(self, level: _rns.Level, coeffs: np.ndarray, scale: float) -> seal.Plaintext:
        """Encode up to N integer coefficients (int64, or object array of big ints) at ``level``."""
        return self.ntt_plaintext(level, _rns.to_ntt(level, _rns.residues(level, coeffs)), scale)

    def ntt_plaintext(self, level: _rns.Level, ntt: np.ndarray, scale: float) -> seal.Plaintext:
        """The plaintext at ``level`` whose NTT form is ``ntt`` ([L, N] uint64, :func:`_rns.to_ntt`)."""
        return _sealio.plaintext_from_ntt(self.context, list(level.parms_id), ntt, scale)

    def load_ciphertext(self, data: bytes, level: _rns.Level, scale: float) -> seal.Ciphertext:
        """Deserialize one ciphertext and check it sits where the protocol puts it."""
        ct = seal.Ciphertext()
        _sealio.load(ct, data, self.context)
        if ct.size() != 2:
            raise ValueError(f"ciphertext has {ct.size()} polynomials, expected 2")
        if tuple(ct.parms_id()) != level.parms_id:
            raise ValueError(
                f"ciphertext is at a level with {ct.coeff_modulus_size()} primes, "
                f"expected {len(level.primes)}"
            )
        if not ct.is_ntt_form():
            raise ValueError("ciphertext is not in NTT form")
        if ct.scale != scale:
            raise ValueError(
                f"ciphertext scale 2^{_log2(ct.scale):.2f} is not the expected 2^{_log2(scale):.2f}"
            )
        return ct

    def __repr__(self) -> str:
        return f"CloudKeys(key_id={self.key_id.hex()}, N={self.params.poly_modulus_degree})"


class ClientKeys:
    """A tenant's secret CKKS context, held by the client only.

    Decrypted results must never be sent back to the cloud: CKKS decryptions carry the
    encryption noise, and handing them to the key's adversary enables key recovery
    (Li & Micciancio, EUROCRYPT 2021).
    """

    def __init__(self, params: HEParams, public_key_bytes: bytes, secret_key_bytes: bytes) -> None:
        self.public = CloudKeys(params, public_key_bytes)
        self._secret_key = seal.SecretKey()
        _sealio.load(self._secret_key, secret_key_bytes, self.public.context)
        self._secret_key_bytes = secret_key_bytes
        self._encryptor = seal.Encryptor(self.public.context, self._secret_key)
        self._decryptor = seal.Decryptor(self.public.context, self._secret_key)

    @classmethod
    def generate(cls, params: HEParams | None = None) -> ClientKeys:
        """Fresh keys (public + secret only; no Galois or relinearization keys)."""
        params = params or HEParams()
        context = _context(params)
        keygen = seal.KeyGenerator(context)
        public_key = seal.PublicKey()
        keygen.create_public_key(public_key)
        return cls(params, _sealio.dump(public_key), _sealio.dump(keygen.secret_key()))

    def rotate(self) -> ClientKeys:
        """New keys with the same parameters. Ciphertexts under the old key id are rejected."""
        return ClientKeys.generate(self.params)

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientKeys:
        """Restore from :meth:`to_bytes` (a checkpoint)."""
        kind, sections = _unpack(data)
        if kind != _KIND_SECRET or len(sections) != 3:
            raise ValueError("HE key material: not a client checkpoint (expected a secret context)")
        return cls(HEParams.from_json(sections[0].decode()), sections[1], sections[2])

    def to_bytes(self) -> bytes:
        """Checkpoint bytes. They contain the SECRET KEY: store them as the client's secrets."""
        return _pack(
            _KIND_SECRET,
            [self.params.to_json().encode(), self.public._public_key_bytes, self._secret_key_bytes],
        )

    def public_bytes(self) -> bytes:
        """What the cloud receives: parameters and public key, nothing secret."""
        return self.public.to_bytes()

    @property
    def params(self) -> HEParams:
        return self.public.params

    @property
    def key_id(self) -> bytes:
        return self.public.key_id

    def encrypt_symmetric(self, plain: seal.Plaintext) -> bytes:
        """Secret-key encryption, serialized in SEAL's seeded form (half the size)."""
        return _sealio.dump(self._encryptor.encrypt_symmetric(plain))

    def decrypt(self, ct: seal.Ciphertext, level: _rns.Level) -> np.ndarray:
        """NTT values [L, N] of the decryption. The result stays on the client."""
        plain = seal.Plaintext()
        self._decryptor.decrypt(ct, plain)
        return _sealio.plaintext_values(plain, level.shape)

    def __repr__(self) -> str:
        return f"ClientKeys(key_id={self.key_id.hex()}, N={self.params.poly_modulus_degree}, secret)"


def _log2(x: float) -> float:
    return math.log2(x) if x > 0 else float("-inf")
