"""Bad certificates and a deployed site's settings (``fedcpt certs``, ``fedcpt site
check``): site names and addresses a certificate cannot carry, roots that are not a CA or
have expired, a neighbour's SecAgg certificate that expired after the site process verified
it (issue 25, attack 7c: validity is checked at every use), a key in the wrong format, and
a SuperNode's mistyped ``--node-config``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

from cryptography.hazmat.primitives.serialization import Encoding

from fedcpt.deploy.certs import (
    FederationFiles,
    make_ca,
    make_site_signing_cert,
    site_names,
    write_federation_certs,
)
from fedcpt.deploy.site_check import check_auth_key, check_node_config, check_root_certificates
from fedcpt.privacy.secagg import identity
from fedcpt.privacy.secagg.identity import verify_with_ca
from fedcpt.testing.bad_inputs.judge import BadInput


def _certs(folder: Path) -> FederationFiles:
    return write_federation_certs(folder / "certs", ["127.0.0.1"], ["clinic"], days=30)


def _root_check(pick: Callable[[Path], Path], years_ahead: int = 0,
                ) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        _certs(folder)
        now = dt.datetime.now(dt.UTC) + dt.timedelta(days=365 * years_ahead)
        return check_root_certificates(pick(folder / "certs"), now=now)
    return attempt


def _not_pem(certs: Path) -> Path:
    (certs / "garbage.crt").write_text("this is not a certificate")
    return certs / "garbage.crt"


def _auth_key(folder: Path) -> object:
    _certs(folder)
    return check_auth_key(folder / "certs" / "ca.key")  # a PEM key, not an OpenSSH one


def _site_names(text: str) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        return site_names(text)
    return attempt


def _write_certs(addresses: list[str], days: int = 30, twice: bool = False,
                 ) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        for _ in range(2 if twice else 1):
            files = write_federation_certs(folder / "certs", addresses, ["clinic"], days=days)
        return files
    return attempt


def _neighbour_expired(folder: Path) -> object:
    """A site process verifies a neighbour's signed keys while its certificate is valid;
    the server replays them after it expired (the site's clock two days on)."""
    ca_key, ca_cert = make_ca(days=30)
    key, cert = make_site_signing_cert(ca_key, ca_cert, "neighbour", days=1)
    ca_der, cert_der = ca_cert.public_bytes(Encoding.DER), cert.public_bytes(Encoding.DER)
    message = b"the neighbour's public keys for round 1"
    verify_with_ca(ca_der, cert_der, message, key.sign(message))  # valid: verified, cached

    class Later(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime.now(tz) + dt.timedelta(days=2)

    with mock.patch.object(identity, "dt", SimpleNamespace(datetime=Later, UTC=dt.UTC)):
        return verify_with_ca(ca_der, cert_der, message, key.sign(message))


def _node_config(node_config: dict) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        return check_node_config(node_config)
    return attempt


CERTIFICATE = [
    BadInput("cert-site-count-out-of-range", "certificate", _site_names("0"),
             r"--sites must be between 1 and 1000"),
    BadInput("cert-bad-site-name", "certificate", _site_names("north,../etc"),
             r"site names may use letters"),
    BadInput("cert-duplicate-site-names", "certificate", _site_names("north,north"),
             r"site names must be unique"),
    BadInput("cert-bad-superlink-address", "certificate", _write_certs(["not a host!"]),
             r"'not a host!' is neither an IP address nor a DNS name"),
    BadInput("cert-zero-days", "certificate", _write_certs(["127.0.0.1"], days=0),
             r"--days must be at least 1"),
    BadInput("cert-overwrite", "certificate", _write_certs(["127.0.0.1"], twice=True),
             r"refusing to overwrite .* \(use --force\)"),
    BadInput("cert-root-not-pem", "certificate", _root_check(_not_pem),
             r"is not a PEM certificate"),
    BadInput("cert-root-is-server-cert", "certificate",
             _root_check(lambda certs: certs / "superlink.crt"), r"is not a CA certificate"),
    BadInput("cert-root-expired", "certificate",
             _root_check(lambda certs: certs / "ca.crt", years_ahead=2), r"expired on"),
    BadInput("cert-neighbour-expired-after-it-was-verified", "certificate",
             _neighbour_expired, r"a site certificate outside its validity period",
             attack="7c"),
    BadInput("cert-auth-key-not-openssh", "certificate", _auth_key,
             r"is not an unencrypted OpenSSH private key.*PEM key"),
    BadInput("site-node-config-unknown-key", "certificate",
             _node_config({"site-nam": "clinic", "data-path": "/data"}),
             r"unknown node-config key\(s\) \['site-nam'\] \(did you mean `site-name`\?\)"),
    BadInput("site-node-config-bad-budget", "certificate",
             _node_config({"site-name": "clinic", "data-path": "/data", "epsilon-budget": -1}),
             r"`epsilon-budget` must be a positive number"),
]
