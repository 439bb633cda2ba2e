"""A site's specialised track on top of a general version: it lowers the site's held-out
loss, its version record binds the general version it was trained on, a mismatched general
version or a swapped adapter is refused, export merges both tracks, and DP is never
silently dropped."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys

import pytest
import torch

from fedcpt.client.attest import site_salt
from fedcpt.client.site import policy_for, resolve_site, site_blocks
from fedcpt.client.site_track import (
    RECORD,
    DPRequired,
    SiteTrackError,
    TrackSettings,
    check_site_adapter,
    export_specialised,
    specialise,
)
from fedcpt.config import load_config
from fedcpt.core.durable import write_json
from fedcpt.core.model import AdaptedModel, attach_lora, byte_tokenizer, tiny_llama
from fedcpt.core.training import train_adapter
from fedcpt.exceptions import ConfigError, DataError
from fedcpt.privacy.attestation import merkle_root, unit_hashes
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.versions import (
    export_version,
    merged_version,
    run_config,
    version_digest,
)

FAST = TrackSettings(steps=30, lr=0.01)


@pytest.fixture(scope="module")
def run(tmp_path_factory, sites_config, make_text):
    """A run folder with two general versions of the smoke model (trained on other prose
    than the sites'), as a federation leaves them: manifest, adapters/round-NNN/."""
    cfg = load_config("smoke", config_file=sites_config)
    folder = RunFolder(tmp_path_factory.mktemp("site-track") / "run")
    write_json(folder.manifest, {"run_id": "run-general", "config": cfg.to_dict()})
    tokenizer = byte_tokenizer()
    lm = AdaptedModel(attach_lora(tiny_llama(len(tokenizer)), cfg.lora, cfg.seed), tokenizer,
                      torch.device("cpu"), None)
    from fedcpt.core.data import pack

    ids = tokenizer([make_text(20_000, seed=5)], add_special_tokens=False)["input_ids"]
    general = pack(ids, tokenizer.eos_token_id, cfg.data.block_size)
    for server_round in (1, 2):
        train_adapter(lm, general, cfg.train, lr=0.01, seed=server_round)
        lm.model.save_pretrained(str(folder.version(server_round)))
        write_json(folder.provenance(server_round), {"round": server_round})
    return folder.root


@pytest.fixture(scope="module")
def north(run, tmp_path_factory):
    """North's specialised adapter on round 1."""
    return specialise(run, 1, site="north", settings=FAST,
                      out=tmp_path_factory.mktemp("north-track"))


def test_specialising_lowers_the_sites_heldout_loss(run, north):
    loss = north.record["heldout_loss"]
    assert loss["specialised"] < loss["general"] - 0.05
    # the "general" number is the general track itself, measured on the site's held-out set
    cfg = run_config(run)
    site = resolve_site(cfg, {"partition-id": 0})
    blocks = site_blocks(site, cfg.model, cfg.data, policy_for(cfg, site, {"partition-id": 0}))
    merged = merged_version(run, 1).model
    with torch.no_grad():
        logits = merged(blocks.heldout).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), blocks.heldout[:, 1:],
                                                reduction="none")
    assert loss["general"] == pytest.approx(nll.mean(dim=1).mean().item(), abs=1e-5)
    assert loss["blocks"] == len(blocks.heldout)
    # the data fingerprint is the training units' Merkle root: held-out units never enter
    assert north.record["data"]["units_root"] == merkle_root(unit_hashes(blocks))
    assert north.record["data"]["units"] == blocks.units


def test_the_version_record_binds_the_general_version(run, north):
    record = json.loads((north.path / RECORD).read_text())
    assert north.path.name == "v001" and north.path.parent.name == "north"
    assert record["version"] == 1 and record["site"] == "north"
    assert record["general"]["round"] == 1 and record["general"]["run_id"] == "run-general"
    assert record["general"]["sha256"] == version_digest(run, 1) != version_digest(run, 2)
    assert record["settings"]["steps"] == 30 and record["settings"]["lr"] == 0.01
    assert dt.datetime.fromisoformat(record["created_at"]).tzinfo is not None
    assert record["privacy"]["trained_with_dp"] is False
    assert "WITHOUT differential privacy" in record["privacy"]["statement"]
    assert (north.path / "adapter_model.safetensors").is_file()


