"""The release gate: every reply of every handler, in every mode, leaves through it, and
every key it lets out is in the privacy report's release list with its class."""

from __future__ import annotations

import itertools
import logging

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from secagg_grid import AppGrid, secagg_federation, simulated_sites

from fedcpt.client import gate as client_gate
from fedcpt.client.request import request_for
from fedcpt.config import RunConfig, load_config
from fedcpt.core import protocol as p
from fedcpt.core.model import load_adapted_model
from fedcpt.privacy import gate
from fedcpt.privacy.gate import (
    ACCOUNTED,
    NOT_SENT,
    PUBLIC,
    UNPROTECTED,
    Mode,
    release_rows,
)
from fedcpt.privacy.report import release_list
from fedcpt.server.protocols import round_protocol
from fedcpt.server.round_loop import request, site_evaluations, train_attempt

pytestmark = pytest.mark.usefixtures("flower_task")  # Messages are built here
SITES = ("comedies", "histories", "tragedies")


def reply_paths(reply: Message) -> set[str]:
    """What a reply carries as the gate's table names it: whole records (an adapter, a
    masked vector) and ``record.key`` inside metric and config records."""
    paths = set()
    for name, record in reply.content.items():
        if gate.is_whole_record(name):
            paths.add(name)
        else:
            paths |= {f"{name}.{key}" for key in record.keys()}
    return paths


def _request(cfg: RunConfig) -> Message:
    return Message(RecordDict({p.CONFIG: ConfigRecord({
        p.RUN_CONFIG: cfg.to_json(), p.RUN_ID: "run-g", p.SERVER_ROUND: 1})}),
        dst_node_id=1, message_type=MessageType.TRAIN)


def _simulated(cfg: RunConfig):
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                      state=RecordDict(), run_config={})
    msg = _request(cfg)
    return msg, request_for(msg, context)


# --- the gate itself ---------------------------------------------------------------------
def test_an_unknown_key_is_not_sent(caplog):
    """Deny by default: a key a handler adds without a line in the gate's table is
    dropped, and the site's log names it."""
    cfg = load_config("smoke")
    msg, req = _simulated(cfg)
    metrics = {p.NUM_EXAMPLES: cfg.train.local_steps * cfg.train.batch_size,
               p.TRAIN_SECONDS: 1.5, p.TRAIN_LOSS: 3.0, "train-tokens": 12345}
    content = RecordDict({p.METRICS: MetricRecord(metrics),
                          "debug": ConfigRecord({"units": 40}),
                          p.SITE: ConfigRecord({"name": "comedies", "heldout-units": 7})})
    with caplog.at_level(logging.WARNING, logger="fedcpt.client.gate"):
        reply = client_gate.send(req, gate.TRAIN, content)
    assert client_gate.released(reply)
    assert reply_paths(reply) == {f"{p.METRICS}.{p.NUM_EXAMPLES}",
                                  f"{p.METRICS}.{p.TRAIN_SECONDS}",
                                  f"{p.METRICS}.{p.TRAIN_LOSS}", f"{p.SITE}.name"}
    [line] = caplog.messages
    assert "metrics.train-tokens" in line and "debug" in line and "site.heldout-units" in line


def test_under_dp_a_data_dependent_value_under_a_public_key_is_refused(caplog):
    """Under DP the training time is public only as 0; a handler sending the real time
    (a value that depends on the Poisson batches) sends nothing at all."""
    cfg = load_config("smoke-dp")
    msg, req = _simulated(cfg)
    examples = cfg.train.local_steps * cfg.train.batch_size
    ok = client_gate.send(req, gate.TRAIN, RecordDict({p.METRICS: MetricRecord(
        {p.NUM_EXAMPLES: examples, p.TRAIN_SECONDS: 0.0, p.TRAIN_LOSS: 2.0})}))
    assert reply_paths(ok) == {f"{p.METRICS}.{p.NUM_EXAMPLES}",
                               f"{p.METRICS}.{p.TRAIN_SECONDS}"}  # the loss is dropped
    with caplog.at_level(logging.ERROR, logger="fedcpt.client.gate"):
        leaked = client_gate.send(req, gate.TRAIN, RecordDict({p.METRICS: MetricRecord(
            {p.NUM_EXAMPLES: examples, p.TRAIN_SECONDS: 3.217})}))
    assert leaked.has_error() and not leaked.has_content()
    assert "3.217" not in leaked.error.reason
    assert any("is not its public value" in m for m in caplog.messages)


