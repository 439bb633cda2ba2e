"""Sites attest what they trained on; a hostile server can neither forge nor replay an
attestation. The attacks are run as the server would run them: it holds every reply and
writes version.json, but not the sites' keys, and the auditor trusts only the CA."""

from __future__ import annotations

import json

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message, RecordDict
from typer.testing import CliRunner

import fedcpt.client.app as client_app
from fedcpt.cli import cli
from fedcpt.client.attest import record_path
from fedcpt.config import load_config
from fedcpt.core import protocol as p
from fedcpt.core.adapters import arrays_digest
from fedcpt.core.data import TokenBlocks
from fedcpt.core.model import load_adapted_model
from fedcpt.deploy.certs import write_federation_certs
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.attestation import (
    _LABEL,
    Attestation,
    attest,
    merkle_root,
    unit_hashes,
    verify_attestation,
)
from fedcpt.privacy.secagg.identity import load_identity
from fedcpt.strategies.base import site_attestation
from fedcpt.testing.bad_inputs.proposals import _site_data
from fedcpt.testing.site_round import site_context, task_identity, train_message
from fedcpt.tools.attestations import FAILED, UNATTESTED, VERIFIED, load_cas, verify_version

RUN, OTHER_RUN = "run-a", "run-b"


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Certificates for two sites, clinic's training reply in round 1 of RUN (one real
    in-process train), and the global adapter it was sent."""
    tmp = tmp_path_factory.mktemp("attest")
    certs = write_federation_certs(tmp / "fed", ["127.0.0.1"], ["clinic", "lab"], days=2)
    key, cert = certs.signing["clinic"]
    identity = {"ca-cert": str(certs.ca_cert), "secagg-key": str(key), "secagg-cert": str(cert)}
    cfg = load_config("smoke")
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    context = site_context(str(_site_data(tmp)), tmp / "clinic.ledger.json", name="clinic",
                           unit="field:user_id", **identity, **{"require-dp": "false"})
    with task_identity():
        reply = client_app.train(train_message(cfg, RUN, 1, initial), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return certs, reply, initial, tmp, cfg, context


def _version(attestation, server_round=1, global_sha256="", site="clinic"):
    """A version.json as the server writes it (runfolder/provenance.py)."""
    return {"round": server_round, "run_id": RUN, "sites": [site],
            "global_sha256": global_sha256, "attestations": {site: attestation}}


def _verdict(federation, version, run_id=RUN):
    certs = federation[0]
    [verdict] = verify_version(version, load_cas(certs.ca_cert), run_id)
    return verdict


def test_an_honest_sites_attestation_verifies_and_is_recorded_at_the_site(federation):
    certs, reply, initial, tmp, _, _ = federation
    received = site_attestation(reply)  # what the server parses from the reply
    verdict = _verdict(federation, _version(received, global_sha256=arrays_digest(initial)))
    assert verdict.status == VERIFIED, verdict.detail
    body = Attestation.from_dict(received).fields()
    assert body["salted"] and "units" not in body and body["unit"] == "field:user_id"
    # the site's own record, beside its ledger, names what it attested
    [line] = [json.loads(x) for x in record_path(tmp / "clinic.ledger.json").read_text()
              .splitlines()]
    assert line == {"run_id": RUN, "round": 1, "units_root": body["units_root"],
                    "policy_sha256": body["policy_sha256"]}


def test_a_server_that_changes_the_fingerprint_is_caught(federation):
    _, reply, initial, *_ = federation
    received = site_attestation(reply)
    body = Attestation.from_dict(received).fields()
    body["units_root"] = "00" * 32  # claims the site trained on another unit set
    forged = {**received, "statement": json.dumps(body, sort_keys=True, separators=(",", ":"))}
    verdict = _verdict(federation, _version(forged, global_sha256=arrays_digest(initial)))
    assert verdict.status == FAILED and "did not make" in verdict.detail


def test_a_server_signing_with_its_own_key_is_caught(federation, tmp_path):
    certs, reply, initial, *_ = federation
    received = Attestation.from_dict(site_attestation(reply))
    digest = arrays_digest(initial)
    # 1) its own key under clinic's certificate
    own = Ed25519PrivateKey.generate().sign(_LABEL + received.statement.encode())
    verdict = _verdict(federation, _version({**received.to_dict(), "signature": own.hex()},
                                            global_sha256=digest))
    assert verdict.status == FAILED and "did not make" in verdict.detail
    # 2) a "clinic" certificate from a CA of its own
    rogue = write_federation_certs(tmp_path / "rogue", ["127.0.0.1"], ["clinic"], days=2)
    blocks = TokenBlocks(torch.ones(2, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long),
                         2, 1, torch.tensor([0, 1]), torch.tensor([0]))
    fake = attest(load_identity(rogue.ca_cert, *rogue.signing["clinic"]), blocks,
                  site="clinic", run_id=RUN, server_round=1, global_sha256=digest,
                  policy_record={})
    verdict = _verdict(federation, _version(fake.to_dict(), global_sha256=digest))
    assert verdict.status == FAILED and "the federation CA did not issue" in verdict.detail


def test_a_replayed_attestation_is_rejected(federation):
    certs, reply, initial, *_ = federation
    received = site_attestation(reply)
    digest = arrays_digest(initial)
    # round 1's attestation copied into round 2 (whose global adapter differs)
    verdict = _verdict(federation, _version(received, server_round=2, global_sha256="ab" * 32))
    assert verdict.status == FAILED and "round 1 (expected 2)" in verdict.detail
    # ... into round 2 with round 1's digest too: the round still differs
    assert _verdict(federation, _version(received, 2, digest)).status == FAILED
    # ... into another run's round 1
    verdict = _verdict(federation, _version(received, 1, digest), run_id=OTHER_RUN)
    assert verdict.status == FAILED and "run_id 'run-a'" in verdict.detail
    # ... or recorded as another site's (lab's) contribution
    verdict = _verdict(federation, _version(received, 1, digest, site="lab"))
    assert verdict.status == FAILED and "signed by site 'clinic'" in verdict.detail


def test_a_site_without_identity_is_unattested_never_faked(federation):
    _, _, initial, tmp, cfg, context = federation
    bare = Context(run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config={
        k: v for k, v in context.node_config.items()
        if k not in ("ca-cert", "secagg-key", "secagg-cert")})
    with task_identity():
        reply: Message = client_app.train(train_message(cfg, RUN, 2, initial), bare)
    assert p.ATTESTATION not in reply.content and site_attestation(reply) is None
    verdict = _verdict(federation, _version(UNATTESTED))
    assert verdict.status == UNATTESTED


def _blocks(train: list[list[int]], owners: list[int], heldout: list[list[int]]):
    return TokenBlocks(torch.tensor(train), torch.tensor(heldout), len(set(owners)), 1,
                       torch.tensor(owners), torch.zeros(len(heldout), dtype=torch.long))


def test_the_fingerprint_follows_the_training_units_only():
    base = _blocks([[1, 2], [3, 4], [5, 6]], [0, 0, 1], [[7, 8]])
    root = merkle_root(unit_hashes(base, "salt"))
    changed_train = _blocks([[1, 2], [3, 4], [5, 9]], [0, 0, 1], [[7, 8]])
    changed_heldout = _blocks([[1, 2], [3, 4], [5, 6]], [0, 0, 1], [[7, 9]])
    reordered = _blocks([[5, 6], [1, 2], [3, 4]], [0, 1, 1], [[7, 8]])
    assert merkle_root(unit_hashes(changed_train, "salt")) != root
    assert merkle_root(unit_hashes(changed_heldout, "salt")) == root
    assert merkle_root(unit_hashes(reordered, "salt")) == root  # a set, not a sequence
    assert merkle_root(unit_hashes(base, "other salt")) != root  # keyed by the site secret


def test_adapters_show_prints_each_sites_verdict_and_fails_on_a_forgery(federation, tmp_path):
    certs, reply, initial, *_ = federation
    received = site_attestation(reply)
    run = tmp_path / "run"
    (run / "adapters" / "round-001").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"run_id": RUN}))
    (run / "adapters" / "round-001" / "adapter_model.safetensors").write_bytes(b"")
    version = run / "adapters" / "round-001" / "version.json"
    version.write_text(json.dumps(_version(received, global_sha256=arrays_digest(initial))))
    ca = ["--ca", str(certs.ca_cert)]
    shown = CliRunner().invoke(cli, ["adapters", "show", str(run), "1", *ca])
    assert shown.exit_code == 0 and "clinic: verified" in shown.output
    version.write_text(json.dumps(_version(received, 1, "cd" * 32)))  # another adapter
    shown = CliRunner().invoke(cli, ["adapters", "show", str(run), "1", *ca])
    assert shown.exit_code == 1 and "clinic: FAILED" in shown.output


def test_a_site_lists_the_versions_that_contain_its_data(federation, tmp_path):
    certs, reply, initial, tmp, *_ = federation
    received = site_attestation(reply)
    run = tmp_path / "run"
    (run / "manifest.json").parent.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"run_id": RUN}))
    for server_round, attestation in ((1, received), (2, UNATTESTED)):
        folder = run / "adapters" / f"round-{server_round:03d}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"")
        (folder / "version.json").write_text(json.dumps(_version(
            attestation, server_round, arrays_digest(initial))))
    record = record_path(tmp / "clinic.ledger.json")
    shown = CliRunner().invoke(cli, ["adapters", "contains", str(run), "--record", str(record),
                                     "--ca", str(certs.ca_cert)])
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines() == ["round-001: clinic"]


def test_verify_attestation_rejects_a_statement_that_is_not_hex():
    with pytest.raises(UpdateRejected, match="not hex"):
        verify_attestation(Attestation("{}", "zz", "zz"), b"", site="s", run_id=RUN,
                           server_round=1, global_sha256="")
