"""The ClientApp mod that turns a site's own problems into one log line and a generic
error reply, and sends nothing that skipped the release gate."""

from __future__ import annotations

import logging

import pytest
from flwr.app import Context, Error, Message, MetricRecord, RecordDict

from fedcpt.client.errors import report_site_errors
from fedcpt.core import protocol as p
from fedcpt.exceptions import DataError

DEPLOYED = {"site-name": "east", "data-path": "/data/east"}
SIMULATED = {"partition-id": 2, "num-partitions": 3}


pytestmark = pytest.mark.usefixtures("flower_task")  # Messages are built here


def message() -> Message:
    return Message(RecordDict(), dst_node_id=7, message_type="train")


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                   node_config=node_config)


def refusal(reason: str):
    return lambda msg, ctx: Message(Error(code=p.UPDATE_REFUSED, reason=reason), reply_to=msg)


GENERIC_ERROR = ("site east: cannot take part in this round (the reason is in the site's "
                 "own log)")


def test_site_error_becomes_a_generic_reply_and_one_log_line(caplog) -> None:
    """The server learns that the site could not take part, not why: a missing path (or
    which model paths exist at the site) is the site's to know."""
    def missing_data(msg, ctx):
        raise DataError("data path not found: /data/east")

    with caplog.at_level(logging.WARNING, logger="fedcpt.client"):
        reply = report_site_errors(message(), context(DEPLOYED), missing_data)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == p.SITE_ERROR
    assert reply.error.reason == GENERIC_ERROR
    assert "/data/east" not in reply.error.reason
    assert caplog.messages == ["site east cannot take part in this train round: data path "
                               "not found: /data/east"]


def test_simulated_site_is_named_by_partition() -> None:
    def missing_data(msg, ctx):
        raise DataError("data path not found: x")

    reply = report_site_errors(message(), context(SIMULATED), missing_data)
    assert reply.error.reason == ("site partition 2: cannot take part in this round (the "
                                  "reason is in the site's own log)")


def test_an_error_reply_that_skipped_the_gate_is_made_generic(caplog) -> None:
    """A handler's own error reply naming a data-dependent value never reaches the server:
    the mod replaces its reason with the code's generic sentence, and logs the original."""
    with caplog.at_level(logging.WARNING, logger="fedcpt.client"):
        reply = report_site_errors(message(), context(DEPLOYED),
                                   refusal("update norm 9.213 too big"))
    assert (reply.error.code, reply.error.reason) == (
        p.UPDATE_REFUSED, "site east: refused: a check at the site failed; nothing was sent "
                          "(the reason is in the site's own log)")
    assert any("update norm 9.213" in m for m in caplog.messages)
    plain = report_site_errors(message(), context(SIMULATED), refusal("update norm 9 too big"))
    assert "9" not in plain.error.reason


def test_a_reply_with_content_that_skipped_the_gate_is_withheld(caplog) -> None:
    """Deny by default: content that did not pass the release gate is not sent."""
    def ungated(msg, ctx):
        return Message(RecordDict({"metrics": MetricRecord({"train-loss": 2.5})}),
                       reply_to=msg)

    with caplog.at_level(logging.ERROR, logger="fedcpt.client"):
        reply = report_site_errors(message(), context(DEPLOYED), ungated)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.reason == GENERIC_ERROR
    assert any("did not pass the release gate" in m for m in caplog.messages)


def test_bugs_are_not_swallowed() -> None:
    def bug(msg, ctx):
        raise KeyError("arrays")

    with pytest.raises(KeyError):
        report_site_errors(message(), context(DEPLOYED), bug)
