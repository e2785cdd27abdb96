"""``flower-split tls-certs`` / ``node-keys``: a CA, the SuperLink's certificate, SuperNode keys."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from flower_split.cli import main
from flower_split.runs.deploy_keys import make_node_keys, make_tls_certs


def test_the_server_certificate_is_signed_by_the_ca_for_the_named_hosts(tmp_path: Path) -> None:
    files = make_tls_certs(tmp_path, ["superlink.example.com", "203.0.113.10"])
    ca = x509.load_pem_x509_certificate(files["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(files["server.pem"].read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.com"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("203.0.113.10")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private in ("ca.key", "server.key"):
        assert stat.S_IMODE(files[private].stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_tls_certs(tmp_path)


def test_node_keys_are_p384_openssh_pairs_that_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    private, public = make_node_keys(tmp_path, ["tenant-0"])["tenant-0"]
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert try_load_public_key(public)  # what `flwr supernode register` does with the file
    with pytest.raises(ValueError, match="not a plain file name"):
        make_node_keys(tmp_path, ["../elsewhere"])


def test_the_cli_makes_them_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["tls-certs", "--out", str(tmp_path / "certs")]) == 0
    assert main(["node-keys", "--out", str(tmp_path / "keys"), "tenant-0", "dealer"]) == 0
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["dealer", "dealer.pub", "tenant-0", "tenant-0.pub"]
    assert main(["node-keys", "--out", str(tmp_path / "keys"), "tenant-0"]) == 2
    assert "exist already" in capsys.readouterr().err
