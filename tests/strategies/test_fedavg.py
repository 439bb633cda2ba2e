"""AdapterFedAvg: example-weighted averaging of adapters, rejecting malformed updates."""

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
from flwr.supercore.task_identity import TaskIdentity

from fedcpt.exceptions import RoundFailed
from fedcpt.strategies.base import SiteEvalReport, SiteTrainReport
from fedcpt.strategies.fedavg import AdapterFedAvg

SHAPES = {"layer.lora_A.weight": (4, 8), "layer.lora_B.weight": (8, 4)}


class RecordingListener:
    def __init__(self) -> None:
        self.train: list[tuple[int, list[SiteTrainReport], list[str]]] = []
        self.evaluate: list[tuple[int, list[SiteEvalReport]]] = []

    def on_train(self, server_round, reports, failures, aggregated=True):
        self.train.append((server_round, list(reports), list(failures)))

    def on_evaluate(self, server_round, reports):
        self.evaluate.append((server_round, list(reports)))


class FakeGrid:
    """Just enough of a Grid for configure_train: three connected nodes."""

    def __init__(self, node_ids=(11, 12, 13)) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


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


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Messages are created inside a running ServerApp; act as one (SuperLink node 0)."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


@pytest.fixture
def listener() -> RecordingListener:
    return RecordingListener()


@pytest.fixture
def strategy(listener) -> AdapterFedAvg:
    s = AdapterFedAvg(min_sites=1, listener=listener, min_train_nodes=3, min_evaluate_nodes=3,
                      min_available_nodes=3)
    return s


@pytest.fixture
def reference() -> ArrayRecord:
    return _arrays(fill=0.0)


@pytest.fixture
def instructions(strategy, reference) -> list[Message]:
    """configure_train for round 1: records the reference adapter, one message per node."""
    messages = list(strategy.configure_train(1, reference, ConfigRecord({"k": "v"}),
                                             FakeGrid()))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]
    assert all(m.content["arrays"] is reference for m in messages)
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


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


