"""TLS for the direct channel: a throw-away server certificate, pinned by its SHA-256.

The cloud's direct channel (:mod:`flower_split.flower.direct_channel`) needs no PKI: the
ServerApp makes a fresh key and self-signed certificate per run and tells each tenant the
certificate's SHA-256 over Flower's own TLS and node-authenticated path; the tenant's worker
accepts that certificate and no other (:func:`connect_pinned`). TLS 1.3 only.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import socket
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class PinError(ConnectionError):
    """The peer's certificate is not the pinned one."""


def server_context() -> tuple[ssl.SSLContext, str]:
    """A TLS 1.3 server context with a fresh P-256 key and self-signed certificate, and the
    certificate's SHA-256 (hex) for clients to pin. The key never touches a shared disk: it is
    written to a private temporary directory only for as long as ``ssl`` loads it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flower-split direct channel")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory(prefix="fs-channel-") as tmp:  # created 0700
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.touch(mode=0o600)
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        context.load_cert_chain(cert_file, key_file)
    return context, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def connect_pinned(host: str, port: int, fingerprint: str, timeout: float) -> ssl.SSLSocket:
    """A TLS 1.3 connection to ``host:port`` whose certificate's SHA-256 is ``fingerprint``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the pin below is the check: no CA signs this certificate
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        conn = context.wrap_socket(raw, server_hostname=host)
    except Exception:
        raw.close()
        raise
    der = conn.getpeercert(binary_form=True) or b""
    if not hmac.compare_digest(hashlib.sha256(der).hexdigest(), fingerprint.lower()):
        conn.close()
        raise PinError(f"{host}:{port}: certificate does not match the pinned SHA-256 {fingerprint[:16]}...")
    return conn
