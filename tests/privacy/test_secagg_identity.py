"""Site signing identities from ``fedcpt certs``: loadable by a site, and refused when they
do not chain to the site's own CA or do not match."""

from __future__ import annotations

import stat

import pytest

from fedcpt.deploy.certs import provision_simulated_identities, write_federation_certs
from fedcpt.deploy.site_check import check_node_config
from fedcpt.exceptions import ConfigError
from fedcpt.privacy.secagg.identity import (
    SIMULATION_IDENTITIES_ENV,
    identity_for,
    load_identity,
    verify_signed,
)


@pytest.fixture
def certs(tmp_path):
    return write_federation_certs(tmp_path / "fed", ["127.0.0.1"], ["clinic", "lab"], days=2)


def test_fedcpt_certs_writes_a_signing_identity_per_site(certs):
    key, cert = certs.signing["clinic"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    clinic = load_identity(certs.ca_cert, key, cert)
    lab = load_identity(certs.ca_cert, *certs.signing["lab"])
    assert clinic.name == "clinic"
    # a neighbour checks the clinic's signature against its own copy of the CA
    assert verify_signed(lab, clinic.cert_der, b"keys", clinic.sign(b"keys")) == "clinic"
    node_config = {"site-name": "clinic", "data-path": "/d", "ca-cert": str(certs.ca_cert),
                   "secagg-key": str(key), "secagg-cert": str(cert)}
    assert "secure aggregation identity: clinic" in check_node_config(node_config)


def test_identities_that_do_not_fit_are_refused(certs, tmp_path):
    other = write_federation_certs(tmp_path / "other", ["127.0.0.1"], ["clinic"], days=2)
    with pytest.raises(ConfigError, match="the federation CA did not issue"):
        load_identity(certs.ca_cert, *other.signing["clinic"])
    with pytest.raises(ConfigError, match="does not certify the key"):
        load_identity(certs.ca_cert, certs.signing["lab"][0], certs.signing["clinic"][1])
    with pytest.raises(ConfigError, match="not an Ed25519 private key"):
        load_identity(certs.ca_cert, certs.server_key, certs.signing["clinic"][1])
    with pytest.raises(ConfigError, match=r"needs node config \['secagg-cert'\]"):
        identity_for({"ca-cert": str(certs.ca_cert), "secagg-key": "x"})
    with pytest.raises(ConfigError, match="signing identity"):
        identity_for({"site-name": "clinic"})


def test_simulated_sites_find_their_provisioned_identity(tmp_path, monkeypatch):
    provision_simulated_identities(tmp_path, ["north", "south", "east"])
    assert not list(tmp_path.glob("ca.key"))  # the throwaway CA's key is never written
    monkeypatch.setenv(SIMULATION_IDENTITIES_ENV, str(tmp_path))
    assert identity_for({"partition-id": 2}).name == "east"
