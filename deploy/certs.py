"""What a federation needs to run with TLS and SuperNode authentication.

``write_federation_certs`` writes, with ``cryptography``:

- ``ca.key`` / ``ca.crt``: the federation's certificate authority (EC P-384, self-signed);
- ``superlink.key`` / ``superlink.crt``: the SuperLink's TLS certificate, signed by the CA,
  with a subject alternative name for every address sites use to reach it;
- ``<site>.key`` / ``<site>.pub``: one SuperNode authentication key pair per site, in the
  formats Flower 1.42 loads: an OpenSSH private key on an NIST curve (``flower-supernode
  --auth-supernode-private-key`` reads it with ``load_ssh_private_key``) and an OpenSSH
  public key (``flwr supernode register`` reads it with ``load_ssh_public_key``);
- ``<site>.secagg.key`` / ``<site>.secagg.crt``: one secure aggregation signing key per
  site (Ed25519) and its certificate from the CA, for the SecAgg extended key usage
  (:mod:`fedcpt.privacy.secagg.identity`): sites sign their round keys and survivor
  sets with it, and check each other's against ``ca.crt``.

Private keys are written with mode 0600; no file is ever overwritten unless ``force``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcpt.exceptions import ConfigError
from fedcpt.privacy.secagg.identity import (
    SECAGG_SIGNING,
    signing_cert_file,
    signing_key_file,
    simulated_site_stem,
)

CURVE = ec.SECP384R1()
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# The SuperLink launches its ServerApp runtime against its own address; a SuperLink bound
# to 0.0.0.0 is reached there on 127.0.0.1, so the certificate always names the loopback.
LOOPBACK = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class FederationFiles:
    """Paths of everything :func:`write_federation_certs` wrote."""

    ca_key: Path
    ca_cert: Path
    server_key: Path
    server_cert: Path
    site_keys: dict[str, tuple[Path, Path]]  # site -> (private key, public key)
    signing: dict[str, tuple[Path, Path]]  # site -> (SecAgg signing key, its certificate)


RESERVED = {"ca", "superlink"}  # file stems of the CA and SuperLink keys in the same folder


def site_names(sites: str) -> list[str]:
    """``"3"`` → ``site-1 … site-3``; ``"clinic,lab"`` → those names (validated)."""
    text = sites.strip()
    if text.isdigit():
        count = int(text)
        if not 1 <= count <= 1000:
            raise ConfigError(f"--sites must be between 1 and 1000; got {count}")
        return [f"site-{i}" for i in range(1, count + 1)]
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--sites needs a number or comma-separated site names")
    bad = [n for n in names if not SITE_NAME.match(n)]
    if bad:
        raise ConfigError(f"site names may use letters, digits, '.', '_' and '-' "
                          f"(at most 63 characters); got {bad}")
    if len({n.lower() for n in names}) != len(names):
        raise ConfigError(f"site names must be unique (ignoring case); got {names}")
    reserved = [n for n in names if n.lower() in RESERVED]
    if reserved:
        raise ConfigError(f"site names {reserved} would overwrite the federation's own "
                          f"{' and '.join(sorted(RESERVED))} files; choose other names")
    return names


def _general_name(address: str) -> x509.GeneralName:
    """An IP address or DNS name (a ``host:port`` address loses its port)."""
    host = address.strip()
    if host.startswith("[") and "]" in host:  # [::1]:9092
        host = host[1:host.index("]")]
    elif host.count(":") == 1:  # host:port
        host = host.rsplit(":", 1)[0]
    if not host:
        raise ConfigError(f"empty SuperLink address {address!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # not an IP address: a DNS name then
        ip = None
    if ip is not None:
        return x509.IPAddress(ip)
    if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
        raise ConfigError(f"SuperLink address {address!r} is neither an IP address nor a "
                          f"DNS name")
    return x509.DNSName(host)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcpt federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new CA key and its self-signed certificate, valid from now for ``days`` days."""
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedcpt federation CA"))
        .issuer_name(_name("fedcpt federation CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     addresses: list[str], days: int,
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server key and certificate for ``addresses`` (plus the loopback), signed by
    the CA."""
    if not addresses:
        raise ConfigError("the SuperLink certificate needs at least one --address")
    names: list[x509.GeneralName] = []
    for address in [*addresses, *LOOPBACK]:
        name = _general_name(address)
        if name not in names:
            names.append(name)
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(str(names[0].value)))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_signing_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                           site: str, days: int) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """A site's SecAgg signing key and its certificate (common name = the site), signed
    by the CA for the SecAgg extended key usage only."""
    key = Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(site))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([SECAGG_SIGNING]), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def write_site_signing_certs(out_dir: Path, ca_key: ec.EllipticCurvePrivateKey,
                             ca_cert: x509.Certificate, sites: dict[str, str],
                             days: int) -> dict[str, tuple[Path, Path]]:
    """Write ``<stem>.secagg.key`` / ``<stem>.secagg.crt`` for every ``stem: site name``."""
    made = {stem: make_site_signing_cert(ca_key, ca_cert, s, days) for stem, s in sites.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for site, (key, cert) in made.items():
        paths[site] = signing_key_file(out_dir, site), signing_cert_file(out_dir, site)
        _write(paths[site][0], key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), private=True)
        _write(paths[site][1], cert.public_bytes(serialization.Encoding.PEM), private=False)
    return paths


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ssh_key_pair(comment: str) -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: (OpenSSH private key, OpenSSH public key)."""
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``data``; a private key is created with mode 0600 (never readable by others,
    not even for a moment)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_federation_certs(out_dir: Path, addresses: list[str], sites: list[str],
                           days: int = 365, force: bool = False) -> FederationFiles:
    """Write a CA, the SuperLink's TLS certificate and one auth key pair per site."""
    if days < 1:
        raise ConfigError(f"--days must be at least 1; got {days}")
    files = FederationFiles(
        ca_key=out_dir / "ca.key", ca_cert=out_dir / "ca.crt",
        server_key=out_dir / "superlink.key", server_cert=out_dir / "superlink.crt",
        site_keys={s: (out_dir / f"{s}.key", out_dir / f"{s}.pub") for s in sites},
        signing={s: (signing_key_file(out_dir, s), signing_cert_file(out_dir, s))
                 for s in sites},
    )
    targets = [files.ca_key, files.ca_cert, files.server_key, files.server_cert,
               *(p for pair in files.site_keys.values() for p in pair),
               *(p for pair in files.signing.values() for p in pair)]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    # Build everything before writing anything: a bad address leaves no half-written set.
    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, addresses, days)
    pairs = {s: ssh_key_pair(f"fedcpt-{s}") for s in sites}
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(files.ca_key, pem_private_key(ca_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_key, pem_private_key(server_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM),
           private=False)
    for site, (private, public) in pairs.items():
        key_path, pub_path = files.site_keys[site]
        _write(key_path, private, private=True)
        _write(pub_path, public, private=False)
    write_site_signing_certs(out_dir, ca_key, ca_cert, {s: s for s in sites}, days)
    return files


def provision_simulated_identities(folder: Path, sites: list[str]) -> None:
    """A throwaway CA (``ca.crt``; its key is never written) and one SecAgg signing
    identity per simulated node, named by partition id, so that secure aggregation in
    ``fedcpt simulate`` runs with authenticated keys out of the box."""
    ca_key, ca_cert = make_ca(days=7)
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    write_site_signing_certs(folder, ca_key, ca_cert,
                             {simulated_site_stem(i): s for i, s in enumerate(sites)}, days=7)
