"""Check the site attestations a version records, against the federation CA certificate.

The server writes ``version.json`` and may be hostile: every check here uses only what the
sites signed and a CA certificate the auditor holds (the federation's ``ca.crt``; for a
simulation, the throwaway CAs the runner wrote to ``simulated-ca.pem``). An attestation
passes only if a CA-certified key of the named site signed it for this version's run id,
round and global adapter digest (:func:`fedcpt.privacy.attestation.verify_attestation`);
the version's own ``run_id`` is checked against the run's manifest, so a statement copied
from another run or round fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedcpt.exceptions import ConfigError, UpdateRejected
from fedcpt.privacy.attestation import Attestation, verify_attestation
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.provenance import UNATTESTED, read_run_id
from fedcpt.runfolder.versions import version_dir

VERIFIED, FAILED = "verified", "FAILED"


@dataclass(frozen=True)
class SiteVerdict:
    site: str
    status: str
    """``verified``, ``FAILED`` or ``unattested``."""
    detail: str = ""

    def line(self) -> str:
        return f"{self.site}: {self.status}" + (f" ({self.detail})" if self.detail else "")


def load_cas(path: Path) -> list[bytes]:
    """DER of every certificate in a PEM file (one CA, or a bundle); ConfigError if none."""
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the CA certificate {path}: {err}") from None
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def default_ca(run_dir: Path) -> Path | None:
    """A simulation's CA bundle in its run folder, if it has one."""
    path = RunFolder(run_dir).simulated_ca
    return path if path.is_file() else None


def verify_version(version: dict[str, Any], cas: list[bytes],
                   run_id: str) -> list[SiteVerdict]:
    """A verdict per site that trained ``version`` (its ``version.json``): its attestation
    checked against each CA in ``cas``, for ``run_id`` (the manifest's)."""
    verdicts = []
    attestations = version.get("attestations") or {}
    for site in version.get("sites", []):
        raw = attestations.get(site, UNATTESTED)
        if raw == UNATTESTED:
            verdicts.append(SiteVerdict(site, UNATTESTED, "the site has no signing identity"))
            continue
        verdicts.append(_verdict(site, raw, cas, run_id, version))
    return verdicts


def _verdict(site: str, raw: Any, cas: list[bytes], run_id: str,
             version: dict[str, Any]) -> SiteVerdict:
    reasons = []
    for ca in cas:
        try:
            body = verify_attestation(Attestation.from_dict(raw), ca, site=site, run_id=run_id,
                                      server_round=int(version.get("round", -1)),
                                      global_sha256=str(version.get("global_sha256", "")))
        except UpdateRejected as err:
            reasons.append(str(err))
            continue
        return SiteVerdict(site, VERIFIED, f"units root {body['units_root'][:16]}…")
    return SiteVerdict(site, FAILED, "; ".join(dict.fromkeys(reasons)) or "no CA certificate")


def verify_run_version(run_dir: Path, server_round: int,
                       ca: Path | None = None) -> list[SiteVerdict]:
    """:func:`verify_version` on a stored version, against ``ca`` (else the simulation's
    CA bundle); ConfigError if it records an attestation and there is no CA to check it
    against."""
    version = json.loads((version_dir(run_dir, server_round) / "version.json").read_text())
    ca = ca or default_ca(run_dir)
    if ca is None:
        raise ConfigError(f"{run_dir} has no simulated-ca.pem: give the federation CA "
                          "certificate with --ca to verify the sites' attestations")
    return verify_version(version, load_cas(ca), read_run_id(RunFolder(run_dir)))


def versions_with_site_data(run_dir: Path, record: Path, ca: Path | None = None,
                            ) -> list[tuple[int, str]]:
    """(round, site) of every version of ``run_dir`` whose verified attestation matches a
    line of a site's own record (``<site>.attestations.jsonl``, :mod:`fedcpt.client.attest`)
    in run id, round and units root: the versions that contain that site's data."""
    try:
        mine = {(str(x["run_id"]), int(x["round"]), str(x["units_root"]))
                for x in map(json.loads, Path(record).read_text().splitlines()) if x}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{record} is not a site's attestation record: {err}") from None
    found: list[tuple[int, str]] = []
    for path in sorted(RunFolder(run_dir).adapters.glob("round-*/version.json")):
        version = json.loads(path.read_text())
        claimed = {site for site, raw in (version.get("attestations") or {}).items()
                   if raw != UNATTESTED and _matches(raw, mine)}
        if claimed:
            verdicts = verify_run_version(run_dir, int(version["round"]), ca)
            found += [(int(version["round"]), v.site) for v in verdicts
                      if v.site in claimed and v.status == VERIFIED]
    return found


def _matches(raw: Any, mine: set[tuple[str, int, str]]) -> bool:
    try:
        body = Attestation.from_dict(raw).fields()
    except UpdateRejected:
        return False
    return (body.get("run_id"), body.get("round"), body.get("units_root")) in mine
