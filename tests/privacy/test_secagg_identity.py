"""Site signing identities from ``fedcpt certs``: loadable by a site, and refused when they
do not chain to the site's own CA or do not match."""

from __future__ import annotations

import datetime as dt
import stat
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from secagg_grid import Sites, keep_records

from fedcpt.client.app import app
from fedcpt.core import protocol as p
from fedcpt.deploy.certs import (
    make_site_signing_cert,
    provision_simulated_identities,
    write_federation_certs,
    write_site_signing_certs,
)
from fedcpt.deploy.site_check import check_node_config
from fedcpt.exceptions import ConfigError, UpdateRejected
from fedcpt.privacy.heldout import split_path
from fedcpt.privacy.secagg import participation
from fedcpt.privacy.secagg.identity import (
    SIMULATION_IDENTITIES_ENV,
    SiteIdentity,
    identity_for,
    load_identity,
    verify_signed,
)
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.server import SHARE_KEYS, STATE

A, B, C, D, E = NODES = (11, 22, 33, 44, 55)


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


def _deployed(sites: Sites, node: int, folder) -> Context:
    """``node`` as a deployed site: its signing identity in files under the federation's CA
    (as ``fedcpt certs`` writes them), a ledger location, and records beside that ledger
    from an earlier run (a held-out split, the secure sums it joined)."""
    ca_key, ca_cert = sites.ca
    certs = folder / "certs"
    stem = f"site-{node}"
    key, cert = write_site_signing_certs(certs, ca_key, ca_cert, {stem: stem}, days=1)[stem]
    (certs / "ca.crt").write_bytes(ca_cert.public_bytes(Encoding.PEM))
    sites.identities[node] = load_identity(certs / "ca.crt", key, cert)
    context = Context(run_id=1, node_id=node, state=RecordDict(), run_config={}, node_config={
        "site-name": stem, "data-path": str(folder / "data"), "ca-cert": str(certs / "ca.crt"),
        "secagg-key": str(key), "secagg-cert": str(cert)})
    keep_records(context, folder / f"{stem}.ledger.json", stem)
    sites.contexts[node] = context
    return context


@pytest.mark.usefixtures("flower_task")
def test_a_neighbours_certificate_is_refused_from_the_moment_it_expires(
        tmp_path, site_refusal, unchanged_site_files):
    """A hostile server replays, in a later round, the signed keys of a neighbour whose
    certificate has since expired, to a site process that verified that certificate while
    it was valid. The site must check validity at that use, not remember the old verdict
    (before: the whole check was cached, the date included, and it accepted). The victim
    is a deployed site answering through the real ClientApp: it refuses (its own check,
    in its log) and its records beside its ledger are byte for byte unchanged."""
    adapter = ArrayRecord({"w.lora_A.weight": Array(np.zeros((2, 8), dtype=np.float32))})
    params = SecAggParams(num_shares=5, threshold=3, clipping_range=1.0,
                          quantization_range=2**22, max_weight=8)
    sites = Sites(NODES, params, adapter, ConfigRecord({p.RUN_ID: "run-1",
                                                        p.SERVER_ROUND: 1}))
    victim = _deployed(sites, A, tmp_path)
    ledger = tmp_path / f"site-{A}.ledger.json"
    ca_key, ca_cert = sites.ca
    key, cert = make_site_signing_cert(ca_key, ca_cert, f"site-{B}", days=10 / 86400)
    sites.identities[B] = SiteIdentity(key, cert.public_bytes(Encoding.DER), ca_cert)

    def share_keys(keys: dict[int, ConfigRecord]) -> Message:  # stage 2 at A, via its app
        return app(Message(RecordDict({STATE: Sites.key_list(keys, NODES)}),
                           dst_node_id=A, message_type=SHARE_KEYS), victim)

    keys = {n: sites.setup(n) for n in NODES}
    reply = share_keys(keys)
    assert not reply.has_error() and "sealed" in reply.content[STATE]  # B verified, valid
    time.sleep(max(0.0, (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds())
               + 1.5)
    later = {n: sites.setup(n) for n in NODES if n != B} | {B: keys[B]}  # B's keys replayed
    with unchanged_site_files(ledger) as before:
        reply = share_keys(later)
    site_refusal(reply, rf"site site-{A} refused this {SHARE_KEYS} message: .*outside its "
                        "validity period")
    # what was compared: its records from the earlier run
    assert {participation.record_path(ledger).name, split_path(ledger).name} <= set(
        before[ledger])
    with pytest.raises(UpdateRejected, match="outside its validity period"):
        verify_signed(sites.identities[A], sites.identities[B].cert_der, b"m",
                      sites.identities[B].sign(b"m"))
