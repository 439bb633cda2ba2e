"""FedAvg as pure aggregation: each reply validated against the global adapter it was
sent, the accepted ones averaged by example count (through the round loop's collection,
:func:`fedcpt.server.round_loop.collect_train`)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedcpt.runfolder.records import weighted_mean
from fedcpt.server.round_loop import collect_evaluate, collect_train
from fedcpt.strategies.base import SiteEvalReport
from fedcpt.strategies.fedavg import AdapterFedAvg

SHAPES = {"layer.lora_A.weight": (4, 8), "layer.lora_B.weight": (8, 4)}
NODES = (11, 12, 13)


def _arrays(fill: float | None = None, seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({
        k: Array(np.full(s, fill, np.float32) if fill is not None
                 else rng.normal(size=s).astype(np.float32))
        for k, s in SHAPES.items()})


def _incoming(node_id: int, message_type: str = MessageType.TRAIN) -> Message:
    return Message(content=RecordDict(), dst_node_id=node_id, message_type=message_type)


def _reply(incoming: Message, site: str, arrays: ArrayRecord | None, num_examples: int,
           loss: float = 1.0) -> Message:
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss,
                                 "train-tokens": num_examples * 64, "train-seconds": 0.5}),
        "site": ConfigRecord({"name": site}),
    })
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=incoming)


def _eval_reply(incoming: Message, site: str, tokens: int, loss: float,
                base_loss: float) -> Message:
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": tokens, "domain-loss": loss,
                                 "domain-base-loss": base_loss, "domain-ece": 0.1}),
        "site": ConfigRecord({"name": site}),
    })
    return Message(content=content, reply_to=incoming)


pytestmark = pytest.mark.usefixtures("flower_task")  # Messages are built here


@pytest.fixture
def strategy() -> AdapterFedAvg:
    return AdapterFedAvg()


@pytest.fixture
def reference() -> ArrayRecord:
    return _arrays(fill=0.0)


@pytest.fixture
def instructions() -> list[Message]:
    """Round-1 training requests, one per node, sorted by node."""
    return [_incoming(n) for n in NODES]


def _aggregate(strategy, replies, reference, sampled=NODES):
    """Collect and validate ``replies`` as the round loop does, then aggregate: the
    average (None if nothing was accepted), the accepted reports and the failures."""
    collected = collect_train(1, replies, set(sampled), strategy, reference)
    arrays = (strategy.aggregate(list(collected.accepted.values()), reference)
              if collected.accepted else None)
    return arrays, collected.reports, collected.failures


def _without_timeouts(failures: list[str]) -> list[str]:
    """Failures other than sampled nodes that did not reply (tests often reply for some)."""
    return [f for f in failures if "no reply within the round timeout" not in f]


def _weighted_mean(updates: list[tuple[ArrayRecord, int]]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in updates)
    return {k: sum(a[k].numpy().astype(np.float64) * n for a, n in updates) / total
            for k in SHAPES}


def _assert_arrays_equal(result: ArrayRecord, expected: dict[str, np.ndarray]) -> None:
    assert set(result.keys()) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(result[key].numpy(), value, rtol=1e-6, atol=1e-7)


def test_aggregate_is_num_examples_weighted_mean(strategy, instructions, reference):
    updates = [(_arrays(seed=1), 10), (_arrays(seed=2), 30), (_arrays(seed=3), 60)]
    replies = [_reply(msg, f"site-{i}", arrays, n, loss=float(i + 1))
               for i, (msg, (arrays, n)) in enumerate(zip(instructions, updates, strict=True))]
    arrays, reports, failures = _aggregate(strategy, replies, reference)
    _assert_arrays_equal(arrays, _weighted_mean(updates))
    # not the plain mean: the weights matter
    plain = {k: np.mean([a[k].numpy() for a, _ in updates], axis=0) for k in SHAPES}
    assert not np.allclose(arrays["layer.lora_A.weight"].numpy(), plain["layer.lora_A.weight"])
    assert sum(r.num_examples for r in reports) == 100
    assert failures == []
    assert [r.site for r in reports] == ["site-0", "site-1", "site-2"]
    assert [r.num_examples for r in reports] == [10, 30, 60]
    assert all(r.bytes_up == 4 * (4 * 8 + 8 * 4) for r in reports)
    expected_norm = np.sqrt(sum(np.square(updates[0][0][k].numpy().astype(np.float64)).sum()
                                for k in SHAPES))
    assert reports[0].update_norm == pytest.approx(expected_norm)


def test_constant_updates_average_exactly(strategy, instructions, reference):
    replies = [_reply(instructions[0], "a", _arrays(fill=1.0), 1),
               _reply(instructions[1], "b", _arrays(fill=4.0), 3)]
    arrays, _, _ = _aggregate(strategy, replies, reference)
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), np.full(SHAPES[key], 3.25), rtol=1e-6)


def _bad_nan() -> ArrayRecord:
    bad = _arrays(seed=9)
    values = bad["layer.lora_B.weight"].numpy().copy()
    values[2, 1] = np.nan
    return ArrayRecord({"layer.lora_A.weight": bad["layer.lora_A.weight"],
                        "layer.lora_B.weight": Array(values)})


def _bad_shape() -> ArrayRecord:
    return ArrayRecord({"layer.lora_A.weight": Array(np.ones((4, 9), np.float32)),
                        "layer.lora_B.weight": Array(np.ones((8, 4), np.float32))})


def _bad_keys() -> ArrayRecord:
    return ArrayRecord({"layer.lora_A.weight": Array(np.ones((4, 8), np.float32))})


def _bad_dtype() -> ArrayRecord:
    return ArrayRecord({k: Array(np.ones(s, np.float64)) for k, s in SHAPES.items()})


@pytest.mark.parametrize(("make_bad", "reason"), [
    (_bad_nan, r"bad-site: update rejected: layer\.lora_B\.weight: contains NaN or Inf"),
    (_bad_shape, r"bad-site: update rejected: layer\.lora_A\.weight: expected "
                 r"float32\[4, 8\], got float32\[4, 9\]"),
    (_bad_keys, r"bad-site: update rejected: adapter keys differ"),
    (_bad_dtype, r"bad-site: update rejected: .*expected float32.*got float64"),
    (lambda: None, r"bad-site: update rejected: reply must carry exactly one 'arrays' record"),
])
def test_malformed_update_is_excluded(strategy, instructions, reference, make_bad, reason):
    good = [(_arrays(seed=1), 20), (_arrays(seed=2), 60)]
    replies = [
        _reply(instructions[0], "good-1", good[0][0], good[0][1]),
        _reply(instructions[1], "bad-site", make_bad(), 1000),
        _reply(instructions[2], "good-2", good[1][0], good[1][1]),
    ]
    arrays, reports, failures = _aggregate(strategy, replies, reference)
    _assert_arrays_equal(arrays, _weighted_mean(good))
    assert [r.site for r in reports] == ["good-1", "good-2"]
    assert len(failures) == 1
    assert re.search(reason, failures[0]), failures[0]


def test_reply_without_num_examples_is_rejected_not_fatal(strategy, instructions, reference):
    """One site sending incomplete metrics must not crash the round for everyone."""
    good = (_arrays(seed=1), 10)
    incomplete = Message(content=RecordDict({
        "arrays": _arrays(seed=2),
        "metrics": MetricRecord({"train-loss": 1.0, "train-seconds": 0.1}),
        "site": ConfigRecord({"name": "old-client"}),
    }), reply_to=instructions[1])
    replies = [_reply(instructions[0], "ok", *good), incomplete]
    arrays, reports, failures = _aggregate(strategy, replies, reference)
    _assert_arrays_equal(arrays, _weighted_mean([good]))
    assert [r.site for r in reports] == ["ok"]
    failures = _without_timeouts(failures)
    assert len(failures) == 1 and failures[0].startswith("old-client")


def test_error_reply_is_reported_and_excluded(strategy, instructions, reference):
    good = (_arrays(seed=5), 7)
    replies = [
        _reply(instructions[0], "ok", *good),
        Message(Error(code=3, reason="site ran out of memory"), reply_to=instructions[1]),
    ]
    arrays, reports, failures = _aggregate(strategy, replies, reference)
    _assert_arrays_equal(arrays, _weighted_mean([good]))
    assert [r.site for r in reports] == ["ok"]
    assert _without_timeouts(failures) == ["node-12: site ran out of memory"]


def test_updates_are_checked_against_the_global_adapter_they_were_sent(strategy,
                                                                      instructions):
    # round 2 sends a global adapter whose lora_A is (4, 9): that is now the valid shape
    new_reference = _bad_shape()
    replies = [_reply(instructions[0], "new-shape", _bad_shape(), 5),
               _reply(instructions[1], "old-shape", _arrays(seed=1), 5)]
    arrays, reports, failures = _aggregate(strategy, replies, new_reference)
    assert arrays["layer.lora_A.weight"].shape == (4, 9)
    assert [r.site for r in reports] == ["new-shape"]
    assert failures and failures[0].startswith("old-shape: update rejected")


def test_evaluation_replies_become_site_reports():
    incoming = [_incoming(n, MessageType.EVALUATE) for n in (11, 12)]
    replies = [_eval_reply(incoming[0], "a", tokens=100, loss=2.0, base_loss=3.0),
               _eval_reply(incoming[1], "b", tokens=300, loss=4.0, base_loss=5.0),
               Message(Error(code=1, reason="boom"), reply_to=_incoming(13))]
    reports = collect_evaluate(1, replies)
    assert weighted_mean([(r.loss, r.tokens) for r in reports]) == pytest.approx(
        (2.0 * 100 + 4.0 * 300) / 400)
    assert reports == [SiteEvalReport("a", 100, 2.0, 3.0, 0.1),
                       SiteEvalReport("b", 300, 4.0, 5.0, 0.1)]


def test_sampled_site_that_never_replies_is_reported(strategy, instructions, reference):
    replies = [_reply(msg, f"site-{i}", _arrays(seed=i), 10)
               for i, msg in enumerate(instructions[:2])]
    arrays, _, failures = _aggregate(strategy, replies, reference)
    assert arrays is not None
    assert failures == ["node-13: no reply within the round timeout"]


def test_evaluation_reply_missing_a_metric_is_skipped_not_fatal():
    incoming = [_incoming(n, MessageType.EVALUATE) for n in (11, 12)]
    good = _eval_reply(incoming[0], "north", tokens=100, loss=2.0, base_loss=3.0)
    bad = Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 5}),
                                      "site": ConfigRecord({"name": "south"})}),
                  reply_to=incoming[1])
    reports = collect_evaluate(1, [good, bad])
    assert weighted_mean([(r.loss, r.tokens) for r in reports]) == pytest.approx(2.0)
    assert [r.site for r in reports] == ["north"]


def test_update_beyond_the_norm_bound_is_rejected(instructions, reference):
    bounded = AdapterFedAvg(max_update_norm=1.0)
    small, huge = _arrays(fill=0.01), _arrays(fill=5.0)
    replies = [_reply(instructions[0], "calm", small, 10),
               _reply(instructions[1], "wild", huge, 10)]
    arrays, _, failures = _aggregate(bounded, replies, reference)
    _assert_arrays_equal(arrays, _weighted_mean([(small, 10)]))
    assert any(f.startswith("wild: update rejected: update norm") and "exceeds the bound 1.0"
               in f for f in failures)


def test_site_claiming_more_examples_than_it_can_train_is_rejected(instructions, reference):
    capped = AdapterFedAvg(max_examples=80)
    honest, greedy = _arrays(seed=1), _arrays(seed=2)
    replies = [_reply(instructions[0], "honest", honest, 80),
               _reply(instructions[1], "greedy", greedy, 10**12)]
    arrays, _, failures = _aggregate(capped, replies, reference)
    _assert_arrays_equal(arrays, _weighted_mean([(honest, 80)]))
    assert any(f.startswith("greedy: update rejected: num-examples") for f in failures)


# --- site-level DP: every aggregated site weighs 1/n, whatever num-examples it claims ----
def _site_level_strategy(clip: float):
    """The aggregator the server builds for a run with site-level DP (1000 examples a site
    may claim at most, so a 1000× claim passes the example bound)."""
    from fedcpt.config import PrivacyConfig, RunConfig, SecAggConfig, SiteConfig, TrainConfig
    from fedcpt.server.protocols import round_protocol

    cfg = RunConfig(sites=tuple(SiteConfig(name=s, data=("unused",)) for s in "abc"),
                    train=TrainConfig(local_steps=100, batch_size=10),
                    privacy=PrivacyConfig(user_level=True, user_clipping_norm=clip),
                    secagg=SecAggConfig(mode="off"))
    return round_protocol(cfg).aggregator


def _planted(norm: float) -> ArrayRecord:
    """An update whose delta from the zero reference has L2 norm ``norm``, in one direction."""
    size = sum(int(np.prod(s)) for s in SHAPES.values())
    return ArrayRecord({k: Array(np.full(s, norm / np.sqrt(size), np.float32))
                        for k, s in SHAPES.items()})


def _norm(arrays: ArrayRecord) -> float:
    return float(np.sqrt(sum((arrays[k].numpy().astype(np.float64) ** 2).sum()
                             for k in SHAPES)))


@pytest.mark.parametrize("planted_at", ["heavy", "light"])
def test_site_level_dp_bounds_each_sites_influence_by_c_over_n(instructions, reference,
                                                               planted_at):
    """One site reports 1000× the others' num-examples: a curious site inflating its claim,
    or two curious sites deflating theirs to single out an honest site's update. Under
    site-level DP the noise is σ·C/n, so each site's clipped update must move the mean by
    C/n exactly, never by its claimed share (1000/1002 of C for the heavy one)."""
    clip = 0.5
    strategy = _site_level_strategy(clip)
    claims = {"heavy": 1000, "light": 1, "other": 1}
    replies = [_reply(msg, site, _planted(clip) if site == planted_at else reference, n)
               for msg, (site, n) in zip(instructions, claims.items(), strict=True)]
    arrays, reports, failures = _aggregate(strategy, replies, reference)
    assert _without_timeouts(failures) == [] and len(reports) == 3
    assert _norm(arrays) == pytest.approx(clip / 3, rel=1e-5)


def test_site_level_dp_clips_an_update_the_site_left_unclipped(instructions, reference):
    """A site that skips the clipping mod and sends 10·C moves the mean by C/n at most."""
    clip = 0.5
    replies = [_reply(instructions[0], "unclipped", _planted(10 * clip), 1000),
               _reply(instructions[1], "b", reference, 1000),
               _reply(instructions[2], "c", reference, 1000)]
    arrays, _, _ = _aggregate(_site_level_strategy(clip), replies, reference)
    assert _norm(arrays) == pytest.approx(clip / 3, rel=1e-5)
