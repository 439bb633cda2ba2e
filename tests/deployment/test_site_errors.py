"""The ClientApp mod that turns a site's own problems into one line and an error reply."""

from __future__ import annotations

import logging

import pytest
from flwr.app import Context, Error, Message, RecordDict

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


def test_site_error_becomes_a_reply_and_one_log_line(caplog) -> None:
    def missing_data(msg, ctx):
        raise DataError("data path not found: /data/east")

    with caplog.at_level(logging.ERROR, logger="fedcpt.client.errors"):
        reply = report_site_errors(message(), context(DEPLOYED), missing_data)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == p.SITE_ERROR
    assert reply.error.reason == "site east: data path not found: /data/east"
    assert caplog.messages == ["site east cannot take part in this train round: data path "
                               "not found: /data/east"]


def test_simulated_site_is_named_by_partition() -> None:
    def missing_data(msg, ctx):
        raise DataError("data path not found: x")

    reply = report_site_errors(message(), context(SIMULATED), missing_data)
    assert reply.error.reason == "site partition 2: data path not found: x"


def test_refusals_of_a_deployed_site_name_it() -> None:
    reply = report_site_errors(message(), context(DEPLOYED), refusal("update norm 9 too big"))
    assert (reply.error.code, reply.error.reason) == (p.UPDATE_REFUSED,
                                                      "site east: update norm 9 too big")
    named = "site 'east' refuses to train: budget"
    assert report_site_errors(message(), context(DEPLOYED), refusal(named)).error.reason == named
    plain = report_site_errors(message(), context(SIMULATED), refusal("update norm 9 too big"))
    assert plain.error.reason == "update norm 9 too big"


def test_bugs_are_not_swallowed() -> None:
    def bug(msg, ctx):
        raise KeyError("arrays")

    with pytest.raises(KeyError):
        report_site_errors(message(), context(DEPLOYED), bug)