def test_each_specialisation_is_a_new_version(run, north):
    again = specialise(run, 2, site="north", settings=TrackSettings(steps=2),
                       out=north.path.parents[1])
    assert again.path.name == "v002" and again.record["general"]["round"] == 2
    assert json.loads((north.path / RECORD).read_text())["general"]["round"] == 1
    assert sorted(p.name for p in north.path.parent.iterdir() if not p.name.startswith(".")) \
        == ["v001", "v002"]


def test_export_serves_either_track_as_the_manual_merge(run, north, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, record = export_specialised(run, 1, north.path, tmp_path / "served")
    assert record["privacy"]["trained_with_dp"] is False
    served = AutoModelForCausalLM.from_pretrained(out)
    base = tiny_llama(len(byte_tokenizer()))
    general = PeftModel.from_pretrained(base, str(run / "adapters" / "round-001"))
    manual = PeftModel.from_pretrained(general.merge_and_unload(), str(north.path))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    general_only = AutoModelForCausalLM.from_pretrained(
        export_version(run, 1, tmp_path / "general"))
    reference = PeftModel.from_pretrained(tiny_llama(len(byte_tokenizer())),
                                          str(run / "adapters" / "round-001"))
    with torch.no_grad():
        logits = served(ids).logits
        torch.testing.assert_close(logits, manual(ids).logits, rtol=1e-4, atol=1e-4)
        general_logits = general_only(ids).logits
        torch.testing.assert_close(general_logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
        assert (logits - general_logits).abs().max() > 1e-3  # the site track counts


def test_a_site_adapter_on_another_general_version_is_refused(run, north, tmp_path):
    with pytest.raises(SiteTrackError, match=r"trained on general version round-001 .* but "
                                             r"round-002 .* specialise again"):
        export_specialised(run, 2, north.path, tmp_path / "served")
    assert not (tmp_path / "served").exists()


def test_a_general_version_replaced_under_the_same_round_is_refused(run, north, tmp_path):
    # the server republishes round 1 with other weights: the digest, not the round, binds
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.copy(copy / "adapters" / "round-002" / "adapter_model.safetensors",
                copy / "adapters" / "round-001" / "adapter_model.safetensors")
    with pytest.raises(SiteTrackError, match=r"round-001 of .* has sha256 .* does not fit"):
        check_site_adapter(copy, 1, north.path)


def test_a_swapped_site_adapter_is_refused(run, north, tmp_path):
    from safetensors.torch import load_file, save_file

    swapped = tmp_path / "swapped"
    shutil.copytree(north.path, swapped)
    weights = swapped / "adapter_model.safetensors"
    tensors = {k: v * 2 for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    with pytest.raises(SiteTrackError, match="changed after it was saved"):
        check_site_adapter(run, 1, swapped)


def _clinic(tmp_path, write_text, **keys):
    data = write_text("clinic/notes.txt", 40_000, seed=101)
    return {"site-name": "clinic", "data-path": str(data), "privacy-unit": "passage", **keys}


def test_a_site_that_requires_dp_is_refused_without_it(run, tmp_path, write_text):
    node = _clinic(tmp_path, write_text, **{"require-dp": "true"})
    with pytest.raises(DPRequired, match=r"site 'clinic' requires DP-SGD \(require-dp, "
                                         r"site node config\).*--dp-epsilon"):
        specialise(run, 1, node_config=node, settings=FAST, out=tmp_path / "track")
    assert not (tmp_path / "track").exists()


def test_dp_training_charges_the_sites_ledger_and_says_so(run, tmp_path, write_text):
    ledger_path = tmp_path / "ledgers" / "clinic.ledger.json"
    node = _clinic(tmp_path, write_text, **{"require-dp": "true",
                                            "ledger-path": str(ledger_path)})
    track = specialise(run, 1, node_config=node,
                       settings=TrackSettings(steps=8, lr=0.01, dp_epsilon=4.0))
    assert track.path == tmp_path / "ledgers" / "site-track" / "clinic" / "v001"
    privacy = track.record["privacy"]
    assert privacy["trained_with_dp"] is True and "DP-SGD" in privacy["statement"]
    ledger = PrivacyLedger.load(ledger_path)
    assert [(e.run, e.steps) for e in ledger.entries] == [(privacy["ledger_run"], 8)]
    assert privacy["ledger_run"].startswith("site-track/clinic/")
    assert 3.5 < ledger.epsilon() <= 4.0 + 1e-6
    assert privacy["epsilon_total"] == pytest.approx(ledger.epsilon())
    # a ledger: the leaves are salted exactly as the site's attestations salt them
    cfg = run_config(run)
    site = resolve_site(cfg, node)
    policy = policy_for(cfg, site, node)
    blocks = site_blocks(site, cfg.model, cfg.data, policy)
    assert track.record["data"]["salted"] is True
    assert track.record["data"]["units_root"] == merkle_root(unit_hashes(blocks,
                                                                          site_salt(policy)))
    # a second track cannot go above the budget or stay within a total already spent:
    # refused, nothing written
    before = ledger_path.read_bytes()
    with pytest.raises(SiteTrackError, match=r"--dp-epsilon 100 is above site 'clinic''s "
                                             r"budget ε = 8"):
        specialise(run, 1, node_config=node, settings=TrackSettings(dp_epsilon=100.0))
    with pytest.raises(SiteTrackError, match=r"--dp-epsilon 2 is not above the ε = 3\.\d+ "
                                             r"site 'clinic' has already spent"):
        specialise(run, 1, node_config=node,
                   settings=TrackSettings(steps=8, dp_epsilon=2.0))
    assert ledger_path.read_bytes() == before
    assert [p.name for p in track.path.parent.iterdir() if not p.name.startswith(".")] \
        == ["v001"]


@pytest.mark.parametrize("round_, kwargs, error, match", [
    (7, {"site": "north"}, ConfigError, r"no adapter version for round 7 .*\[1, 2\]"),
    (1, {"site": "nort"}, SiteTrackError, r"site 'nort' is not a site .*did you mean 'north'"),
    (1, {}, SiteTrackError, "either with --site .* or with --node-config"),
    (1, {"site": "north", "node_config": {"site-name": "north", "data-path": "x.txt"}},
     SiteTrackError, "either with --site .* or with --node-config"),
    (1, {"site": "north", "settings": TrackSettings(batch_size=0)}, SiteTrackError,
     r"--batch-size must be >= 1, got 0"),
    (1, {"site": "north", "settings": TrackSettings(dp_epsilon=0.0)}, SiteTrackError,
     r"--dp-epsilon must be > 0, got 0.0"),
    (1, {"site": "north", "settings": TrackSettings(steps=0)}, SiteTrackError,
     r"--steps must be >= 1, got 0"),
    (1, {"site": "north", "settings": TrackSettings(lr=-1.0)}, SiteTrackError,
     r"--lr must be > 0, got -1.0"),
    (1, {"node_config": {"site-name": "clinic", "data-path": "/nonexistent/notes.txt"}},
     DataError, "/nonexistent/notes.txt"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(run, tmp_path, round_, kwargs,
                                                         error, match):
    kwargs = {"settings": FAST, **kwargs}
    with pytest.raises(error, match=match):
        specialise(run, round_, out=tmp_path / "track", **kwargs)
    assert not (tmp_path / "track").exists()


def test_empty_site_data_is_a_clear_error(run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="contains no text"):
        specialise(run, 1, node_config={"site-name": "clinic", "data-path": str(empty)},
                   settings=FAST, out=tmp_path / "track")
    assert not (tmp_path / "track").exists()


def test_cli_prints_both_losses_and_the_privacy_statement(run, tmp_path):
    out = tmp_path / "track"
    proc = subprocess.run([sys.executable, "-m", "fedcpt.cli", "adapters", "specialise",
                           str(run), "1", "--site", "south", "--steps", "5", "--out",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"specialised adapter v001 at {out / 'south' / 'v001'}" in proc.stdout
    assert "held-out domain loss" in proc.stdout and "specialised" in proc.stdout
    assert "privacy: trained WITHOUT differential privacy" in proc.stdout
    served = subprocess.run([sys.executable, "-m", "fedcpt.cli", "adapters", "export",
                             str(run), "1", "--out", str(tmp_path / "served"),
                             "--site-adapter", str(out / "south" / "v001")],
                            capture_output=True, text=True)
    assert served.returncode == 0, served.stderr
    assert served.stdout.strip() == str(tmp_path / "served")
    assert "site adapter privacy: trained WITHOUT differential privacy" in served.stderr
    bad = subprocess.run([sys.executable, "-m", "fedcpt.cli", "adapters", "export", str(run),
                          "2", "--out", str(tmp_path / "refused"), "--site-adapter",
                          str(out / "south" / "v001")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: site adapter")
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
