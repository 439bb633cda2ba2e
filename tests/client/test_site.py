"""Which site a client is: ``sites[partition-id]`` in simulation, node_config when deployed."""

from __future__ import annotations

import pytest

from fedcpt.client.site import resolve_site, site_blocks
from fedcpt.config import SiteConfig, load_config
from fedcpt.exceptions import ConfigError, DataError


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
    blocks = site_blocks(site, cfg.model, cfg.data)
    assert blocks.train.shape[1] == cfg.data.block_size
    assert blocks.train.numel() <= cfg.data.max_site_tokens
    assert site_blocks(site, cfg.model, cfg.data) is blocks  # loaded once per process


def test_site_blocks_error_names_the_site(cfg, tmp_path):
    site = SiteConfig(name="clinic", data=(str(tmp_path / "empty.txt"),))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"site 'clinic': source .* contains no text"):
        site_blocks(site, cfg.model, cfg.data)
