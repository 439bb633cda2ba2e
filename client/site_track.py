"""A site's specialised track: a fresh LoRA trained at the site on top of one general-track
version, kept and versioned at the site, never sent to the server.

``fedcpt adapters specialise RUN ROUND --site NAME`` (a simulated site of the run) or
``--node-config TEXT`` (a deployed site: the text it gives its SuperNode). It sits in the
``adapters`` group, not ``site``, because like every command there it acts on one version
of a run (``RUN/adapters/round-NNN/`` and the run's manifest, which fix the model, LoRA and
data settings); the *site* is named exactly as in federation, so the data path, privacy
unit, held-out split and ledger come from the site's own configuration through the
ClientApp's own code (:func:`~fedcpt.client.site.resolve_site`,
:func:`~fedcpt.client.site.policy_for`, :func:`~fedcpt.client.site.site_blocks`): the track
trains on the site's training units only, and reports the held-out domain loss of the
general and the specialised track on the held-out units it never trained on.

Each adapter is published atomically as ``<root>/<site>/vNNN/`` (peft files plus
:data:`RECORD`), ``<root>`` being ``site-track/`` beside the site's ledger unless ``--out``
names another. The record binds the general version (round and the SHA-256 of its adapter
tensors, :func:`fedcpt.core.adapters.arrays_digest`), the settings, the data fingerprint
(the Merkle ``units_root`` over the training units an attestation commits to), the held-out
losses, whether DP-SGD trained it, and its creation time. :func:`check_site_adapter`
refuses a site adapter on top of a general version with another digest.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import json
import logging
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcpt.client.attest import site_salt
from fedcpt.client.site import open_ledger, policy_for, resolve_site, site_blocks
from fedcpt.config import RunConfig, TrainConfig
from fedcpt.core.adapters import adapter_state, arrays_digest, read_version, to_arrays
from fedcpt.core.data import TokenBlocks
from fedcpt.core.durable import publish_numbered, write_json
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.model import AdaptedModel, attach_lora, resolve_autocast, resolve_device
from fedcpt.core.training import train_adapter
from fedcpt.exceptions import ConfigError
from fedcpt.privacy.attestation import merkle_root, policy_digest, unit_hashes
from fedcpt.privacy.policy import RunTerms, SitePolicy
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.versions import (
    MergedVersion,
    merged_version,
    run_config,
    save_model,
    version_digest,
    version_dir,
)

log = logging.getLogger(__name__)

RECORD = "site-version.json"
RECORD_FORMAT = 1
TRACK_FOLDER = "site-track"
NO_DP = ("trained WITHOUT differential privacy: the adapter never leaves the site, but a "
         "model served with it can reproduce the site's training text; serve it only to "
         "those allowed to read that text")


class SiteTrackError(ConfigError):
    """A site-track input is invalid, or a site adapter does not fit a general version."""


class DPRequired(SiteTrackError):
    """The site's policy requires DP-SGD and the site track was asked to train without."""


