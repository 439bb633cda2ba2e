"""The round loop's policy over a fake Grid: sampling, retries, failed rounds, server steps,
site-level DP noise, phases, the EWC Fisher and the phase anchor (the run's committer, which
evaluates and writes the run folder, is injected as a list of the rounds committed; the
real one, and its overlap with the next round, is tested in test_commit.py)."""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedcpt.config import (
    FederationConfig,
    PhaseConfig,
    PrivacyConfig,
    RunConfig,
    SecAggConfig,
    SiteConfig,
    StrategyConfig,
)
from fedcpt.core.adapters import arrays_digest
from fedcpt.exceptions import RoundFailed
from fedcpt.server.protocols import round_protocol
from fedcpt.server.round_loop import run_round
from fedcpt.server.run import FederatedRun, ServerModel
from fedcpt.server.steps.base import StepResult

SHAPES = {"layer.lora_A.weight": (4, 8), "layer.lora_B.weight": (8, 4)}
NODES = {11: "north", 12: "south", 13: "east"}


def _arrays(fill: float) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, fill, np.float32)) for k, s in SHAPES.items()})


def _update(msg: Message, fill: float, examples: int = 10) -> Message:
    return Message(RecordDict({
        "arrays": _arrays(fill),
        "metrics": MetricRecord({"num-examples": examples, "train-seconds": 0.5}),
        "site": ConfigRecord({"name": NODES[msg.metadata.dst_node_id]})}), reply_to=msg)


def _evaluation(msg: Message) -> Message:
    return Message(RecordDict({
        "metrics": MetricRecord({"num-examples": 100, "domain-loss": 2.0,
                                 "domain-base-loss": 3.0, "domain-ece": 0.1}),
        "site": ConfigRecord({"name": NODES[msg.metadata.dst_node_id]})}), reply_to=msg)


class SiteGrid:
    """Three nodes; ``train(msg, attempt)`` answers each training request (None: silent)."""

    def __init__(self, train) -> None:
        self.train = train
        self.sent: list[list[Message]] = []  # training requests, per attempt
        self.evaluated: list[int] = []

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages[0].metadata.message_type == "evaluate":
            self.evaluated += [m.metadata.dst_node_id for m in messages]
            return [_evaluation(m) for m in messages]
        self.sent.append(messages)
        replies = [self.train(m, len(self.sent)) for m in messages]
        return [r for r in replies if r is not None]


class Recorder:
    def __init__(self) -> None:
        self.train: dict[int, tuple] = {}
        self.evaluate: dict[int, list] = {}
        self.sent: dict[int, str] = {}
        self.state = SimpleNamespace(pending=None)  # no version awaits its evaluation
        self.versions: dict[int, ArrayRecord] = {}  # saved versions, by round
        self.loaded: list[int] = []

    def load_version(self, server_round, reference):
        self.loaded.append(server_round)
        return self.versions[server_round]

    def record_sent(self, server_round, global_sha256):
        self.sent[server_round] = global_sha256

    def record_train(self, server_round, reports, failures, aggregated, steps=None):
        self.train[server_round] = (reports, failures, aggregated, steps)

    def record_evaluate(self, server_round, reports):
        self.evaluate[server_round] = reports


pytestmark = pytest.mark.usefixtures("flower_task")  # Messages are built here


class Committed(list):
    """The injected committer: lists (round, version) committed; evaluates nothing."""

    def evaluate(self, run, arrays):
        return None

    def commit(self, run, server_round, arrays, general, previous=None):
        self.append((server_round, arrays))
        return arrays


def _federation(grid, steps=(), privacy=None, phases=(), **federation) -> FederatedRun:
    cfg = RunConfig(sites=tuple(SiteConfig(name=n, data=("unused",)) for n in NODES.values()),
                    federation=FederationConfig(**{"round_retries": 0, **federation}),
                    privacy=privacy or PrivacyConfig(), phases=tuple(phases),
                    secagg=SecAggConfig(mode="off"))
    return FederatedRun(grid=grid, cfg=cfg, protocol=round_protocol(cfg), recorder=Recorder(),
                        model=ServerModel(None), general=None,
                        config=ConfigRecord({"run-id": "r"}), rng=random.Random(0),
                        steps=list(steps), committer=Committed())


