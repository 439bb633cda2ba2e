"""Secure aggregation (SecAgg+) over the real site and server stages, in process.

A ``SiteGrid`` (:mod:`secagg_grid`) delivers each message to the site functions the
ClientApp calls, with each site's own Flower ``Context`` and signing identity, and can
drop a site at any stage; sites "train" by returning a planted update, so the aggregate
can be compared with the plain weighted average. The attacks of a malicious server are in
``test_secagg_attacks.py``.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from secagg_grid import SiteGrid, Sites, make_identities, new_context

from fedcpt.config import FederationConfig, RunConfig, SecAggConfig, SiteConfig, load_config
from fedcpt.core import protocol as p
from fedcpt.exceptions import ConfigError, UpdateRejected
from fedcpt.privacy.secagg import site
from fedcpt.privacy.secagg.masking import expand
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.server import MASKED, SETUP, SHARE_KEYS, STATE, UNMASK
from fedcpt.server.protocols import round_protocol
from fedcpt.server.round_loop import request, train_attempt
from fedcpt.server.run import FederatedRun, ServerModel

SHAPES = {"a.lora_A.weight": (4, 64), "a.lora_B.weight": (64, 4), "b.lora_A.weight": (4, 64)}
NODES = (101, 202, 303, 404, 505)


def _arrays(scale: float, seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array((rng.normal(size=s) * scale).astype(np.float32))
                        for k, s in SHAPES.items()})


pytestmark = pytest.mark.usefixtures("flower_task")  # Messages are built here


def _config(n_sites: int = 5, **secagg) -> RunConfig:
    return RunConfig(
        sites=tuple(SiteConfig(name=f"s{i}", data=("unused",)) for i in range(n_sites)),
        federation=FederationConfig(max_update_norm=2.0),
        secagg=SecAggConfig(mode="on", **secagg))


def _round(grid: SiteGrid, cfg: RunConfig, reference: ArrayRecord):
    """One attempt of the round loop's training over ``grid``: the aggregate (None if the
    round failed) and the examples it covers (None then too)."""
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(
        cfg.federation, sites_per_round=len(grid.updates), round_timeout_s=5.0))
    fed = FederatedRun(grid=grid, cfg=cfg, protocol=round_protocol(cfg), recorder=None,
                       model=ServerModel(None), general=None, config=ConfigRecord(),
                       rng=random.Random(0))
    attempt = train_attempt(fed, 1, reference, request(reference, ConfigRecord(), 1), None)
    if attempt.aggregate is None:
        return None, None
    return attempt.aggregate, {p.NUM_EXAMPLES: sum(r.num_examples
                                                   for r in attempt.collected.reports)}


def _plain_mean(updates: dict[int, tuple[ArrayRecord, int]], nodes) -> dict[str, np.ndarray]:
    total = sum(updates[n][1] for n in nodes)
    return {k: sum(updates[n][0][k].numpy().astype(np.float64) * updates[n][1] for n in nodes)
            / total for k in SHAPES}


@pytest.fixture
def federation():
    reference = _arrays(0.1, seed=0)
    weights = (32, 32, 16, 24, 32)
    updates = {n: (ArrayRecord({k: Array(reference[k].numpy() + d[k].numpy())
                                for k in SHAPES}), w)
               for n, w, d in zip(NODES, weights, (_arrays(0.01, s) for s in range(1, 6)),
                                  strict=True)}
    return reference, updates


def _max_error(arrays: ArrayRecord, expected: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(arrays[k].numpy() - expected[k]).max()) for k in SHAPES)


def _quantum(cfg: RunConfig, contributors: int, weight: int) -> float:
    """Worst-case error per coordinate: one quantisation step per site, rescaled."""
    params = SecAggParams.for_round(cfg, len(NODES))
    step = 2 * params.clipping_range / params.quantization_range
    return contributors * step * params.max_weight / weight + 1e-6  # + float32 rounding


@pytest.mark.parametrize("num_shares", [0, 3])
def test_secure_sum_equals_the_plain_weighted_average(federation, num_shares):
    reference, updates = federation
    cfg = _config(num_shares=num_shares)
    arrays, metrics = _round(SiteGrid(updates), cfg, reference)

    expected = _plain_mean(updates, NODES)
    assert metrics[p.NUM_EXAMPLES] == sum(w for _, w in updates.values())
    assert _max_error(arrays, expected) <= _quantum(cfg, 5, 136)
    # and the quantisation error is far below the size of the updates themselves
    assert _max_error(arrays, expected) < 0.01 * max(
        float(np.abs(expected[k] - reference[k].numpy()).max()) for k in SHAPES)


def test_round_survives_up_to_n_minus_t_dropouts_after_key_sharing(federation):
    reference, updates = federation
    cfg = _config(reconstruction_threshold=3)  # 5 sites, a majority (no colluder assumed)
    dropped = {NODES[1], NODES[3]}
    arrays, _ = _round(SiteGrid(updates, drop={MASKED: dropped}), cfg, reference)

    survivors = [n for n in NODES if n not in dropped]
    weight = sum(updates[n][1] for n in survivors)
    assert arrays is not None
    assert _max_error(arrays, _plain_mean(updates, survivors)) <= _quantum(cfg, 3, weight)


def test_a_site_dropping_during_unmasking_is_tolerated(federation):
    reference, updates = federation
    cfg = _config(reconstruction_threshold=3)
    arrays, _ = _round(SiteGrid(updates, drop={MASKED: {NODES[0]}, UNMASK: {NODES[2]}}),
                       cfg, reference)
    survivors = NODES[1:]
    weight = sum(updates[n][1] for n in survivors)
    assert _max_error(arrays, _plain_mean(updates, survivors)) <= _quantum(cfg, 4, weight)


@pytest.mark.parametrize("drop", [
    {MASKED: set(NODES[:3])},                       # 3 of 5 drop after key sharing
    {SETUP: set(NODES[:3])},                        # too few to start
    {MASKED: {NODES[0]}, UNMASK: set(NODES[1:4])},  # too few shares to unmask
])
def test_too_many_dropouts_fail_the_round_cleanly(federation, drop):
    reference, updates = federation
    arrays, metrics = _round(SiteGrid(updates, drop=drop), _config(), reference)
    assert arrays is None and metrics is None  # the global adapter stays as it was


def test_a_sum_of_two_is_never_revealed(federation):
    reference, updates = federation
    three = {n: updates[n] for n in NODES[:3]}  # threshold 2 of 3
    arrays, _ = _round(SiteGrid(three, drop={MASKED: {NODES[0]}}),
                       _config(3, reconstruction_threshold=2), reference)
    assert arrays is None  # each survivor could subtract its own update from the sum


def test_sites_refuse_parameters_that_would_let_the_server_unmask_one_update(federation):
    reference, _ = federation
    fair = SecAggParams(num_shares=5, threshold=3, clipping_range=1.0,
                        quantization_range=2**22, max_weight=8)
    sites = Sites([7, 8, 9], fair, reference, ConfigRecord({"k": "v"}))
    weak = SecAggParams(num_shares=1, threshold=1, clipping_range=1.0,
                        quantization_range=2**22, max_weight=8)
    request = ConfigRecord({**sites.round_record(), **weak.to_record()})
    with pytest.raises(UpdateRejected, match="refusing secure aggregation parameters"):
        sites.setup(7, request)
    keys = sites.setup(7)
    with pytest.raises(UpdateRejected, match="neighbours"):
        sites.share_keys(7, Sites.key_list({7: keys}, [7]))


class MisbehavingGrid(SiteGrid):
    """One site answers a stage with malformed content."""

    def __init__(self, updates, stage: str, node: int, field: str, value) -> None:
        super().__init__(updates)
        self.bad = (stage, node, field, value)

    def _answer(self, node, kind, msg):
        reply = super()._answer(node, kind, msg)
        stage, bad_node, field, value = self.bad
        if (kind, node) == (stage, bad_node):
            record = reply.content.config_records[STATE]
            record[field] = value
        return reply


@pytest.mark.parametrize("stage, field, value", [
    (SHARE_KEYS, "sealed", ["not", "bytes", "at", "all"]),
    (UNMASK, "shares", [b"garbage"] * 5),
])
def test_a_malformed_site_fails_the_round_not_the_server(federation, stage, field, value):
    reference, updates = federation
    grid = MisbehavingGrid(updates, stage, NODES[0], field, value)
    arrays, _ = _round(grid, _config(), reference)
    if stage == SHARE_KEYS:  # the site is left out; the other four are summed
        weight = sum(updates[n][1] for n in NODES[1:])
        assert _max_error(arrays, _plain_mean(updates, NODES[1:])) <= _quantum(cfg=_config(),
                                                                              contributors=4,
                                                                              weight=weight)
    else:  # its shares are ignored; the others' still rebuild every secret
        assert arrays is not None


def test_what_the_server_receives_is_unrelated_to_the_update(federation):
    reference, updates = federation
    grid = SiteGrid(updates)
    _round(grid, _config(), reference)

    for node in NODES:
        masked = grid.sent_masked[node].astype(np.float64)
        encoded = grid.encoded[node].astype(np.float64)
        # uncorrelated with the site's true (encoded) update ...
        assert abs(np.corrcoef(masked, encoded)[0, 1]) < 0.1
        # ... and uniform over the whole 2^32 range (16-bin chi-square, 15 dof, p ≈ 1e-4)
        counts = np.histogram(masked, bins=16, range=(0, 2**32))[0]
        expected = masked.size / 16
        assert ((counts - expected) ** 2 / expected).sum() < 45
        assert not np.array_equal(grid.sent_masked[node], grid.encoded[node])


def test_masks_use_the_whole_seed_unlike_flowers_32_bit_generator():
    seed = bytes(range(32))
    # flipping the same bits in two 4-byte words cancels in Flower's XOR-folded seed ...
    twin = bytearray(seed)
    twin[0] ^= 0xFF
    twin[4] ^= 0xFF
    twin = bytes(twin)
    flower = [pseudo_rand_gen(s, 2**32, [(1000,)])[0] for s in (seed, twin)]
    assert np.array_equal(*flower)  # the weakness: these two masks are the same
    # ... but the ChaCha20 expansion differs everywhere
    ours = expand(seed, 1000), expand(twin, 1000)
    assert (ours[0] != ours[1]).mean() > 0.99


def test_sites_refuse_stages_out_of_order():
    ctx = new_context(7)
    me = make_identities([7])[7]
    with pytest.raises(UpdateRejected, match="out of order"):
        site.unmask(ctx, ConfigRecord({"survivors": [7], "signers": [], "signatures": [],
                                       "active": [7], "dead": []}), me)
    with pytest.raises(UpdateRejected, match="out of order"):
        site.consistency(ctx, ConfigRecord({"survivors": [7]}), me)


def test_shares_redirected_by_the_server_fail_authentication(federation):
    reference, _ = federation
    sites = Sites(NODES, SecAggParams.for_round(_config(), 5), reference, ConfigRecord())
    keys = {n: sites.setup(n) for n in NODES}
    out = {n: sites.share_keys(n, Sites.key_list(keys, NODES)) for n in NODES}
    # node 101's shares meant for 202 are delivered to 303 as if they came from 101
    sealed = out[NODES[0]]["sealed"][list(out[NODES[0]]["dst"]).index(NODES[1])]
    with pytest.raises(UpdateRejected, match="authentication"):
        site.receive_shares(sites.contexts[NODES[2]],
                            ConfigRecord({"src": [NODES[0]], "sealed": [sealed]}),
                            reference, ConfigRecord())


@pytest.mark.parametrize("overrides, message", [
    (["secagg.reconstruction_threshold=1"], "majority"),
    (["federation.max_update_norm=0"], "max_update_norm"),
    (["privacy.user_level=true", "secagg.dishonest_fraction=1"], "dishonest_fraction"),
    (["federation.sites_per_round=2"], ">= 3"),
    (["secagg.quantization_range=1500000000"], r"2\^32"),
    (["federation.eval_sites_per_round=2"], r"eval_sites_per_round.*3 to 255"),
])
def test_bad_secagg_settings_are_rejected_before_any_round(sites_config, overrides, message):
    base = ["secagg.mode=on", "federation.max_update_norm=5"]
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", config_file=sites_config, overrides=base + overrides)


def test_even_num_shares_below_the_sampled_sites_is_rejected():
    # Flower's own clients crash on this (IndexError in _share_keys)
    with pytest.raises(ConfigError, match="odd"):
        _config(num_shares=4)
    assert SecAggParams.for_round(_config(num_shares=3), 5).num_shares == 3
