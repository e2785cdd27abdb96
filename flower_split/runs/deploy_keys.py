"""Key material of a deployment: the SuperLink's TLS certificates and the SuperNodes' auth keys.

``flower-split tls-certs --out DIR --host NAME [--host IP ...]`` makes a private CA
(``ca.crt``, ``ca.key``) and a server certificate for the SuperLink signed by it
(``server.pem``, ``server.key``) whose subject alternative names are the given host names
and IP addresses (``localhost`` and ``127.0.0.1`` by default). Flower takes them as
``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile
server.key``; SuperNodes and the ``flwr`` CLI verify the SuperLink with ``ca.crt``
(``--root-certificates``, ``root-certificates`` in the CLI's connection). Keep ``ca.key``
offline: whoever holds it can impersonate the SuperLink.

``flower-split node-keys --out DIR NAME ...`` makes one SuperNode authentication key pair
per name: ``NAME`` (the private key, OpenSSH format, 0600: ``flower-supernode
--auth-supernode-private-key``) and ``NAME.pub`` (``flwr supernode register NAME.pub``),
ECDSA on NIST P-384 as Flower requires (``ssh-keygen -t ecdsa -b 384 -N '' -f NAME`` makes
the same). Each tenant should make its own on its own machine and hand over only ``.pub``.

Everything with the ``cryptography`` package (a dependency already); private keys are
written 0600 and never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def make_tls_certs(out: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365) -> dict[str, Path]:
    """A CA and a SuperLink server certificate for ``hosts`` (DNS names or IP addresses) in ``out``."""
    if not hosts:
        raise ValueError("tls-certs: name at least one --host (the SuperLink's DNS name or IP address)")
    directory = _fresh_dir(out, ("ca.crt", "ca.key", "server.pem", "server.key"))
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flower-split SuperLink CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(x509.SubjectAlternativeName([_san(host) for host in hosts]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA384()))
    files = {"ca.crt": directory / "ca.crt", "ca.key": directory / "ca.key",
             "server.pem": directory / "server.pem", "server.key": directory / "server.key"}
    _write(files["ca.crt"], ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files["server.pem"], server.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files["ca.key"], _pem(ca_key), private=True)
    _write(files["server.key"], _pem(key), private=True)
    return files


def make_node_keys(out: str | Path, names: Sequence[str]) -> dict[str, tuple[Path, Path]]:
    """One P-384 SuperNode key pair per name in ``out``: ``{name: (NAME, NAME.pub)}``."""
    if not names:
        raise ValueError("node-keys: name at least one SuperNode")
    for name in names:
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"node-keys: {name!r} is not a plain file name")
    directory = _fresh_dir(out, [n for name in names for n in (name, f"{name}.pub")])
    pairs = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = directory / name, directory / f"{name}.pub"
        _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()), private=True)
        _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n", private=False)
        pairs[name] = (private, public)
    return pairs


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _fresh_dir(out: str | Path, names: Sequence[str]) -> Path:
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    existing = [name for name in names if (directory / name).exists()]
    if existing:
        raise FileExistsError(f"{directory}: {existing} exist already; refusing to overwrite key material")
    return directory


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def main_tls_certs(out: str, hosts: Sequence[str] | None) -> int:
    """``flower-split tls-certs``."""
    files = make_tls_certs(out, tuple(hosts) if hosts else DEFAULT_HOSTS)
    print(f"CA {files['ca.crt']} (key {files['ca.key']}: keep it offline); SuperLink certificate "
          f"{files['server.pem']} / {files['server.key']} for {', '.join(hosts or DEFAULT_HOSTS)}")
    return 0


def main_node_keys(out: str, names: Sequence[str]) -> int:
    """``flower-split node-keys``."""
    for name, (private, public) in make_node_keys(out, names).items():
        print(f"{name}: private {private} (0600, flower-supernode --auth-supernode-private-key), "
              f"public {public} (flwr supernode register)")
    return 0
