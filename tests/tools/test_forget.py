"""Withdrawing a site: the replacement version equals a run that never had the site."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from fedcpt.config import load_config
from fedcpt.core.adapters import load_version
from fedcpt.exceptions import ConfigError
from fedcpt.runfolder.versions import list_versions, version_dir
from fedcpt.simulations.runner import prepare, simulate_many
from fedcpt.tools.forget import CERTIFICATE, certificate_line, certify, plan_forget

pytestmark = pytest.mark.smoke_run("plain")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smoke_runs):
    """A smoke run of north, south, east (full participation, DP off; shared, see
    tests/conftest.py:SMOKE_RUNS), then on one engine start its replay without east and a
    run that never had east — same seed: ``(run, root, plan, cert)``, the two in ``root``."""
    root = tmp_path_factory.mktemp("forget")
    shared = smoke_runs["plain"]
    cfg = shared.cfg
    assert not cfg.privacy.enabled and not cfg.federation.sites_per_round
    plan = plan_forget(shared.run_dir, "east")
    never = dataclasses.replace(cfg, sites=tuple(s for s in cfg.sites if s.name != "east"))
    simulate_many([prepare(plan.config, root / "replay"), prepare(never, root / "never")])
    cert = certify(plan, root / "replay")
    return shared.run_dir, root, plan, cert


def _adapter(folder, server_round):
    from fedcpt.core.model import load_adapted_model

    cfg = load_config("smoke")
    reference = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    return load_version(version_dir(folder, server_round), reference)


@pytest.mark.slow  # three smoke simulations (one shared)
def test_replacement_equals_a_run_that_never_had_the_site(runs):
    run, root, plan, cert = runs
    assert plan.start == 0 and plan.affected == [1, 2]
    replaced, never = _adapter(root / "replay", 2), _adapter(root / "never", 2)
    original = _adapter(run, 2)
    for key in never.keys():
        np.testing.assert_allclose(replaced[key].numpy(), never[key].numpy(),
                                   rtol=1e-5, atol=1e-6)
    # The site did move the original: the comparison can tell the two apart.
    assert max(float(np.abs(original[k].numpy() - never[k].numpy()).max())
               for k in never.keys()) > 1e-4


@pytest.mark.slow  # three smoke simulations (one shared)
def test_certificate_names_versions_replacement_and_remaining_fingerprints(runs):
    _, root, _, cert = runs
    assert json.loads((root / "replay" / CERTIFICATE).read_text()) == cert
    assert cert["withdrawn_site"] == "east"
    assert cert["versions_affected"] == [1, 2] and cert["replayed_from"] == 0
    assert cert["replacement"]["round"] == 2 and cert["equals_never_joined"]
    assert set(cert["fingerprints_remaining"]) == {"north", "south"}
    assert cert["reused_updates"] == 0 and cert["privacy"] is None
    assert all("east" not in v["sites"] for v in list_versions(root / "replay"))
    line = certificate_line(cert)
    assert "east removed: versions 1–2" in line and "round 2" in line
    assert "Removal certificate" in (root / "replay" / "report.md").read_text()


@pytest.mark.slow  # three smoke simulations (one shared)
def test_forgetting_an_unknown_site_is_a_clear_error_and_changes_nothing(runs):
    run, _, _, _ = runs
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(ConfigError, match=r"site 'eats' is not in run .*did you mean 'east'"):
        plan_forget(run, "eats")
    assert sorted(p.name for p in run.rglob("*")) == before


def test_forgetting_from_a_run_without_versions_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="has no manifest.json"):
        plan_forget(tmp_path, "east")


@pytest.mark.slow  # three smoke simulations (one shared)
def test_cli_forget_unknown_site_exits_2_with_one_error_line(runs):
    run, _, _, _ = runs
    proc = subprocess.run([sys.executable, "-m", "fedcpt.cli", "adapters", "forget",
                           str(run), "west"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: site 'west' is not in run")
    assert not (run.parent / f"{run.name}-without-west").exists()