def test_a_round_averages_the_updates_then_evaluates_every_site_then_commits():
    grid = SiteGrid(lambda m, _: _update(m, fill=float(m.metadata.dst_node_id - 10)))
    fed = _federation(grid)
    new = run_round(fed, 1, _arrays(0.0))
    np.testing.assert_allclose(new["layer.lora_A.weight"].numpy(), 2.0)  # mean of 1, 2, 3
    request = grid.sent[0][0].content
    assert request["config"]["server-round"] == 1 and request["config"]["run-id"] == "r"
    assert KEY_CLIPPING_NORM not in request["config"]  # site-level DP is off
    reports, failures, aggregated, _ = fed.recorder.train[1]
    assert aggregated and failures == [] and len(reports) == 3
    assert sorted(grid.evaluated) == list(NODES) and len(fed.recorder.evaluate[1]) == 3
    assert fed.committer == [(1, new)]
    # what the sites' attestations are bound to: the adapter the request carried
    assert fed.recorder.sent[1] == arrays_digest(request["arrays"])


def _noisy_update(msg: Message, examples: int) -> Message:
    """An update whose float32 average depends on the order it is summed in."""
    node = msg.metadata.dst_node_id
    rng = np.random.default_rng(node)
    arrays = ArrayRecord({k: Array((rng.standard_normal(s) * 10.0 ** (node - 11))
                                   .astype(np.float32)) for k, s in SHAPES.items()})
    return Message(RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": examples, "train-seconds": 0.5}),
        "site": ConfigRecord({"name": NODES[node]})}), reply_to=msg)


class ArrivalGrid(SiteGrid):
    """Replies in an order of ``arrival`` (the sites finishing in another order)."""

    def __init__(self, arrival) -> None:
        super().__init__(lambda m, _: _noisy_update(m, examples=m.metadata.dst_node_id))
        self.arrival = arrival

    def send_and_receive(self, messages, timeout=None):
        return self.arrival(super().send_and_receive(messages, timeout))


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in():
    """A seed fixes the adapter bit for bit: the sites finish in any order."""
    runs = []
    for arrival in (list, lambda replies: list(reversed(replies))):
        fed = _federation(ArrivalGrid(arrival))
        runs.append((run_round(fed, 1, _arrays(0.0)), fed.recorder))
    (first, first_recorder), (second, second_recorder) = runs
    for key in SHAPES:
        assert first[key].numpy().tobytes() == second[key].numpy().tobytes()
    reports = [[r.site for r in rec.train[1][0]] for rec in (first_recorder, second_recorder)]
    assert reports == [["east", "north", "south"]] * 2  # and reported in one order
    evaluated = [[r.site for r in rec.evaluate[1]] for rec in (first_recorder, second_recorder)]
    assert evaluated == [["east", "north", "south"]] * 2


def test_sites_per_round_samples_that_many_sites():
    grid = SiteGrid(lambda m, _: _update(m, 1.0))
    fed = _federation(grid, sites_per_round=2, eval_sites_per_round=1)
    run_round(fed, 1, _arrays(0.0))
    assert len(grid.sent[0]) == 2 and len(grid.evaluated) == 1


def test_fewer_than_min_sites_keeps_the_global_adapter():
    bad = {12: ArrayRecord({"layer.lora_A.weight": Array(np.ones((4, 8), np.float32))})}

    def train(msg, _):
        node = msg.metadata.dst_node_id
        reply = _update(msg, 1.0)
        if node in bad:
            reply.content["arrays"] = bad[node]
        return None if node == 13 else reply

    fed = _federation(SiteGrid(train), min_sites=2, failed_round="skip")
    start = _arrays(0.0)
    assert run_round(fed, 1, start) is start
    reports, failures, aggregated, _ = fed.recorder.train[1]
    assert not aggregated and [r.site for r in reports] == ["north"]
    assert failures == ["south: update rejected: adapter keys differ (missing "
                        "['layer.lora_B.weight'], unexpected [])",
                        "node-13: no reply within the round timeout",
                        "1 valid updates, fewer than min_sites=2"]
    assert fed.committer == [(1, start)]  # the unchanged adapter is still evaluated and saved


def test_round_below_min_sites_is_sent_again_and_aggregated():
    def train(msg, attempt):
        if attempt == 1:
            return Message(Error(code=1, reason="node crashed"), reply_to=msg)
        return _update(msg, 1.0)

    grid = SiteGrid(train)
    fed = _federation(grid, min_sites=2, round_retries=1)
    new = run_round(fed, 1, _arrays(0.0))
    assert [sorted(m.metadata.dst_node_id for m in sent) for sent in grid.sent] == [
        list(NODES), list(NODES)]  # the retry went to every sampled site
    np.testing.assert_allclose(new["layer.lora_B.weight"].numpy(), 1.0)
    reports, failures, aggregated, _ = fed.recorder.train[1]
    assert aggregated and len(reports) == 3
    assert sorted(failures) == ["attempt 1: 0 valid updates, fewer than min_sites=2",
                                "attempt 1: node-11: node crashed",
                                "attempt 1: node-12: node crashed",
                                "attempt 1: node-13: node crashed"]


