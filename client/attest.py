"""A site's signed attestation of what it trained on (:mod:`fedcpt.privacy.attestation`),
sent with every training reply when the site has a signing identity, and recorded beside
its ledger so that the site can later find the versions that contain its data."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import ConfigRecord

from fedcpt.client.request import SiteRequest
from fedcpt.core import protocol as p
from fedcpt.core.adapters import arrays_digest
from fedcpt.privacy.attestation import Attestation, attest, attestation_salt
from fedcpt.privacy.heldout import HeldoutSplit, split_path
from fedcpt.privacy.policy import SitePolicy
from fedcpt.privacy.secagg.identity import (
    CA_CERT_KEY,
    SIGNING_CERT_KEY,
    SIGNING_KEY_KEY,
    SIMULATION_IDENTITIES_ENV,
    identity_for,
)
from fedcpt.privacy.site_files import beside_ledger

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".attestations.jsonl"


def has_identity(node_config: dict) -> bool:
    """Whether this site has a signing identity configured (deployed or simulated)."""
    return (any(k in node_config for k in (CA_CERT_KEY, SIGNING_KEY_KEY, SIGNING_CERT_KEY))
            or ("partition-id" in node_config
                and bool(os.environ.get(SIMULATION_IDENTITIES_ENV))))


def attestation_record(request: SiteRequest) -> ConfigRecord | None:
    """The signed statement for this training reply, or None (logged) without an identity:
    the reply is then unattested, never given a made-up attestation. The blocks are the
    ones training used (:func:`site_blocks` is cached per process)."""
    site, node_config, policy = request.site, request.node_config, request.policy
    if not has_identity(node_config):
        log.info("site %s has no signing identity: its update is sent unattested", site.name)
        return None
    salt = site_salt(policy)
    msg = request.msg
    attestation = attest(identity_for(node_config), request.blocks(), site=site.name,
                         run_id=request.run_id, server_round=request.server_round,
                         global_sha256=arrays_digest(msg.content[p.ARRAYS]),
                         policy_record=policy.record(), salt=salt)
    if policy.ledger_path:
        _remember(Path(policy.ledger_path), attestation)
    return ConfigRecord(attestation.to_dict())


def site_salt(policy: SitePolicy) -> str:
    """The site's attestation salt ('' without a ledger location: unsalted leaves)."""
    if not policy.ledger_path:
        return ""
    split = HeldoutSplit.open(split_path(Path(policy.ledger_path)), policy.site, policy.unit)
    return attestation_salt(split.salt)


def record_path(ledger: Path) -> Path:
    """The site's own record of what it attested, beside its ledger."""
    return beside_ledger(ledger, RECORD_SUFFIX)


def _remember(ledger: Path, attestation: Attestation) -> None:
    """Append (run id, round, units root) to the site's record (one JSON line each; a round
    sent again appends its statement again, which reads back the same)."""
    body = attestation.fields()
    line = {k: body[k] for k in ("run_id", "round", "units_root", "policy_sha256")}
    path = record_path(ledger)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(line, sort_keys=True) + "\n")