@dataclass(frozen=True)
class TrackSettings:
    """How the specialised adapter is trained (``None``: the run's own value)."""

    steps: int = 50
    lr: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    dp_epsilon: float | None = None
    """Train with DP-SGD so that the site's ledger stays at or below this total ε."""

    def check(self) -> None:
        checks = (("--steps", self.steps, self.steps >= 1, ">= 1"),
                  ("--lr", self.lr, self.lr is None or self.lr > 0, "> 0"),
                  ("--batch-size", self.batch_size,
                   self.batch_size is None or self.batch_size >= 1, ">= 1"),
                  ("--dp-epsilon", self.dp_epsilon,
                   self.dp_epsilon is None or self.dp_epsilon > 0, "> 0"))
        for name, value, ok, expected in checks:
            if not ok:
                raise SiteTrackError(f"{name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class SiteTrack:
    """A published specialised adapter: its folder and version record."""

    path: Path
    record: dict[str, Any]

    def lines(self) -> list[str]:
        """What the command prints: the folder, the losses and the privacy statement."""
        r, loss = self.record, self.record["heldout_loss"]
        general = r["general"]
        return [f"site {r['site']}: specialised adapter v{r['version']:03d} at {self.path}",
                f"on general version round-{general['round']:03d} "
                f"(sha256 {general['sha256'][:16]}…) of run {general['run_id']}",
                f"held-out domain loss over {loss['blocks']} blocks, computed at the site "
                f"(not released): general {loss['general']:.4f}, specialised "
                f"{loss['specialised']:.4f} ({loss['specialised'] - loss['general']:+.4f})",
                f"privacy: {r['privacy']['statement']}"]


def specialise(run_dir: Path, server_round: int, *, site: str | None = None,
               node_config: dict | None = None, settings: TrackSettings = TrackSettings(),
               out: Path | None = None) -> SiteTrack:
    """Train, evaluate and publish one site's specialised adapter on version
    ``server_round`` of ``run_dir``. Every input is checked before anything is written."""
    settings.check()
    cfg = run_config(run_dir)
    general_dir = version_dir(run_dir, server_round)
    node = _node_config(cfg, site, node_config)
    site_cfg = resolve_site(cfg, node)
    policy = policy_for(cfg, site_cfg, node)
    if policy.require_dp and settings.dp_epsilon is None:
        raise DPRequired(f"site {policy.site!r} requires DP-SGD (require-dp, "
                         f"{policy.who('require_dp')}): train its site track with "
                         "--dp-epsilon E (charged to its ledger), or not at all")
    root = _track_root(out, policy)
    blocks = site_blocks(site_cfg, cfg.model, cfg.data, policy)
    train = dataclasses.replace(cfg.train, local_steps=settings.steps,
                                batch_size=settings.batch_size or cfg.train.batch_size)
    lr = settings.lr or cfg.train.lr
    seed = cfg.seed if settings.seed is None else settings.seed
    merged = merged_version(run_dir, server_round)
    general = {"run_id": _run_id(run_dir), "round": server_round, "sha256": merged.sha256,
               "path": str(general_dir)}
    lm = _specialisable(merged, seed)
    before = evaluate_blocks(lm, blocks.heldout, cfg.train.eval_batch_size).loss
    if settings.dp_epsilon is None:
        train_adapter(lm, blocks.train, train, lr=lr,
                      seed=zlib.crc32(f"{seed}/{policy.site}/site-track".encode()))
        privacy = {"trained_with_dp": False, "statement": NO_DP}
    else:
        privacy = _train_private(cfg, lm, blocks, policy, train, lr, settings.dp_epsilon)
    after = evaluate_blocks(lm, blocks.heldout, cfg.train.eval_batch_size).loss
    record = {
        "format": RECORD_FORMAT, "site": policy.site,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "general": general, "model": cfg.model.name,
        "adapter_sha256": arrays_digest(to_arrays(adapter_state(lm.model))),
        "settings": {"steps": train.local_steps, "lr": lr, "batch_size": train.batch_size,
                     "seed": seed, "weight_decay": train.weight_decay,
                     "max_grad_norm": train.max_grad_norm,
                     "lora": dataclasses.asdict(cfg.lora), "block_size": cfg.data.block_size},
        "data": _fingerprint(blocks, policy),
        "heldout_loss": {"general": before, "specialised": after,
                         "blocks": len(blocks.heldout)},
        "privacy": privacy,
    }
    track = _publish(root / policy.site, lm, record)
    log.info("%s", " · ".join(track.lines()))
    return track


def _node_config(cfg: RunConfig, site: str | None, node_config: dict | None) -> dict:
    """A deployed site's node config as given, or a simulated site's partition."""
    if (site is None) == (node_config is None):
        raise SiteTrackError("name the site either with --site (a simulated site of the run) "
                             "or with --node-config (a deployed site's own node config)")
    if node_config is not None:
        return dict(node_config)
    names = [s.name for s in cfg.sites]
    if site not in names:
        close = difflib.get_close_matches(site, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SiteTrackError(f"site {site!r} is not a site of the run (sites: {names}){hint}")
    return {"partition-id": names.index(site)}


def _track_root(out: Path | None, policy: SitePolicy) -> Path:
    if out is not None:
        return Path(out)
    if not policy.ledger_path:
        raise SiteTrackError(f"site {policy.site!r} has no ledger location to keep its site "
                             "track beside: give --out FOLDER")
    return Path(policy.ledger_path).expanduser().parent / TRACK_FOLDER


def _run_id(run_dir: Path) -> str:
    return str(json.loads(RunFolder(run_dir).manifest.read_text()).get("run_id", ""))


def _specialisable(merged: MergedVersion, seed: int) -> AdaptedModel:
    """The general version merged into the base model, with a fresh LoRA on top (B = 0:
    before training it computes exactly the general track)."""
    cfg = merged.cfg.model
    device = resolve_device(cfg)
    merged.model.to(device)
    model = attach_lora(merged.model, merged.cfg.lora, seed)
    model.to(device)
    return AdaptedModel(model, merged.tokenizer, device, resolve_autocast(cfg, device))


def _fingerprint(blocks: TokenBlocks, policy: SitePolicy) -> dict[str, Any]:
    """The training units as an attestation commits to them (held-out units never enter)."""
    salt = site_salt(policy)
    return {"units_root": merkle_root(unit_hashes(blocks, salt)), "salted": bool(salt),
            "unit": blocks.unit, "units": blocks.units, "train_blocks": len(blocks.train),
            "heldout_units": blocks.heldout_unit_count,
            "heldout_blocks": len(blocks.heldout),
            "policy_sha256": policy_digest(policy.record())}


def _train_private(cfg: RunConfig, lm: AdaptedModel, blocks: TokenBlocks, policy: SitePolicy,
                   train: TrainConfig, lr: float, target: float) -> dict[str, Any]:
    """Unit-level DP-SGD with σ planned so that the site's ledger ends at ``target`` ε at
    most; the spend is recorded (durably, under the ledger's lock) before the adapter is
    written."""
    from fedcpt.privacy.dpsgd import train_adapter_dp
    from fedcpt.privacy.plan import plan_site

    terms = RunTerms(delta=policy.delta_for(blocks.units), epsilon_budget=policy.epsilon_budget)
    with open_ledger(cfg, policy, terms).locked() as ledger:
        if target > ledger.target_epsilon:
            raise SiteTrackError(f"--dp-epsilon {target:g} is above site {policy.site!r}'s "
                                 f"budget ε = {ledger.target_epsilon:g} ({ledger.path})")
        if ledger.epsilon_bound() >= target:
            raise SiteTrackError(f"--dp-epsilon {target:g} is not above the ε = "
                                 f"{ledger.epsilon_bound():.3f} site {policy.site!r} has "
                                 f"already spent ({ledger.path}; its public bound under "
                                 "public-units): the total after this training must be "
                                 "larger")
        # σ is always planned for the target here, never a run's fixed noise multiplier
        privacy = dataclasses.replace(cfg.privacy, noise_multiplier=0.0)
        plan = plan_site(privacy, site=policy.site, records=blocks.units,
                         batch_size=train.batch_size, steps=train.local_steps,
                         delta=ledger.delta, prior=ledger.decision_history,
                         target_epsilon=target, public_units=policy.public_units)
        public = plan.ledger_public_rate
        ledger.check_budget(plan.noise_multiplier, plan.sample_rate, train.local_steps,
                            public_sample_rate=public, action="train its site track",
                            spend=f"{train.local_steps} DP-SGD steps")
        result = train_adapter_dp(lm, blocks.train, train, cfg.privacy, lr=lr,
                                  noise_multiplier=plan.noise_multiplier,
                                  sample_rate=plan.sample_rate, units=blocks.train_units)
        ledger_run = f"{TRACK_FOLDER}/{policy.site}/{uuid.uuid4().hex[:12]}"
        ledger.policy = policy.record()
        ledger.record(ledger_run, 1, plan.noise_multiplier, plan.sample_rate, result.steps,
                      public_sample_rate=public)
        eps = ledger.epsilon()
    return {"trained_with_dp": True,
            "statement": f"trained with unit-level DP-SGD (unit: {policy.unit}); with it the "
                         f"site's ledger stands at ε = {eps:.3f} (δ = {ledger.delta:.3g}) "
                         "over everything the site has trained: a model served with this "
                         f"adapter reveals about any one {policy.unit} no more than that",
            "epsilon_total": eps, "delta": ledger.delta,
            "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
            "steps": result.steps, "ledger": str(ledger.path), "ledger_run": ledger_run}


def _publish(parent: Path, lm: AdaptedModel, record: dict[str, Any]) -> SiteTrack:
    def fill(folder: Path, number: int) -> None:
        record["version"] = number
        lm.model.save_pretrained(str(folder))
        write_json(folder / RECORD, record)

    return SiteTrack(publish_numbered(parent, "v", fill), record)


def read_record(path: Path) -> dict[str, Any]:
    """A site adapter's version record; SiteTrackError if absent or damaged."""
    file = Path(path) / RECORD
    if not file.is_file():
        raise SiteTrackError(f"{path} is not a site-track adapter (no {RECORD})")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
        general = record["general"]
        str(general["sha256"]), int(general["round"]), str(record["adapter_sha256"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise SiteTrackError(f"{file} is not a site-track version record: {err!r}") from None
    return record


def check_site_adapter(run_dir: Path, server_round: int, path: Path,
                       general_sha256: str | None = None) -> dict[str, Any]:
    """The record of the site adapter at ``path`` if it was trained on exactly version
    ``server_round`` of ``run_dir`` (same SHA-256; ``general_sha256``: the digest of the
    version as already loaded) and its weights are the ones recorded; SiteTrackError
    naming both digests otherwise."""
    record = read_record(path)
    general = record["general"]
    actual = general_sha256 or version_digest(run_dir, server_round)
    if actual != general["sha256"]:
        raise SiteTrackError(
            f"site adapter {path} was trained on general version round-{general['round']:03d}"
            f" (sha256 {general['sha256'][:16]}…) of run {general.get('run_id', '?')}, but "
            f"round-{server_round:03d} of {run_dir} has sha256 {actual[:16]}…: it does not "
            "fit this version; specialise again on it")
    weights = arrays_digest(read_version(path))
    if weights != record["adapter_sha256"]:
        raise SiteTrackError(f"site adapter {path}: its weights (sha256 {weights[:16]}…) are "
                             f"not the ones its {RECORD} names "
                             f"({record['adapter_sha256'][:16]}…); it was changed after it "
                             "was saved")
    return record


def export_specialised(run_dir: Path, server_round: int, site_adapter: Path, out: Path,
                       ) -> tuple[Path, dict[str, Any]]:
    """The base model with the general version and the site adapter both merged in, saved
    for serving; and the site adapter's record (its privacy statement goes with it)."""
    from peft import PeftModel

    read_record(site_adapter)  # not a site adapter: say so before loading any model
    merged = merged_version(run_dir, server_round)
    record = check_site_adapter(run_dir, server_round, site_adapter, merged.sha256)
    model = PeftModel.from_pretrained(merged.model, str(site_adapter)).merge_and_unload()
    save_model(model, merged.tokenizer, out)
    log.info("exported round %d of %s with site adapter %s to %s", server_round, run_dir,
             site_adapter, out)
    return out, record
