"""Where a run and each of its adapter versions came from: config, package versions, the
hashes of the data files read — never the data."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from typing import Any

from fedcpt.config import RunConfig
from fedcpt.core.builtin_sources import fingerprint, is_builtin
from fedcpt.core.data import expand_source
from fedcpt.core.durable import write_json
from fedcpt.exceptions import DataError
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.records import RoundRecord

UNATTESTED = "unattested"
PACKAGES = ("fedcpt", "torch", "transformers", "peft", "flwr", "opacus", "ray")


def data_hashes(sources: tuple[str, ...]) -> dict[str, str]:
    """SHA-256 of every file a list of sources reads (built-in sources are named as is)."""
    hashes: dict[str, str] = {}
    for spec in sources:
        if is_builtin(spec):
            hashes[spec] = fingerprint(spec)
            continue
        if spec.startswith("hf:"):
            hashes[spec] = "remote"
            continue
        try:
            paths = expand_source(spec)
        except DataError:  # a deployed site's data exists only at the site
            hashes[spec] = "not available to the server"
            continue
        for path in paths:
            hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_manifest(folder: RunFolder, cfg: RunConfig, run_id: str, started: float) -> None:
    """``manifest.json``: the run id, config, seed, package versions and data hashes."""
    data = {site.name: data_hashes(site.data) for site in cfg.sites}
    data["general"] = data_hashes(tuple(src for kind in cfg.data.general_kinds()
                                        for src in kind.sources))
    write_json(folder.manifest, {
        "run_id": run_id,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": package_versions(),
        "data_files": data,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
    })


def read_run_id(folder: RunFolder) -> str:
    return str(json.loads(folder.manifest.read_text())["run_id"])


def version_provenance(folder: RunFolder, cfg: RunConfig, run_id: str, record: RoundRecord,
                       global_sha256: str = "",
                       attestations: dict[str, dict[str, str] | None] | None = None,
                       ) -> dict[str, Any]:
    """``version.json`` of the round's adapter: parent, sites, their data, config hash, the
    digest of the global adapter the round trained from, and each site's attestation as it
    sent it ("unattested" when it sent none)."""
    manifest = json.loads(folder.manifest.read_text())
    initial = cfg.federation.initial_adapter or "fresh adapter"
    sites = record.sites_trained if record.aggregated else []
    return {
        "round": record.round,
        "parent": f"round-{record.round - 1:03d}" if record.round else initial,
        "run_id": run_id,
        "sites": sites,
        "data_files": {s: manifest["data_files"].get(s, {}) for s in sites},
        "config_sha256": hashlib.sha256(cfg.to_json().encode()).hexdigest(),
        "metrics": {"general_loss": record.general_loss, "domain_loss": record.domain_loss,
                    "domain_per_site": record.domain_per_site},
        "server_steps": record.server_steps,
        "global_sha256": global_sha256,
        "attestations": {s: (attestations or {}).get(s) or UNATTESTED for s in sites},
    }
