"""Bad client updates: each sent beside a good one through the round loop's collection
(:func:`fedcpt.server.round_loop.collect_train`); handled when it is kept out of the
average with a reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcpt.exceptions import UpdateRejected
from fedcpt.server.round_loop import collect_train
from fedcpt.strategies.fedavg import AdapterFedAvg
from fedcpt.testing.bad_inputs.judge import BadInput
from fedcpt.testing.site_round import task_identity

SHAPES = {"layers.0.q_proj.lora_A.weight": (4, 8), "layers.0.q_proj.lora_B.weight": (8, 4)}
GOOD_EXAMPLES = 16


def _arrays(fill: float = 0.0, shapes: dict | None = None, dtype=np.float32) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, fill, dtype)) for k, s in (shapes or SHAPES).items()})


def _reply(request: Message, site: str, content: RecordDict) -> Message:
    content = RecordDict({**dict(content.items()), "site": ConfigRecord({"name": site})})
    return Message(content=content, reply_to=request)


def _metrics(**overrides: float) -> MetricRecord:
    values = {"num-examples": GOOD_EXAMPLES, "train-seconds": 0.5}
    values.update(overrides)
    return MetricRecord({k: v for k, v in values.items() if v is not None})


def _update(build: Callable[[], RecordDict], max_update_norm: float = 0.0,
            ) -> Callable[[Path], object]:
    """Aggregate a good reply and the bad one; handled if the bad one was rejected (kept out
    of the average, with a reason) — raised here as that UpdateRejected."""
    def attempt(folder: Path) -> object:
        strategy = AdapterFedAvg(max_examples=32, max_update_norm=max_update_norm)
        reference = _arrays(0.0)
        with task_identity():
            requests = [Message(content=RecordDict(), dst_node_id=n, message_type="train")
                        for n in (1, 2)]
            good = _reply(requests[0], "good", RecordDict(
                {"arrays": _arrays(1.0), "metrics": _metrics()}))
            bad = _reply(requests[1], "bad", build())
            collected = collect_train(1, [good, bad], {1, 2}, strategy, reference)
        failures = collected.failures
        arrays = (strategy.aggregate(list(collected.accepted.values()), reference)
                  if collected.accepted else None)
        rejected = [f for f in failures if f.startswith("bad: update rejected: ")]
        averaged_good_only = arrays is not None and all(
            np.array_equal(arrays[k].numpy(), np.full(s, 1.0, np.float32))
            for k, s in SHAPES.items())
        if rejected and averaged_good_only:
            raise UpdateRejected(rejected[0].removeprefix("bad: update rejected: "))
        return f"aggregated; failures {failures}"
    return attempt


def _with(arrays: ArrayRecord | None = None, **metrics: float | None) -> Callable[[], RecordDict]:
    def build() -> RecordDict:
        content = RecordDict({"metrics": _metrics(**metrics)})
        if arrays is not None:
            content["arrays"] = arrays
        return content
    return build


def _poisoned(value: float) -> ArrayRecord:
    arrays = {k: np.full(s, 1.0, np.float32) for k, s in SHAPES.items()}
    next(iter(arrays.values()))[0, 0] = value
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


UPDATE = [
    BadInput("update-nan", "update", _update(_with(_poisoned(float("nan")))),
             r"contains NaN or Inf"),
    BadInput("update-inf", "update", _update(_with(_poisoned(float("inf")))),
             r"contains NaN or Inf"),
    BadInput("update-missing-tensor", "update", _update(_with(_arrays(
        1.0, dict(list(SHAPES.items())[:1])))), r"adapter keys differ \(missing"),
    BadInput("update-extra-tensor", "update", _update(_with(_arrays(
        1.0, {**SHAPES, "layers.0.k_proj.lora_A.weight": (4, 8)}))),
        r"unexpected \['layers.0.k_proj"),
    BadInput("update-wrong-shape", "update", _update(_with(_arrays(
        1.0, {k: (s[1], s[0]) for k, s in SHAPES.items()}))), r"expected float32\[4, 8\]"),
    BadInput("update-wrong-dtype", "update", _update(_with(_arrays(1.0, dtype=np.float64))),
             r"expected float32.*got float64"),
    BadInput("update-huge-norm", "update", _update(_with(_arrays(1e6)), max_update_norm=10.0),
             r"update norm .* exceeds the bound 10"),
    BadInput("update-extra-array-record", "update", _update(lambda: RecordDict({
        "arrays": _arrays(1.0), "more": _arrays(1.0), "metrics": _metrics()})),
        r"exactly one 'arrays' record"),
    BadInput("update-no-arrays", "update", _update(_with(None)), r"exactly one 'arrays' record"),
    BadInput("update-no-metrics", "update", _update(lambda: RecordDict({"arrays": _arrays(1.0)})),
             r"no 'metrics' record"),
    BadInput("update-missing-num-examples", "update",
             _update(_with(_arrays(1.0), **{"num-examples": None})),
             r"lack finite \['num-examples'\]"),
    BadInput("update-nan-metric", "update",
             _update(_with(_arrays(1.0), **{"train-seconds": float("nan")})),
             r"lack finite \['train-seconds'\]"),
    BadInput("update-num-examples-too-big", "update",
             _update(_with(_arrays(1.0), **{"num-examples": 10**9})),
             r"num-examples 1e\+09 outside \(0, 32\]"),
    BadInput("update-num-examples-zero", "update",
             _update(_with(_arrays(1.0), **{"num-examples": 0})), r"num-examples 0 outside"),
    BadInput("update-num-examples-negative", "update",
             _update(_with(_arrays(1.0), **{"num-examples": -16})), r"num-examples -16 outside"),
]