ALL_MODES = [Mode(reply, dp_sgd=dp, site_dp=sdp, eval_release=release, salted=salted)
             for reply, dp, sdp, release, salted in itertools.product(
                 gate.REPLIES, (False, True), (False, True),
                 ("nothing", "plain", "noised", "secagg"), (False, True))
             if not sdp or reply == gate.MASKED_TRAIN]  # the sites add noise only masked


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.label() + f" salted={m.salted}")
def test_under_dp_nothing_un_noised_leaves(mode):
    """Every decision is one of the four classes; a protected training reply of a salted
    site sends nothing data-dependent un-noised, and a noised evaluation sends nothing
    un-noised either."""
    rows = release_rows(mode, sent_only=False)
    assert {r.cls for r in rows} <= {ACCOUNTED, PUBLIC, UNPROTECTED, NOT_SENT}
    if (mode.protected and mode.salted and mode.reply in (gate.TRAIN, gate.MASKED_TRAIN)) \
            or (mode.eval_release == "noised" and "evaluate" in mode.reply):
        assert [r for r in rows if r.cls == UNPROTECTED] == []
    if mode.reply in (gate.QUERY, gate.SECAGG_STAGE):
        assert {r.cls for r in release_rows(mode)} == {PUBLIC}


# --- every handler, every mode, through the real ClientApp -------------------------------
def _check(replies: list[Message], mode_of) -> set[str]:
    """Each reply left through the gate; each of its keys is in the report's release
    list for the reply's mode, with a class that sends it. Returns the modes seen."""
    seen = set()
    for reply in replies:
        assert client_gate.released(reply)
        if reply.has_error():
            continue
        mode = mode_of(reply)
        seen.add(mode.reply)
        rows = {r.path: r for r in release_rows(mode)}
        listed = release_list((mode,))
        for path in reply_paths(reply):
            assert path in rows, (mode.label(), path)
            assert rows[path].cls != NOT_SENT
            assert rows[path].line() in listed
    return seen


def _stage_mode(cfg: RunConfig, release: str):
    def mode_of(reply: Message) -> Mode:
        kind = reply.metadata.message_type
        if kind == "query":
            return Mode(gate.QUERY)
        if p.MASKED in reply.content:
            if kind.startswith(MessageType.EVALUATE):
                return Mode(gate.MASKED_EVALUATE, dp_sgd=cfg.privacy.enabled,
                            eval_release=release, salted=bool(cfg.privacy.ledger_dir))
            return Mode(gate.MASKED_TRAIN, dp_sgd=cfg.privacy.enabled,
                        site_dp=cfg.privacy.user_level, eval_release=release,
                        salted=bool(cfg.privacy.ledger_dir))
        if "secagg" in reply.content:
            return Mode(gate.SECAGG_STAGE)
        if kind.startswith(MessageType.EVALUATE):
            return Mode(gate.EVALUATE, dp_sgd=cfg.privacy.enabled, eval_release=release,
                        salted=bool(cfg.privacy.ledger_dir))
        return Mode(gate.TRAIN, dp_sgd=cfg.privacy.enabled, eval_release=release,
                    salted=bool(cfg.privacy.ledger_dir))
    return mode_of


MODES = {
    "plain": (["secagg.mode=off"], "plain"),
    "DP": (["secagg.mode=off", "privacy.enabled=true", "privacy.noise_multiplier=1.0"],
           "noised"),
    "SecAgg": (["secagg.mode=on"], "secagg"),
    "site-level DP": (["secagg.mode=off", "privacy.user_level=true"], "plain"),
    "distributed DP": (["secagg.mode=on", "privacy.user_level=true",
                        "privacy.user_noise_multiplier=1.0"], "secagg"),
    "DP + SecAgg": (["secagg.mode=on", "privacy.enabled=true",
                     "privacy.noise_multiplier=1.0"], "noised"),
}


@pytest.mark.parametrize("name", list(MODES))
def test_every_reply_key_of_every_handler_is_gated_and_listed(tmp_path, name):
    overrides, release = MODES[name]
    cfg = load_config("smoke", overrides=[
        *overrides, "train.local_steps=1", "federation.min_sites=3",
        f"privacy.ledger_dir={tmp_path / 'ledgers'}", f"site_policy.eval_release={release}"])
    grid = AppGrid(simulated_sites(tmp_path / "fed", SITES))
    fed = secagg_federation(grid, cfg)
    fed.protocol = round_protocol(cfg)  # the server's own choice for this config
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    attempt = train_attempt(fed, 1, initial, request(initial, fed.config, 1), None)
    assert attempt.aggregate is not None, attempt.failures
    assert len(site_evaluations(fed, 1, initial)) >= 1
    query = grid.send(next(iter(grid.contexts)), "query", RecordDict(
        {p.CONFIG: fed.config}))
    seen = _check(grid.replies, _stage_mode(cfg, release))
    assert client_gate.released(query) and reply_paths(query) == {f"{p.SITE}.name"}
    expected = ({gate.SECAGG_STAGE, gate.MASKED_TRAIN, gate.MASKED_EVALUATE}
                if cfg.secagg.mode == "on" else {gate.TRAIN, gate.EVALUATE})
    assert expected <= seen
