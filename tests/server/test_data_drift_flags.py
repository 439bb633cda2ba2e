"""The server's side of per-site data drift: what the sites' evaluation replies carry goes
into metrics.jsonl, a site beyond ``monitor.data_drift_threshold`` is flagged (never rolled
back) in its row and the report, and the report plots it."""

from __future__ import annotations

import json
import math
import random

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedcpt.config import MonitorConfig, load_config
from fedcpt.core import protocol as p
from fedcpt.core.evaluation import EvalResult
from fedcpt.core.retention import GeneralReport
from fedcpt.exceptions import ConfigError, UpdateRejected
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.records import read_rounds
from fedcpt.server.drift import check_data_drift, good_rounds
from fedcpt.server.protocols import round_protocol
from fedcpt.server.recorder import RunRecorder
from fedcpt.server.round_loop import evaluate_sites
from fedcpt.server.run import FederatedRun, ServerModel
from fedcpt.strategies.base import eval_report
from tests.server.test_drift import _row

NODES = {11: "comedies", 12: "histories", 13: "tragedies"}


def _reply(msg: Message, drift: dict[str, float]) -> Message:
    site = NODES[msg.metadata.dst_node_id]
    metrics = {p.NUM_EXAMPLES: 504, p.DOMAIN_LOSS: 5.4, p.DOMAIN_BASE_LOSS: 5.5,
               p.DOMAIN_ECE: 0.01}
    if site in drift:
        metrics[p.DATA_DRIFT] = drift[site]
    return Message(RecordDict({p.METRICS: MetricRecord(metrics),
                               p.SITE: ConfigRecord({"name": site})}), reply_to=msg)


class EvalGrid:
    """Three sites answering evaluation requests with the given data drift."""

    def __init__(self, drift: dict[str, float]) -> None:
        self.drift = drift

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, timeout=None):
        return [_reply(m, self.drift) for m in messages]


def _general(loss: float) -> GeneralReport:
    result = EvalResult(loss, math.exp(loss), 0.0, 128, [loss - 0.01, loss + 0.01])
    return GeneralReport({"prose": result}, result, None)


def test_sites_beyond_the_threshold_are_flagged_once_in_the_rows_and_the_report(
        tmp_path, fresh_lm, flower_task):
    cfg = load_config("smoke", overrides=["monitor.data_drift_threshold=0.5"]
                      ).with_secagg_resolved(deployment=False)
    folder = RunFolder(tmp_path / "run")
    recorder = RunRecorder.start(folder, cfg, fresh_lm)
    fed = FederatedRun(EvalGrid({"comedies": 0.8, "histories": -0.1}), cfg,
                       round_protocol(cfg), recorder, ServerModel(fresh_lm), None,
                       ConfigRecord({}), random.Random(0))
    rng = random.Random(0)
    recorder.save_version(0, fresh_lm, [], rng, None)
    recorder.record_general(_general(5.0))
    for server_round in (1, 2):
        recorder.record_train(server_round, [], [], aggregated=True)
        evaluate_sites(fed, server_round, fresh_lm.initial_adapter)
        recorder.save_version(server_round, fresh_lm, [], rng, None)
        recorder.record_general(_general(4.9))
    recorder.finish(fed.protocol)
    rows = read_rounds(folder)
    assert rows[1].data_drift_per_site == rows[2].data_drift_per_site == {
        "comedies": 0.8, "histories": -0.1}  # tragedies: a first run, none sent
    assert rows[1].data_drift_flags == ["data drift: site comedies's data moved by +0.800 "
                                        "nats against its previous runs (threshold 0.5)"]
    assert rows[2].data_drift_flags == []  # once a run
    assert rows[1].aggregated and rows[2].aggregated  # a flag, not a rollback
    assert [r.round for r in good_rounds(rows)] == [0, 1, 2]  # still good baselines
    raw = json.loads(folder.metrics.read_text().splitlines()[1])
    assert raw["data_drift_per_site"]["comedies"] == 0.8
    report = folder.report.read_text()
    assert "site comedies's data moved by +0.800 nats against its previous runs" in report
    assert "| comedies | +0.8000 | yes |" in report and "| histories | -0.1000 | — |" in report
    assert (folder.root / "data_drift.png").is_file()
    assert "data_drift.png" in report


def test_the_threshold_is_either_way_and_off_at_zero():
    rows = [_row(0, 5.0, None)]
    on = MonitorConfig(data_drift_threshold=0.5)
    assert check_data_drift(on, rows, {"a": -0.7, "b": 0.4, "c": 0.51}) == [
        "data drift: site a's data moved by -0.700 nats against its previous runs "
        "(threshold 0.5)",
        "data drift: site c's data moved by +0.510 nats against its previous runs "
        "(threshold 0.5)"]
    assert check_data_drift(MonitorConfig(), rows, {"a": 9.0}) == []
    with pytest.raises(ConfigError, match="monitor.data_drift_threshold"):
        MonitorConfig(data_drift_threshold=-1)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_drift_from_a_site_is_rejected(value, flower_task):
    request = Message(RecordDict({p.CONFIG: ConfigRecord({})}), dst_node_id=11,
                      message_type="evaluate")
    with pytest.raises(UpdateRejected, match="'data-drift' is not finite"):
        eval_report(_reply(request, {"comedies": value}))
