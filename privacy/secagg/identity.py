"""Long-term site identities that authenticate SecAgg keys and survivor sets.

A site signs its round keys and, before revealing any share, the survivor set, with an
Ed25519 key whose certificate the federation CA issued (``fedcpt certs``). Every site
verifies each neighbour's certificate against the CA certificate it holds itself (its
trust anchor, never one the server sends), so a server cannot substitute its own keys.

Why a CA-issued signing certificate rather than the SuperNode authentication key: the
sites already hold ``ca.crt``; the SuperNode public keys are registered with the
SuperLink, i.e. they are in the server's hands, and every site would otherwise need every
other site's key out of band; and Flower signs its own requests with that key, so reusing
it here would mix two protocols on one key. A dedicated extended key usage
(:data:`SECAGG_SIGNING`) keeps other certificates of the same CA — the SuperLink's TLS
certificate, whose key the server holds — from passing as a site.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from fedcpt.exceptions import ConfigError, UpdateRejected

# Extended key usage of a site's SecAgg signing certificate: an OID under 2.25 (a UUID
# arc, ITU-T X.667), which needs no registration.
SECAGG_SIGNING = x509.ObjectIdentifier("2.25.247934529370613446339154744016823542917")

# node_config keys of a deployed site (paths to PEM files)
CA_CERT_KEY, SIGNING_KEY_KEY, SIGNING_CERT_KEY = ("ca-cert", "secagg-key", "secagg-cert")
# In simulation, the runner provisions a CA and per-site identities in this folder.
SIMULATION_IDENTITIES_ENV = "FEDCPT_SECAGG_IDENTITIES"


def signing_key_file(folder: Path, site: str) -> Path:
    return folder / f"{site}.secagg.key"


def signing_cert_file(folder: Path, site: str) -> Path:
    return folder / f"{site}.secagg.crt"


@dataclass(frozen=True)
class SiteIdentity:
    """A site's signing key, its certificate, and the CA certificate it trusts."""

    key: Ed25519PrivateKey
    cert_der: bytes
    ca: x509.Certificate

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    @property
    def name(self) -> str:
        return _verified_subject(self.ca.public_bytes(serialization.Encoding.DER),
                                 self.cert_der)[0]


def load_identity(ca_cert: Path, key: Path, cert: Path) -> SiteIdentity:
    """Load a site identity from PEM files; ConfigError names any that is unusable."""
    try:
        ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        own = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"cannot load the SecAgg site identity ({ca_cert}, {key}, {cert}): "
                          f"{err}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"{key} is not an Ed25519 private key (use the `<site>.secagg.key` "
                          "file `fedcpt certs` wrote)")
    identity = SiteIdentity(private, own.public_bytes(serialization.Encoding.DER), ca)
    try:
        _, public = _verified_subject(ca.public_bytes(serialization.Encoding.DER),
                                      identity.cert_der)
    except UpdateRejected as err:
        raise ConfigError(f"{cert}: {err}") from None
    if public != private.public_key().public_bytes_raw():
        raise ConfigError(f"{cert} does not certify the key in {key}")
    return identity


@functools.lru_cache(maxsize=16)
def _cached_identity(ca_cert: str, key: str, cert: str) -> SiteIdentity:
    return load_identity(Path(ca_cert), Path(key), Path(cert))


def simulated_site_stem(partition: int) -> str:
    """File stem of simulated node ``partition``'s identity (its certificate names the
    site)."""
    return f"partition-{partition}"


def identity_for(node_config: dict) -> SiteIdentity:
    """This site's identity: the ``ca-cert``, ``secagg-key`` and ``secagg-cert`` node
    config of a deployed site, or the files the simulation runner provisioned."""
    keys = (CA_CERT_KEY, SIGNING_KEY_KEY, SIGNING_CERT_KEY)
    if any(k in node_config for k in keys):
        missing = [k for k in keys if k not in node_config]
        if missing:
            raise ConfigError(f"secure aggregation needs node config {missing} as well")
        return _cached_identity(*(str(node_config[k]) for k in keys))
    folder = os.environ.get(SIMULATION_IDENTITIES_ENV)
    if "partition-id" in node_config and folder:
        base, stem = Path(folder), simulated_site_stem(int(node_config["partition-id"]))
        return _cached_identity(str(base / "ca.crt"), str(signing_key_file(base, stem)),
                                str(signing_cert_file(base, stem)))
    raise ConfigError("secure aggregation needs this site's signing identity: set "
                      f"`{CA_CERT_KEY}`, `{SIGNING_KEY_KEY}` and `{SIGNING_CERT_KEY}` in "
                      "--node-config (files from `fedcpt certs`)")


def _verified_subject(ca_der: bytes, cert_der: bytes) -> tuple[str, bytes]:
    """(site name, raw Ed25519 public key) of a certificate the CA issued for SecAgg
    signing and valid now; UpdateRejected otherwise. The validity period is checked at
    every call: a certificate that expires (or is not yet valid) while a site process runs
    is refused from that moment, whatever was verified before."""
    name, public, not_before, not_after = _issued_subject(ca_der, cert_der)
    now = dt.datetime.now(dt.UTC)
    if not not_before <= now <= not_after:
        raise UpdateRejected("a site certificate outside its validity period")
    return name, public


@functools.lru_cache(maxsize=1024)
def _issued_subject(ca_der: bytes, cert_der: bytes,
                    ) -> tuple[str, bytes, dt.datetime, dt.datetime]:
    """(site name, raw Ed25519 public key, valid from, valid until) of a certificate the
    CA issued for SecAgg signing; UpdateRejected otherwise. Cached: a round checks each
    certificate often, and nothing here depends on the time."""
    try:
        ca = x509.load_der_x509_certificate(ca_der)
        cert = x509.load_der_x509_certificate(cert_der)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise UpdateRejected(f"a site certificate the federation CA did not issue: "
                             f"{err or type(err).__name__}") from None
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise UpdateRejected("a certificate that is not a SecAgg site certificate") from None
    if SECAGG_SIGNING not in usage or basic.ca:
        raise UpdateRejected("a certificate that is not a SecAgg site certificate")
    public = cert.public_key()
    if not isinstance(public, Ed25519PublicKey):
        raise UpdateRejected("a SecAgg site certificate without an Ed25519 key")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise UpdateRejected("a SecAgg site certificate without one site name")
    return (str(names[0].value), public.public_bytes_raw(), cert.not_valid_before_utc,
            cert.not_valid_after_utc)


def verify_signed(identity: SiteIdentity, cert_der: bytes, message: bytes,
                  signature: bytes) -> str:
    """The site name of ``cert_der`` if it is a SecAgg certificate of this site's CA and
    ``signature`` is its signature over ``message``; UpdateRejected otherwise."""
    return verify_with_ca(identity.ca.public_bytes(serialization.Encoding.DER), cert_der,
                          message, signature)


def verify_with_ca(ca_der: bytes, cert_der: bytes, message: bytes, signature: bytes) -> str:
    """:func:`verify_signed` against a CA certificate (DER) held outside any site identity,
    e.g. by an auditor checking attestations; UpdateRejected if anything fails."""
    name, public = _verified_subject(bytes(ca_der), bytes(cert_der))
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(bytes(signature), message)
    except (InvalidSignature, TypeError, ValueError):
        raise UpdateRejected(f"a signature that site {name!r}'s key did not make") from None
    return name
