"""Adapter versions of a real run: provenance, rollback-and-continue, export for serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fedcpt.config import load_config
from fedcpt.core.adapters import load_version
from fedcpt.exceptions import ConfigError
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.provenance import UNATTESTED
from fedcpt.runfolder.versions import continue_from, export_version, list_versions, version_dir
from fedcpt.simulations.runner import simulate
from fedcpt.tools.attestations import VERIFIED, verify_run_version

# the tests that read `run` get it from the shared smoke runs (tests/conftest.py:SMOKE_RUNS)
pytestmark = pytest.mark.smoke_run("regression-guard")


@pytest.fixture
def run(smoke_runs):
    """A finished smoke run with the regression guard on (a real simulation)."""
    return smoke_runs["regression-guard"].run_dir


@pytest.mark.slow  # a real simulation (shared)
def test_every_round_is_a_version_with_its_parent(run):
    versions = list_versions(run)
    assert [v["round"] for v in versions] == [0, 1, 2]
    assert versions[0]["parent"] == "fresh adapter"
    assert versions[2]["parent"] == "round-001"
    assert sorted(versions[1]["sites"]) == ["east", "north", "south"]
    assert set(versions[1]["data_files"]) == {"east", "north", "south"}
    assert versions[1]["server_steps"]["regression_guard"]["rejected"] is False
    # Simulated sites sign only when their engine gave them identities (a secure run shares
    # it in the slow tier); then every attestation verifies: never one nobody can check.
    if RunFolder(run).simulated_ca.is_file():
        assert [v.status for v in verify_run_version(run, 1)] == [VERIFIED] * 3
    else:
        assert versions[1]["attestations"] == dict.fromkeys(versions[1]["sites"], UNATTESTED)
    assert len(versions[1]["global_sha256"]) == 64


@pytest.mark.slow  # reads the shared smoke run: free there, a simulation here
def test_rollback_to_a_missing_version_is_a_clear_error(run):
    with pytest.raises(ConfigError, match=r"no adapter version for round 7 .*\[0, 1, 2\]"):
        version_dir(run, 7)


@pytest.mark.slow  # a real simulation of its own, continuing the shared one
def test_rollback_continues_from_the_chosen_version(run, tmp_path):
    cfg = continue_from(run, 1, rounds=1)
    assert cfg.federation.initial_adapter.endswith("round-001")
    simulate(cfg, tmp_path / "continued")
    reference = _reference(run)  # any adapter of the right shape
    start = load_version(tmp_path / "continued" / "adapters" / "round-000", reference)
    original = load_version(version_dir(run, 1), reference)
    for key in original.keys():
        np.testing.assert_array_equal(start[key].numpy(), original[key].numpy())
    assert [v["parent"] for v in list_versions(tmp_path / "continued")][0].endswith("round-001")


def _reference(run):
    from fedcpt.core.model import load_adapted_model

    cfg = load_config("smoke")
    return load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter


@pytest.mark.slow  # reads the shared smoke run: free there, a simulation here
def test_export_merges_the_adapter_into_a_standalone_model(run, tmp_path):
    from peft import PeftModel

    from fedcpt.core.model import byte_tokenizer, tiny_llama

    out = export_version(run, 2, tmp_path / "served")
    served = AutoModelForCausalLM.from_pretrained(out)
    reference = PeftModel.from_pretrained(tiny_llama(len(byte_tokenizer())),
                                          str(version_dir(run, 2)))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, reference(ids).logits, rtol=1e-4,
                                   atol=1e-4)
