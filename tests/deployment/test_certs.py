"""``fedcpt certs``: files Flower 1.42 loads, never overwritten, and clear errors."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from fedcpt.deploy.certs import site_names, write_federation_certs
from fedcpt.exceptions import ConfigError


def test_federation_files(tmp_path: Path) -> None:
    files = write_federation_certs(tmp_path / "certs", ["10.0.0.5:9092", "link.example.org"],
                                   ["clinic", "lab"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"),
                                                        ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["link.example.org", "localhost"]
    for path in (files.ca_key, files.server_key, *(k for k, _ in files.site_keys.values())):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert set(files.site_keys) == {"clinic", "lab"}
    for private_path, public_path in files.site_keys.values():
        # As flower-supernode --auth-supernode-private-key and flwr supernode register load them
        private = load_ssh_private_key(private_path.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert try_load_public_key(public_path) == public_key_to_bytes(private.public_key())


def test_never_overwrites_without_force(tmp_path: Path) -> None:
    first = write_federation_certs(tmp_path, ["127.0.0.1"], ["a"])
    ca_before = first.ca_cert.read_bytes()
    with pytest.raises(ConfigError, match=r"refusing to overwrite .*ca\.crt.*--force"):
        write_federation_certs(tmp_path, ["127.0.0.1"], ["a"])
    assert first.ca_cert.read_bytes() == ca_before
    write_federation_certs(tmp_path, ["127.0.0.1"], ["a"], force=True)
    assert first.ca_cert.read_bytes() != ca_before
    assert stat.S_IMODE(first.ca_key.stat().st_mode) == 0o600


def test_existing_site_key_alone_blocks_the_write(tmp_path: Path) -> None:
    (tmp_path / "lab.key").write_text("the site's real key")
    with pytest.raises(ConfigError, match="lab.key"):
        write_federation_certs(tmp_path, ["127.0.0.1"], ["lab"])
    assert (tmp_path / "lab.key").read_text() == "the site's real key"
    assert not (tmp_path / "ca.crt").exists()


@pytest.mark.parametrize("address", ["not an address!", "", "host:port:extra:"])
def test_bad_address_writes_nothing(tmp_path: Path, address: str) -> None:
    with pytest.raises(ConfigError, match="address"):
        write_federation_certs(tmp_path / "out", [address], ["a"])
    assert not (tmp_path / "out").exists()


def test_site_names() -> None:
    assert site_names("3") == ["site-1", "site-2", "site-3"]
    assert site_names("clinic, lab") == ["clinic", "lab"]
    for bad, match in [("0", "between 1 and 1000"), ("a,a", "unique"), ("lab,Lab", "unique"),
                       ("CA,lab", "overwrite the federation's own"),
                       ("superlink", "overwrite the federation's own"),
                       ("bad name", "letters, digits"), (" , ", "number or")]:
        with pytest.raises(ConfigError, match=match):
            site_names(bad)


def test_cli(tmp_path: Path) -> None:
    def certs(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedcpt.cli", "certs", *args],
                              capture_output=True, text=True, timeout=60)

    ok = certs(str(tmp_path), "--address", "127.0.0.1", "--sites", "clinic,lab")
    assert ok.returncode == 0, ok.stderr
    assert "clinic.key" in ok.stdout and "lab.pub" in ok.stdout
    again = certs(str(tmp_path), "--address", "127.0.0.1", "--sites", "clinic,lab")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().startswith("error: refusing to overwrite")