def test_round_failing_after_its_retries_stops_the_run_with_a_clear_error():
    grid = SiteGrid(lambda m, _: Message(Error(code=1, reason="node crashed"), reply_to=m))
    fed = _federation(grid, min_sites=2, round_retries=2)
    with pytest.raises(RoundFailed, match=r"round 1 was not aggregated.*--resume"):
        run_round(fed, 1, _arrays(0.0))
    reports, failures, aggregated, _ = fed.recorder.train[1]
    assert reports == [] and not aggregated
    assert len(failures) == 12  # 3 attempts × (3 sites + the shortfall)
    assert sum("fewer than min_sites=2" in f for f in failures) == 3
    assert fed.committer == []


class Step:
    def __init__(self, name, shift=0.0, reject=False) -> None:
        self.name, self.shift, self.reject, self.seen = name, shift, reject, []

    def apply(self, server_round, global_arrays, aggregated, client_examples):
        self.seen.append((aggregated["layer.lora_A.weight"].numpy()[0, 0], client_examples))
        moved = ArrayRecord({k: Array(v.numpy() + self.shift) for k, v in aggregated.items()})
        return StepResult(moved, {"shift": self.shift}, rejects_round=self.reject)


def test_server_steps_apply_in_order_to_the_aggregate():
    first, second = Step("first", shift=1.0), Step("second", shift=10.0)
    fed = _federation(SiteGrid(lambda m, _: _update(m, 1.0, examples=7)), steps=[first, second])
    new = run_round(fed, 1, _arrays(0.0))
    assert first.seen == [(1.0, 21)] and second.seen == [(2.0, 21)]
    np.testing.assert_allclose(new["layer.lora_A.weight"].numpy(), 12.0)
    *_, aggregated, details = fed.recorder.train[1]
    assert aggregated and details == {"first": {"shift": 1.0}, "second": {"shift": 10.0}}


def test_a_step_that_rejects_the_round_keeps_the_global_adapter():
    guard, after = Step("regression_guard", reject=True), Step("after")
    fed = _federation(SiteGrid(lambda m, _: _update(m, 1.0)), steps=[guard, after])
    start = _arrays(0.0)
    assert run_round(fed, 1, start) is start
    *_, aggregated, details = fed.recorder.train[1]
    assert not aggregated and list(details) == ["regression_guard"] and after.seen == []


def test_site_level_dp_asks_for_clipping_and_noises_the_average():
    privacy = PrivacyConfig(user_level=True, user_clipping_norm=0.5,
                            user_noise_multiplier=2.0)
    grid = SiteGrid(lambda m, _: _update(m, 0.0))
    fed = _federation(grid, privacy=privacy)
    np.random.seed(0)  # Flower's noise helper draws from numpy's global generator
    new = run_round(fed, 1, _arrays(0.0))
    assert grid.sent[0][0].content["config"][KEY_CLIPPING_NORM] == 0.5
    noise = np.concatenate([new[k].numpy().ravel() for k in SHAPES])
    assert noise.std() == pytest.approx(2.0 * 0.5 / 3, rel=0.15)  # σ·C/n


def test_site_level_dp_does_not_release_a_round_in_which_a_site_failed():
    privacy = PrivacyConfig(user_level=True, user_clipping_norm=0.5,
                            user_noise_multiplier=2.0)

    def train(msg, _):
        if msg.metadata.dst_node_id == 13:
            return Message(Error(code=1, reason="node crashed"), reply_to=msg)
        return _update(msg, 0.0)

    fed = _federation(SiteGrid(train), privacy=privacy, failed_round="skip")
    start = _arrays(0.0)
    assert run_round(fed, 1, start) is start
    _, failures, aggregated, _ = fed.recorder.train[1]
    assert not aggregated and "site-level DP" in failures[-1]


