"""Kill a DP site at every point of a round, and the DP server mid-round and between
rounds; after restarts the ledgers equal an uninterrupted run's, with no round lost or
paid twice. Minutes on 2 cores: marked ``kills``, outside ``make test`` (``pytest -m kills``
or benchmarks/faults.py)."""

from __future__ import annotations

import pytest

from fedcpt.testing.kills import client_kills, server_kills
from fedcpt.testing.site_process import POINTS

pytestmark = [pytest.mark.kills, pytest.mark.slow]


def test_site_killed_at_every_point_pays_each_round_once(tmp_path):
    report = client_kills(tmp_path)
    assert not report.problems
    assert [k["point"] for k in report.kills] == list(POINTS)
    assert report.survived == len(POINTS)
    assert report.ledger_mismatches == report.lost_rounds == 0


def test_dp_server_killed_and_resumed_pays_each_round_once(tmp_path):
    report = server_kills(tmp_path)
    assert not report.problems
    assert report.survived == len(report.kills) == 3
    # the kill between rounds came after round 2's checkpoint, its general evaluation pending
    assert report.kills[1]["what"] == "between rounds, after the checkpoint"
    assert report.kills[1]["evaluation_pending"] and report.kills[1]["rounds_done"] == 1
    assert report.ledger_mismatches == report.lost_rounds == 0
