"""What a run folder shows when the sites' evaluation is released only as a secure sum:
one aggregate entry per round in metrics.jsonl, summary.json and the report, and no
per-site values (none exist)."""

from __future__ import annotations

import json
import random

from fedcpt.config import load_config
from fedcpt.core.behaviour import AnswerRetention
from fedcpt.core.evaluation import EvalResult
from fedcpt.core.retention import GeneralReport
from fedcpt.privacy.secagg.eval_sum import EvalSum
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.records import read_rounds
from fedcpt.server.protocols import round_protocol
from fedcpt.server.recorder import RunRecorder
from fedcpt.server.secure_eval import aggregate_report
from fedcpt.strategies.base import SiteTrainReport


def _general(loss: float) -> GeneralReport:
    result = EvalResult(loss, 2.718 ** loss, 0.05, 20, [loss, loss], 0.0)
    return GeneralReport({k.name: result for k in load_config("smoke").data.general_kinds()},
                         result, AnswerRetention(1.0, 1.0, 1.0, 8, (True,)))


def test_a_secure_sum_is_recorded_as_one_aggregate_evaluation(tmp_path, fresh_lm):
    cfg = load_config("smoke", overrides=["secagg.mode=on", "federation.rounds=1"])
    folder = RunFolder(tmp_path / "run")
    recorder = RunRecorder.start(folder, cfg, fresh_lm)
    sums = {0: EvalSum(sites=3, tokens=1512, loss=3.0, base_loss=3.0, ece=0.2, clipped=0),
            1: EvalSum(sites=3, tokens=1512, loss=2.5, base_loss=3.0, ece=0.1, clipped=2)}
    for server_round, result in sums.items():
        if server_round:
            recorder.record_train(server_round, [SiteTrainReport(
                site=s.name, num_examples=16, train_loss=None, seconds=1.0, bytes_up=400,
                update_norm=None) for s in cfg.sites], [], aggregated=True)
        recorder.record_evaluate(server_round, [aggregate_report(result)])
        recorder.save_version(server_round, fresh_lm, [], random.Random(0), None)
        recorder.record_general(_general(2.0))
    summary = recorder.finish(round_protocol(cfg))

    rows = read_rounds(folder)
    assert [r.domain_loss for r in rows] == [3.0, 2.5]
    assert all(r.domain_per_site == {} for r in rows)  # no site has a value of its own
    assert rows[1].domain_secure == {"sites": 3, "tokens": 1512, "loss": 2.5, "base_loss": 3.0,
                                     "ece": 0.1, "clipped": 2}
    saved = json.loads(folder.summary.read_text())
    assert saved["domain_loss"]["per_site"] == {}
    assert saved["domain_loss"]["secure_sum"] == {"sites": 3, "tokens": 1512, "base": 3.0,
                                                  "final": 2.5}
    assert summary.adaptation == 0.5
    report = folder.report.read_text()
    assert "1512 held-out tokens summed over 3 sites under secure aggregation" in report
    assert "only the sum of 3 sites' evaluations" in report
    assert "| secure sum" not in report  # the aggregate is not shown as a site's row