def test_site_level_dp_noise_follows_the_sites_averaged_when_one_is_silent():
    """One of three sites never replies: the mean is over two planted zero updates, so the
    noise must be σ·C/2, not the σ·C/3 sized for the sites sampled (that would under-report ε)."""
    privacy = PrivacyConfig(user_level=True, user_clipping_norm=0.5,
                            user_noise_multiplier=2.0)
    grid = SiteGrid(lambda m, _: None if m.metadata.dst_node_id == 13 else _update(m, 0.0))
    fed = _federation(grid, privacy=privacy, min_sites=2)
    np.random.seed(0)
    new = run_round(fed, 1, _arrays(0.0))
    noise = np.concatenate([new[k].numpy().ravel() for k in SHAPES])
    assert noise.std() == pytest.approx(2.0 * 0.5 / 2, rel=0.15)  # σ·C/n, n = 2 averaged


def test_phases_train_their_own_sites_and_evaluate_every_site():
    grid = SiteGrid(lambda m, _: _update(m, 1.0))
    phases = [PhaseConfig(name="early", rounds=1, sites=("north", "south", "east")),
              PhaseConfig(name="late", rounds=1, sites=("south", "east"))]
    fed = _federation(grid, phases=phases, rounds=2)
    fed.sites = dict(NODES)  # as discovered: node → site name
    fed.run_rounds(_arrays(0.0))
    assert [sorted(m.metadata.dst_node_id for m in sent) for sent in grid.sent] == [
        [11, 12, 13], [12, 13]]
    assert sorted(grid.evaluated) == sorted(list(NODES) * 2)
    assert [r for r, _ in fed.committer] == [0, 1, 2]


def test_ewc_sends_the_rounds_fisher_with_every_training_request_retries_too():
    fisher = ArrayRecord({k: Array(np.full(s, 0.5, np.float32)) for k, s in SHAPES.items()})
    calls = []

    def train(msg, attempt):
        assert msg.content.array_records["fisher"] is fisher
        return None if attempt == 1 else _update(msg, 1.0)

    grid = SiteGrid(train)
    fed = _federation(grid, round_retries=1)
    fed.fisher = lambda server_round, arrays: calls.append(server_round) or fisher
    run_round(fed, 1, _arrays(0.0))
    assert len(grid.sent) == 2 and calls == [1]  # computed once per round


def _phases_with_anchor(grid, rounds=(1, 2)):
    phases = [PhaseConfig(name="early", rounds=rounds[0], sites=tuple(NODES.values())),
              PhaseConfig(name="late", rounds=rounds[1], sites=tuple(NODES.values()))]
    fed = _federation(grid, phases=phases, rounds=sum(rounds))
    fed.cfg = dataclasses.replace(fed.cfg, strategy=StrategyConfig(anchor="phase"))
    return fed


def test_the_phase_anchor_is_the_adapter_each_phase_began_from():
    # each site's update moves the adapter by +1, so round r's global adapter is r
    grid = SiteGrid(lambda m, _: _update(m, m.content["arrays"]["layer.lora_A.weight"]
                                         .numpy()[0, 0] + 1.0))
    _phases_with_anchor(grid).run_rounds(_arrays(0.0))
    anchors = [float(sent[0].content["anchor"]["layer.lora_A.weight"].numpy()[0, 0])
               for sent in grid.sent]
    assert anchors == [0.0, 1.0, 1.0]  # phase 1: the initial adapter; phase 2: round 1's
    assert all(len({arrays_digest(m.content["anchor"]) for m in sent}) == 1
               for sent in grid.sent)  # every site of a round gets the same anchor


def test_a_run_resumed_inside_a_phase_anchors_to_the_version_before_the_phase(
        ):
    grid = SiteGrid(lambda m, _: _update(m, 5.0))
    fed = _phases_with_anchor(grid, rounds=(1, 3))
    fed.recorder.versions[1] = _arrays(1.0)
    fed.run_rounds(_arrays(2.0), done=2)  # killed after round 2, inside phase "late"
    assert fed.recorder.loaded == [1]  # the version phase "late" began from, read once
    assert [float(sent[0].content["anchor"]["layer.lora_A.weight"].numpy()[0, 0])
            for sent in grid.sent] == [1.0, 1.0]


def test_a_resumed_run_goes_on_after_its_last_committed_round():
    grid = SiteGrid(lambda m, _: _update(m, 1.0))
    fed = _federation(grid, rounds=3)
    fed.run_rounds(_arrays(0.0), done=0)  # killed after round 0 was committed
    assert [r for r, _ in fed.committer] == [1, 2, 3]  # round 0 is not evaluated twice
    assert len(grid.sent) == 3
