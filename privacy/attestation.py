"""What a site attests it trained on, signed with its site key, and the check of it.

With every training reply a site with a signing identity (:mod:`.secagg.identity`) sends a
*statement*: a Merkle root over the hashes of its **training** units (never the held-out
ones), a digest of the privacy policy in force, and the context it trained in (run id,
round, the SHA-256 of the global adapter it received, its name). It signs the statement
with its CA-certified key, so a server that changes any field, signs with a key of its own,
or copies a statement into another round or run is caught by anyone holding the CA
certificate (:func:`verify_attestation`).

Why a Merkle root and not a digest of the sorted hashes: both commit to the unit set
independently of order (the leaves are sorted), but a Merkle root (RFC 6962 hashing, with
leaf and node prefixes so a node cannot pass as a leaf) also lets the site later prove that
one unit was in the set by revealing that unit's leaf and a log-size path, without revealing
any other unit's hash. No well-kept Python library computes RFC 6962 roots over raw bytes
without a log service around it, hence the few lines below.

Each leaf is the SHA-256 of a unit's token blocks exactly as trained (after packing and any
cap, the site's ``train_share``), keyed with a secret site salt when the site keeps a ledger.
An unsalted root lets anyone holding a candidate unit set test whether it is exactly the
site's set, so it is NOT covered by ε; salted, the root reveals nothing without the salt,
which the site may reveal to an auditor of its choosing to prove what it attested.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from fedcpt.core.data import TokenBlocks
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.secagg.identity import SiteIdentity, verify_with_ca

VERSION = 2  # 2: no unit count (N is the site's: it shows only to whom the site reveals the salt)
# Signed bytes are prefixed, so an attestation signature can never pass as a SecAgg one.
_LABEL = b"fedcpt training attestation v1\x00"
_SALT_LABEL = "fedcpt attestation salt\x00"


def attestation_salt(heldout_salt: str) -> str:
    """The site's attestation salt, derived one-way from its held-out split's secret salt:
    revealing it to prove an attestation does not reveal which units are held out."""
    return hashlib.sha256((_SALT_LABEL + heldout_salt).encode("utf-8")).hexdigest()


def unit_hashes(blocks: TokenBlocks, salt: str = "") -> list[bytes]:
    """SHA-256 of each training unit's token blocks (int64, row-major), keyed with ``salt``;
    held-out blocks never enter."""
    if not len(blocks.train):
        return []
    prefix = salt.encode("utf-8") + b"\x00" + str(blocks.train.shape[1]).encode() + b"\x00"
    _, counts = torch.unique_consecutive(blocks.train_units, return_counts=True)
    return [hashlib.sha256(prefix + unit.contiguous().numpy().tobytes()).digest()
            for unit in torch.split(blocks.train, counts.tolist())]


def merkle_root(leaves: list[bytes]) -> str:
    """RFC 6962 Merkle tree hash over ``leaves`` sorted (order-independent), hex."""
    def tree(items: list[bytes]) -> bytes:
        if len(items) == 1:
            return hashlib.sha256(b"\x00" + items[0]).digest()
        split = 1 << ((len(items) - 1).bit_length() - 1)  # largest power of 2 < n
        return hashlib.sha256(b"\x01" + tree(items[:split]) + tree(items[split:])).digest()
    return (tree(sorted(leaves)) if leaves else hashlib.sha256(b"").digest()).hex()


def policy_digest(policy_record: dict[str, Any]) -> str:
    """SHA-256 of the site's policy in force (:meth:`SitePolicy.record`), canonical JSON."""
    return hashlib.sha256(json.dumps(policy_record, sort_keys=True, default=str)
                          .encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Attestation:
    """A signed statement as it travels and is recorded: the statement's canonical JSON,
    the Ed25519 signature and the site's DER certificate (both hex)."""

    statement: str
    signature: str
    certificate: str

    def fields(self) -> dict[str, Any]:
        try:
            body = json.loads(self.statement)
        except json.JSONDecodeError as err:
            raise UpdateRejected(f"an attestation statement that is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise UpdateRejected("an attestation statement that is not a JSON object")
        return body

    def to_dict(self) -> dict[str, str]:
        return {"statement": self.statement, "signature": self.signature,
                "certificate": self.certificate}

    @classmethod
    def from_dict(cls, raw: Any) -> Attestation:
        if not isinstance(raw, dict) or not all(
                isinstance(raw.get(k), str) for k in ("statement", "signature", "certificate")):
            raise UpdateRejected("an attestation needs string 'statement', 'signature' and "
                                 "'certificate'")
        return cls(raw["statement"], raw["signature"], raw["certificate"])


def attest(identity: SiteIdentity, blocks: TokenBlocks, *, site: str, run_id: str,
           server_round: int, global_sha256: str, policy_record: dict[str, Any],
           salt: str = "") -> Attestation:
    """The site's signed statement of what it trained on in this round."""
    statement = json.dumps({
        "version": VERSION, "site": site, "run_id": run_id, "round": int(server_round),
        "global_sha256": global_sha256, "units_root": merkle_root(unit_hashes(blocks, salt)),
        "unit": blocks.unit, "salted": bool(salt),
        "policy_sha256": policy_digest(policy_record)}, sort_keys=True, separators=(",", ":"))
    signature = identity.sign(_LABEL + statement.encode("utf-8"))
    return Attestation(statement, signature.hex(), identity.cert_der.hex())


def verify_attestation(attestation: Attestation, ca_der: bytes, *, site: str, run_id: str,
                       server_round: int, global_sha256: str) -> dict[str, Any]:
    """The statement's fields if ``site``'s CA-certified key signed it for exactly this run,
    round and received global adapter; UpdateRejected naming what fails otherwise."""
    try:
        signature, cert = bytes.fromhex(attestation.signature), bytes.fromhex(
            attestation.certificate)
    except ValueError:
        raise UpdateRejected("an attestation whose signature or certificate is not "
                             "hex") from None
    signer = verify_with_ca(ca_der, cert, _LABEL + attestation.statement.encode("utf-8"),
                            signature)
    body = attestation.fields()
    expected = {"site": site, "run_id": run_id, "round": server_round,
                "global_sha256": global_sha256}
    if signer != site:
        raise UpdateRejected(f"attestation for site {site!r} signed by site {signer!r}")
    wrong = [f"{k} {body.get(k)!r} (expected {v!r})" for k, v in expected.items()
             if body.get(k) != v]
    if wrong:
        raise UpdateRejected("attestation made for another context (a replay?): "
                             + ", ".join(wrong))
    return body