def test_aggregate_is_num_examples_weighted_mean(strategy, instructions, listener):
    updates = [(_arrays(seed=1), 10), (_arrays(seed=2), 30), (_arrays(seed=3), 60)]
    replies = [_reply(msg, f"site-{i}", arrays, n, loss=float(i + 1))
               for i, (msg, (arrays, n)) in enumerate(zip(instructions, updates, strict=True))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    _assert_arrays_equal(arrays, _weighted_mean(updates))
    # not the plain mean: the weights matter
    plain = {k: np.mean([a[k].numpy() for a, _ in updates], axis=0) for k in SHAPES}
    assert not np.allclose(arrays["layer.lora_A.weight"].numpy(), plain["layer.lora_A.weight"])
    assert metrics["num-examples"] == 100
    (server_round, reports, failures), = listener.train
    assert server_round == 1 and failures == []
    assert [r.site for r in reports] == ["site-0", "site-1", "site-2"]
    assert [r.num_examples for r in reports] == [10, 30, 60]
    assert all(r.bytes_up == 4 * (4 * 8 + 8 * 4) for r in reports)
    expected_norm = np.sqrt(sum(np.square(updates[0][0][k].numpy().astype(np.float64)).sum()
                                for k in SHAPES))
    assert reports[0].update_norm == pytest.approx(expected_norm)


def test_constant_updates_average_exactly(strategy, instructions):
    replies = [_reply(instructions[0], "a", _arrays(fill=1.0), 1),
               _reply(instructions[1], "b", _arrays(fill=4.0), 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
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
def test_malformed_update_is_excluded(strategy, instructions, listener, make_bad, reason):
    good = [(_arrays(seed=1), 20), (_arrays(seed=2), 60)]
    replies = [
        _reply(instructions[0], "good-1", good[0][0], good[0][1]),
        _reply(instructions[1], "bad-site", make_bad(), 1000),
        _reply(instructions[2], "good-2", good[1][0], good[1][1]),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    _assert_arrays_equal(arrays, _weighted_mean(good))
    (_, reports, failures), = listener.train
    assert [r.site for r in reports] == ["good-1", "good-2"]
    assert len(failures) == 1
    assert re.search(reason, failures[0]), failures[0]


def test_reply_without_num_examples_is_rejected_not_fatal(strategy, instructions, listener):
    """One site sending incomplete metrics must not crash the round for everyone."""
    good = (_arrays(seed=1), 10)
    incomplete = Message(content=RecordDict({
        "arrays": _arrays(seed=2),
        "metrics": MetricRecord({"train-loss": 1.0, "train-seconds": 0.1}),
        "site": ConfigRecord({"name": "old-client"}),
    }), reply_to=instructions[1])
    replies = [_reply(instructions[0], "ok", *good), incomplete]
    arrays, _ = strategy.aggregate_train(1, replies)
    _assert_arrays_equal(arrays, _weighted_mean([good]))
    (_, reports, failures), = listener.train
    assert [r.site for r in reports] == ["ok"]
    failures = _without_timeouts(failures)
    assert len(failures) == 1 and failures[0].startswith("old-client")


def test_error_reply_is_reported_and_excluded(strategy, instructions, listener):
    good = (_arrays(seed=5), 7)
    replies = [
        _reply(instructions[0], "ok", *good),
        Message(Error(code=3, reason="site ran out of memory"), reply_to=instructions[1]),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    _assert_arrays_equal(arrays, _weighted_mean([good]))
    (_, reports, failures), = listener.train
    assert [r.site for r in reports] == ["ok"]
    assert _without_timeouts(failures) == ["node-12: site ran out of memory"]


def test_fewer_than_min_sites_keeps_global(listener, reference):
    strategy = AdapterFedAvg(min_sites=2, listener=listener, min_train_nodes=3,
                             min_available_nodes=3)
    messages = sorted(strategy.configure_train(1, reference, ConfigRecord({}), FakeGrid()),
                      key=lambda m: m.metadata.dst_node_id)
    replies = [
        _reply(messages[0], "good", _arrays(seed=1), 10),
        _reply(messages[1], "nan", _bad_nan(), 10),
        _reply(messages[2], "shape", _bad_shape(), 10),
    ]
    assert strategy.aggregate_train(1, replies) == (None, None)
    (_, reports, failures), = listener.train
    assert [r.site for r in reports] == ["good"]
    assert len(failures) == 3 and "fewer than min_sites=2" in failures[-1]


class AnsweringGrid(FakeGrid):
    """A grid whose nodes answer a re-sent round with valid updates."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[int] = []

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent += [m.metadata.dst_node_id for m in messages]
        return [_reply(m, f"site-{m.metadata.dst_node_id}", _arrays(seed=i), 10)
                for i, m in enumerate(messages)]


def _failing_round(strategy, reference, grid):
    messages = list(strategy.configure_train(1, reference, ConfigRecord({}), grid))
    return [Message(Error(code=1, reason="node crashed"), reply_to=m) for m in messages]


def test_round_below_min_sites_is_sent_again_and_aggregated(listener, reference):
    strategy = AdapterFedAvg(min_sites=2, listener=listener, min_train_nodes=3,
                             min_available_nodes=3, round_retries=1, stop_on_failed_round=True)
    grid = AnsweringGrid()
    arrays, metrics = strategy.aggregate_train(1, _failing_round(strategy, reference, grid))

    assert sorted(grid.sent) == [11, 12, 13]  # the retry went to every sampled site
    assert arrays is not None and metrics["num-examples"] == 30
    (_, reports, failures), = listener.train
    assert len(reports) == 3
    assert sorted(failures) == ["attempt 1: 0 valid updates, fewer than min_sites=2",
                               "attempt 1: node-11: node crashed",
                               "attempt 1: node-12: node crashed",
                               "attempt 1: node-13: node crashed"]


def test_round_failing_after_its_retries_stops_the_run_with_a_clear_error(listener,
                                                                          reference):
    strategy = AdapterFedAvg(min_sites=2, listener=listener, min_train_nodes=3,
                             min_available_nodes=3, round_retries=2, stop_on_failed_round=True)
    grid = FakeGrid()
    grid.send_and_receive = lambda messages, timeout=None: [
        Message(Error(code=1, reason="node crashed"), reply_to=m) for m in messages]
    with pytest.raises(RoundFailed, match=r"round 1 was not aggregated.*--resume"):
        strategy.aggregate_train(1, _failing_round(strategy, reference, grid))
    (_, reports, failures), = listener.train
    assert reports == [] and len(failures) == 12  # 3 attempts × (3 sites + the shortfall)
    assert sum("fewer than min_sites=2" in f for f in failures) == 3


def test_all_rejected_with_min_sites_one(strategy, instructions, listener):
    replies = [_reply(instructions[0], "nan", _bad_nan(), 10)]
    assert strategy.aggregate_train(1, replies) == (None, None)
    (_, reports, failures), = listener.train
    assert reports == [] and len(_without_timeouts(failures)) == 2
    assert "nan" in failures[0] and "fewer than min_sites=1" in failures[-1]


def test_updates_are_checked_against_the_latest_configure_train(strategy, instructions,
                                                               listener):
    # round 2 sends a global adapter whose lora_A is (4, 9): that is now the valid shape
    new_reference = _bad_shape()
    messages = sorted(strategy.configure_train(2, new_reference, ConfigRecord({}), FakeGrid()),
                      key=lambda m: m.metadata.dst_node_id)
    assert all(m.content["config"]["server-round"] == 2 for m in messages)
    replies = [_reply(messages[0], "new-shape", _bad_shape(), 5),
               _reply(messages[1], "old-shape", _arrays(seed=1), 5)]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays["layer.lora_A.weight"].shape == (4, 9)
    (_, reports, failures), = listener.train
    assert [r.site for r in reports] == ["new-shape"]
    assert failures and failures[0].startswith("old-shape: update rejected")


def test_aggregate_evaluate_reports_sites(strategy, listener):
    incoming = [_incoming(n, MessageType.EVALUATE) for n in (11, 12)]
    replies = [_eval_reply(incoming[0], "a", tokens=100, loss=2.0, base_loss=3.0),
               _eval_reply(incoming[1], "b", tokens=300, loss=4.0, base_loss=5.0),
               Message(Error(code=1, reason="boom"), reply_to=_incoming(13))]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["domain-loss"] == pytest.approx((2.0 * 100 + 4.0 * 300) / 400)
    (server_round, reports), = listener.evaluate
    assert server_round == 1
    assert reports == [SiteEvalReport("a", 100, 2.0, 3.0, 0.1),
                       SiteEvalReport("b", 300, 4.0, 5.0, 0.1)]


def test_sampled_site_that_never_replies_is_reported(strategy, instructions, listener):
    replies = [_reply(msg, f"site-{i}", _arrays(seed=i), 10)
               for i, msg in enumerate(instructions[:2])]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    (_, _, failures), = listener.train
    assert failures == ["node-13: no reply within the round timeout"]


def test_evaluation_reply_missing_a_metric_is_skipped_not_fatal(strategy, listener):
    incoming = [_incoming(n, MessageType.EVALUATE) for n in (11, 12)]
    good = _eval_reply(incoming[0], "north", tokens=100, loss=2.0, base_loss=3.0)
    bad = Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 5}),
                                      "site": ConfigRecord({"name": "south"})}),
                  reply_to=incoming[1])
    metrics = strategy.aggregate_evaluate(1, [good, bad])
    assert metrics["domain-loss"] == pytest.approx(2.0)
    (_, reports), = listener.evaluate
    assert [r.site for r in reports] == ["north"]


def _configured(listener, reference, **kwargs) -> tuple[AdapterFedAvg, list[Message]]:
    """A strategy with extra options, and its round-1 instructions sorted by node."""
    strategy = AdapterFedAvg(min_sites=1, listener=listener, min_train_nodes=3,
                             min_evaluate_nodes=3, min_available_nodes=3, **kwargs)
    messages = strategy.configure_train(1, reference, ConfigRecord({"k": "v"}), FakeGrid())
    return strategy, sorted(messages, key=lambda m: m.metadata.dst_node_id)


def test_update_beyond_the_norm_bound_is_rejected(listener, reference):
    bounded, messages = _configured(listener, reference, max_update_norm=1.0)
    small, huge = _arrays(fill=0.01), _arrays(fill=5.0)
    replies = [_reply(messages[0], "calm", small, 10), _reply(messages[1], "wild", huge, 10)]
    arrays, _ = bounded.aggregate_train(1, replies)
    _assert_arrays_equal(arrays, _weighted_mean([(small, 10)]))
    (_, _, failures), = listener.train
    assert any(f.startswith("wild: update rejected: update norm") and "exceeds the bound 1.0"
               in f for f in failures)


def test_site_claiming_more_examples_than_it_can_train_is_rejected(listener, reference):
    capped, messages = _configured(listener, reference, max_examples=80)
    honest, greedy = _arrays(seed=1), _arrays(seed=2)
    replies = [_reply(messages[0], "honest", honest, 80),
               _reply(messages[1], "greedy", greedy, 10**12)]
    arrays, _ = capped.aggregate_train(1, replies)
    _assert_arrays_equal(arrays, _weighted_mean([(honest, 80)]))
