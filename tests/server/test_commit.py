"""Committing a round while the next one trains: the server's general evaluation of round r
runs during round r+1's training, yet every metrics line is the evaluation of its own
saved version; a drift monitor that may roll back makes the next round wait; a run killed
while a version awaits its evaluation resumes and records it once."""

from __future__ import annotations

import json
import math
import random
import threading

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcpt.config import load_config
from fedcpt.core import protocol as p
from fedcpt.core.adapters import load_version
from fedcpt.core.evaluation import EvalResult
from fedcpt.core.retention import GeneralReport
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.records import read_rounds
from fedcpt.server.protocols import round_protocol
from fedcpt.server.recorder import RunRecorder
from fedcpt.server.run import FederatedRun, ServerModel, overlaps

pytestmark = pytest.mark.usefixtures("flower_task")  # Messages are built here

NODES = {11: "comedies", 12: "histories", 13: "tragedies"}
ROUNDS = 3


def _fingerprint(arrays) -> float:
    """What the fake evaluation reports: the mean adapter weight (+0.01 every round)."""
    return float(np.mean([np.mean(a) for a in arrays]))


class Grid:
    """Three sites: each adds 0.01 to the adapter it receives; ``trained[r]`` is set when
    round r's training requests arrive; ``kill_at``: the server dies sending that round."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.trained = {r: threading.Event() for r in range(1, ROUNDS + 2)}
        self.kill_at = kill_at

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages[0].metadata.message_type == "evaluate":
            return [self._evaluation(m) for m in messages]
        server_round = int(messages[0].content[p.CONFIG][p.SERVER_ROUND])
        self.trained[server_round].set()
        if server_round == self.kill_at:
            raise RuntimeError(f"the server was killed in round {server_round}")
        return [self._update(m) for m in messages]

    @staticmethod
    def _update(msg: Message) -> Message:
        arrays = ArrayRecord({k: Array(v.numpy() + np.float32(0.01))
                              for k, v in msg.content[p.ARRAYS].items()})
        return Message(RecordDict({
            p.ARRAYS: arrays, p.METRICS: MetricRecord({p.NUM_EXAMPLES: 16, p.TRAIN_SECONDS: 0.5}),
            p.SITE: ConfigRecord({"name": NODES[msg.metadata.dst_node_id]})}), reply_to=msg)

    @staticmethod
    def _evaluation(msg: Message) -> Message:
        metrics = {p.NUM_EXAMPLES: 100, p.DOMAIN_LOSS: 2.0, p.DOMAIN_BASE_LOSS: 3.0,
                   p.DOMAIN_ECE: 0.1}
        return Message(RecordDict({
            p.METRICS: MetricRecord(metrics),
            p.SITE: ConfigRecord({"name": NODES[msg.metadata.dst_node_id]})}), reply_to=msg)


class General:
    """The server's general evaluation: reads the adapter loaded in the server's model,
    then calls ``gate(k)`` (k: how many evaluations came before) before it reports."""

    def __init__(self, gate=lambda k: None) -> None:
        self.gate = gate
        self.calls = 0

    def evaluate(self, lm) -> GeneralReport:
        loss = 3.0 + _fingerprint([t.detach().numpy() for n, t in lm.model.named_parameters()
                                   if "lora_" in n])
        k, self.calls = self.calls, self.calls + 1
        self.gate(k)
        result = EvalResult(loss, math.exp(loss), 0.0, 128, [loss])
        return GeneralReport({"prose": result}, result, None)


def _federation(tmp_path, lm, grid, general, overrides=(), resume=False):
    cfg = load_config("smoke", overrides=[f"federation.rounds={ROUNDS}", *overrides]
                      ).with_secagg_resolved(deployment=False)
    folder, rng = RunFolder(tmp_path / "run"), random.Random(0)
    recorder, done = (RunRecorder.resume(folder, cfg, rng) if resume
                      else (RunRecorder.start(folder, cfg, lm), None))
    fed = FederatedRun(grid, cfg, round_protocol(cfg), recorder, ServerModel(lm), general,
                       ConfigRecord({p.RUN_CONFIG: cfg.to_json(), p.RUN_ID: recorder.run_id}),
                       rng)
    arrays = lm.initial_adapter if done is None else load_version(folder.version(done),
                                                                  lm.initial_adapter)
    return fed, folder, arrays, done


def _saved_fingerprint(folder: RunFolder, server_round: int, template) -> float:
    return _fingerprint([a.numpy() for a in load_version(folder.version(server_round),
                                                         template).values()])


def test_each_rounds_general_evaluation_runs_while_the_sites_train_the_next(
        tmp_path, fresh_lm):
    grid = Grid()

    def after_next_round_is_sent(k: int) -> None:
        if k < ROUNDS and not grid.trained[k + 1].wait(timeout=30):
            raise AssertionError(f"round {k + 1} was not sent while round {k} was evaluated")

    fed, folder, arrays, _ = _federation(tmp_path, fresh_lm, grid,
                                         General(after_next_round_is_sent))
    assert overlaps(fed.cfg)
    fed.run_rounds(arrays)

    rows = read_rounds(folder)
    assert [r.round for r in rows] == [0, 1, 2, 3]
    for row in rows:  # each line evaluates its own saved version, though the model moved on
        assert row.general_loss == pytest.approx(
            3.0 + _saved_fingerprint(folder, row.round, fresh_lm.initial_adapter), abs=1e-6)
    assert rows[3].general_loss > rows[0].general_loss  # the adapter did move
    assert json.loads(folder.checkpoint.read_text())["pending"] is None


@pytest.mark.parametrize("monitor", ["monitor.general_loss_drift=0.5",
                                     "monitor.update_drift=3"])
def test_a_monitor_that_may_roll_back_makes_the_next_round_wait(tmp_path, fresh_lm, monitor):
    grid, sent_during = Grid(), []
    fed, folder, arrays, _ = _federation(
        tmp_path, fresh_lm, grid,
        General(lambda k: sent_during.append(grid.trained[k + 1].is_set())), [monitor])
    assert not overlaps(fed.cfg)
    fed.run_rounds(arrays)
    assert sent_during == [False] * (ROUNDS + 1)
    assert [r.round for r in read_rounds(folder)] == [0, 1, 2, 3]


def test_a_flag_only_monitor_still_overlaps():
    cfg = load_config("smoke", overrides=["monitor.general_loss_drift=0.5",
                                          "monitor.action=flag"])
    assert overlaps(cfg)
    assert not overlaps(load_config("smoke", overrides=["federation.overlap_general_eval=false"]))


def test_a_server_killed_while_a_version_awaits_its_evaluation_resumes_and_records_it(
        tmp_path, fresh_lm):
    fed, folder, arrays, _ = _federation(tmp_path, fresh_lm, Grid(kill_at=2), General())
    with pytest.raises(RuntimeError, match="killed in round 2"):
        fed.run_rounds(arrays)
    checkpoint = json.loads(folder.checkpoint.read_text())
    assert checkpoint["last_round"] == 1 and checkpoint["pending"]["round"] == 1
    assert [r.round for r in read_rounds(folder)] == [0]  # round 1's line never written

    fed, folder, arrays, done = _federation(tmp_path, fresh_lm, Grid(), General(),
                                            resume=True)
    assert done == 1
    fed.run_rounds(arrays, done)
    rows = read_rounds(folder)
    assert [r.round for r in rows] == [0, 1, 2, 3]  # round 1 evaluated once, on resume
    assert rows[1].general_loss == pytest.approx(
        3.0 + _saved_fingerprint(folder, 1, fresh_lm.initial_adapter), abs=1e-6)
    assert rows[1].aggregated and rows[1].sites_trained  # its training record survived


class CountingGrid(Grid):
    """:class:`Grid` that also notes the rounds whose adapter the sites evaluated."""

    def __init__(self) -> None:
        super().__init__()
        self.evaluated: list[int] = []

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages[0].metadata.message_type == "evaluate":
            self.evaluated.append(int(messages[0].content[p.CONFIG][p.SERVER_ROUND]))
        return super().send_and_receive(messages, timeout)


def test_eval_every_evaluates_every_kth_round_and_the_last_and_says_which(
        tmp_path, fresh_lm):
    grid, general = CountingGrid(), General()
    fed, folder, arrays, _ = _federation(tmp_path, fresh_lm, grid, general,
                                         ["federation.eval_every=2"])
    fed.run_rounds(arrays)

    assert grid.evaluated == [2, 3] and general.calls == 3  # rounds 0, 2 and 3 (the last)
    rows = read_rounds(folder)
    assert [(r.round, r.evaluated) for r in rows] == [(0, True), (1, False), (2, True),
                                                      (3, True)]
    skipped = rows[1]
    assert skipped.general_loss is None and skipped.domain_loss is None
    assert skipped.general_per_kind == {} and skipped.domain_per_site == {}
    assert skipped.aggregated and skipped.sites_trained  # it trained, and was saved
    saved = [_saved_fingerprint(folder, r, fresh_lm.initial_adapter) for r in (0, 1)]
    assert saved[1] - saved[0] == pytest.approx(0.01, abs=1e-6)  # round 1's own version
    for row in (rows[2], rows[3]):  # the evaluated ones still measure their own version
        assert row.general_loss == pytest.approx(
            3.0 + _saved_fingerprint(folder, row.round, fresh_lm.initial_adapter), abs=1e-6)
    assert json.loads(folder.checkpoint.read_text())["pending"] is None

    fed.recorder.finish(fed.protocol)
    report = folder.report.read_text()
    assert "Evaluated rounds: 0, 2, 3 (`federation.eval_every = 2`" in report
    assert "| 1 | — | — |" in report  # round 1's row: trained, not evaluated


def test_a_round_left_unevaluated_is_still_checked_for_update_drift(tmp_path, fresh_lm):
    fed, folder, arrays, _ = _federation(tmp_path, fresh_lm, Grid(), General(),
                                         ["federation.eval_every=2",
                                          "monitor.update_drift=3", "monitor.action=flag"])
    fed.run_rounds(arrays)
    rows = read_rounds(folder)
    assert not rows[1].evaluated and rows[1].update_norm is not None
    assert rows[1].drift["general_loss_rise"] is None  # nothing to compare
    assert rows[2].drift["general_loss_rise"] is not None  # against round 0, evaluated
