"""Adapter versions in a run folder: list, inspect, export for serving, continue from one.

Every accepted global adapter is saved as ``adapters/round-NNN/`` (peft format) with a
``version.json`` naming its parent, the sites that trained it, their data file hashes,
the config hash and its metrics — never data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcpt.config import RunConfig, build
from fedcpt.exceptions import ConfigError
from fedcpt.runfolder.paths import RunFolder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def _run_folder(run_dir: Path) -> RunFolder:
    folder = RunFolder(run_dir)
    if not folder.adapters.is_dir():
        raise ConfigError(f"{run_dir} is not a fedcpt run folder (no adapters/)")
    return folder


def list_versions(run_dir: Path) -> list[dict[str, Any]]:
    """Every saved version's provenance, oldest first."""
    return [json.loads(p.read_text()) for p in
            sorted(_run_folder(run_dir).adapters.glob("round-*/version.json"))]


def version_dir(run_dir: Path, server_round: int) -> Path:
    """The folder of one version; ConfigError naming the versions that exist if absent."""
    folder = _run_folder(run_dir)
    path = folder.version(server_round).resolve()
    if not ((path / "adapter_model.safetensors").is_file()
            and folder.provenance(server_round).is_file()):
        existing = [v["round"] for v in list_versions(run_dir)]
        raise ConfigError(f"no adapter version for round {server_round} in {run_dir}; "
                          f"versions: {existing}")
    return path


def run_config(run_dir: Path) -> RunConfig:
    """The configuration a run was started with (from its manifest)."""
    manifest = RunFolder(run_dir).manifest
    if not manifest.is_file():
        raise ConfigError(f"{run_dir} has no manifest.json")
    try:
        raw = json.loads(manifest.read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{manifest} is not a fedcpt manifest: {err}") from None
    return build(RunConfig, raw, prefix="")


def resumable_config(run_dir: Path) -> RunConfig:
    """The configuration of an interrupted run; ConfigError if there is nothing to resume."""
    folder = RunFolder(run_dir)
    if folder.summary.exists():
        raise ConfigError(f"{run_dir} already finished (it has summary.json)")
    checkpoint = folder.checkpoint
    if not checkpoint.is_file():
        raise ConfigError(f"{run_dir} has no checkpoint.json: no round finished, start anew")
    try:
        int(json.loads(checkpoint.read_text())["last_round"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{checkpoint} is damaged ({err}); start the run anew") from None
    return run_config(run_dir)


def continue_from(run_dir: Path, server_round: int, rounds: int | None = None) -> RunConfig:
    """The run's configuration, starting from version ``server_round`` (a rollback)."""
    cfg = run_config(run_dir)
    federation = dataclasses.replace(
        cfg.federation, initial_adapter=str(version_dir(run_dir, server_round)),
        rounds=rounds or cfg.federation.rounds)
    # The manifest's config names the ledgers the run used, so DP spend keeps accumulating.
    return dataclasses.replace(cfg, federation=federation,
                               name=f"{cfg.name}-from-round-{server_round}")


def version_digest(run_dir: Path, server_round: int) -> str:
    """SHA-256 of one version's saved adapter tensors (fp32,
    :func:`fedcpt.core.adapters.arrays_digest`)."""
    from fedcpt.core.adapters import arrays_digest, read_version

    return arrays_digest(read_version(version_dir(run_dir, server_round)))


@dataclass(frozen=True)
class MergedVersion:
    """A run's base model with one version merged in (CPU), and that version's digest."""

    cfg: RunConfig
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    sha256: str
    """:func:`version_digest` of exactly the tensors merged in (read once)."""


def merged_version(run_dir: Path, server_round: int) -> MergedVersion:
    """The run's base model with version ``server_round`` merged in."""
    from peft import PeftModel

    from fedcpt.core.adapters import adapter_state, arrays_digest, to_arrays
    from fedcpt.core.model import load_base_model

    path = version_dir(run_dir, server_round)
    cfg = run_config(run_dir)
    base, tokenizer = load_base_model(cfg.model)
    adapted = PeftModel.from_pretrained(base, str(path))
    digest = arrays_digest(to_arrays(adapter_state(adapted)))
    return MergedVersion(cfg, adapted.merge_and_unload(), tokenizer, digest)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    """A standalone model folder for serving (``from_pretrained``)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export_version(run_dir: Path, server_round: int, out: Path) -> Path:
    """Merge a version into the base model and save a standalone model for serving."""
    merged = merged_version(run_dir, server_round)
    save_model(merged.model, merged.tokenizer, out)
    log.info("exported round %d of %s to %s", server_round, run_dir, out)
    return out
