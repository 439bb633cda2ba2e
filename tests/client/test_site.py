"""Which site a client is (``sites[partition-id]`` in simulation, node_config when
deployed), its policy, and its data packed within its privacy units."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fedcpt.client.site import open_ledger, policy_for, resolve_site, site_blocks
from fedcpt.config import SiteConfig, load_config
from fedcpt.exceptions import ConfigError, DataError
from fedcpt.privacy.policy import accept_proposal


@pytest.fixture
def cfg():
    return load_config("smoke")


def test_simulated_node_gets_its_partition(cfg):
    assert resolve_site(cfg, {"partition-id": 1}) == cfg.sites[1]
    assert resolve_site(cfg, {"partition-id": 0, "num-partitions": 3}).name == "comedies"


def test_deployed_node_names_its_data(cfg):
    site = resolve_site(cfg, {"site-name": "clinic", "data-path": "/d/a.txt,/d/b.jsonl,"})
    assert site == SiteConfig(name="clinic", data=("/d/a.txt", "/d/b.jsonl"))


def test_data_path_wins_over_partition(cfg):
    site = resolve_site(cfg, {"partition-id": 0, "data-path": "/d/x.txt"})
    assert site.data == ("/d/x.txt",)


def test_partition_beyond_sites(cfg):
    with pytest.raises(ConfigError, match=r"simulated node 3 has no site: the run defines 3"):
        resolve_site(cfg, {"partition-id": 3})


def test_deployed_node_without_data_path(cfg):
    with pytest.raises(ConfigError, match=r"node_config needs `data-path` \(and `site-name`\) "
                                          r"at a deployed site; got keys \['site-name'\]"):
        resolve_site(cfg, {"site-name": "clinic"})


def test_site_blocks_reads_only_that_sites_data(cfg, write_text):
    path = write_text("clinic.txt", 40_000, seed=100)
    site = SiteConfig(name="clinic", data=(str(path),))
    policy = policy_for(cfg, site, {"partition-id": 0})
    blocks = site_blocks(site, cfg.model, cfg.data, policy)
    assert blocks.train.shape[1] == cfg.data.block_size
    uncapped = site_blocks(site, cfg.model, replace(cfg.data, train_share=1.0), replace(
        policy, train_share=1.0))
    assert 0 < blocks.units < uncapped.units  # smoke's cap: train_share = 0.8, by hash
    assert blocks.unit == "passage" and blocks.units > 1  # smoke's [site_policy]
    assert site_blocks(site, cfg.model, cfg.data, policy) is blocks  # loaded once per process


def test_deployed_site_records_its_salted_split_beside_its_ledger(cfg, tmp_path, write_text):
    path = write_text("clinic/notes.txt", 40_000, seed=101)
    node = {"site-name": "clinic", "data-path": str(path), "privacy-unit": "passage",
            "ledger-path": str(tmp_path / "clinic.ledger.json")}
    site = resolve_site(cfg, node)
    first = site_blocks(site, cfg.model, cfg.data, policy_for(cfg, site, node))
    split = json.loads((tmp_path / "clinic.split.json").read_text())
    assert len(split["salt"]) == 64 and split["unit"] == "passage"
    assert len(split["heldout"]) == first.heldout_unit_count
    site_blocks.cache_clear()  # a new process: the same salt, the same split
    again = site_blocks(site, cfg.model, cfg.data, policy_for(cfg, site, node))
    assert torch.equal(first.heldout, again.heldout)


def test_a_deployed_dp_site_without_a_ledger_path_refuses(cfg):
    node = {"site-name": "clinic", "data-path": "/d"}
    site = resolve_site(cfg, node)
    policy = policy_for(cfg, site, node)
    with pytest.raises(ConfigError, match="has no ledger location: set `ledger-path`"):
        open_ledger(cfg, policy, accept_proposal(policy, cfg, units=100))


def test_site_blocks_error_names_the_site(cfg, tmp_path):
    site = SiteConfig(name="clinic", data=(str(tmp_path / "empty.txt"),))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"site 'clinic': source .* contains no text"):
        site_blocks(site, cfg.model, cfg.data)
