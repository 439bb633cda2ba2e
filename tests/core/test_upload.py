"""Compact uploads: the wire forms of a site's update (fp32, bf16, fp16, int8), their round
trip, error feedback over rounds, and the server's refusal of bad encoded payloads."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedcpt.config import load_config
from fedcpt.core.adapters import count_bytes
from fedcpt.core.ranks import pad, truncate
from fedcpt.core.upload import SCALE_SUFFIX, decode_upload, encode_upload
from fedcpt.exceptions import ConfigError, UpdateRejected
from fedcpt.strategies.fedavg import AdapterFedAvg

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
SHAPES = {A: (8, 64), B: (32, 8)}
TOLERANCE = {"fp32": 0.0, "bf16": 2**-8, "fp16": 2**-11, "int8": 0.5 / 127}


def _arrays(seed: int, scale: float = 1.0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array((rng.normal(size=s) * scale).astype(np.float32))
                        for k, s in SHAPES.items()})


def _plus(x: ArrayRecord, y: ArrayRecord) -> ArrayRecord:
    return ArrayRecord({k: Array(x[k].numpy() + y[k].numpy()) for k in x.keys()})


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("rank", [8, 3])
def test_round_trip(dtype, rank):
    reference = _arrays(0)
    update = pad(truncate(_plus(reference, _arrays(1, 1e-2)), rank), reference)
    wire, residual = encode_upload(update, reference, rank, dtype)
    decoded, got_rank = decode_upload(wire, reference, dtype)
    assert got_rank == rank
    for key in SHAPES:
        delta = update[key].numpy() - reference[key].numpy()
        err = np.abs(decoded[key].numpy() - update[key].numpy())
        assert err.max() <= TOLERANCE[dtype] * np.abs(delta).max() + 1e-7
        # the coordinates the site did not train come back exactly as the global ones
        untrained = (slice(rank, None), slice(None)) if key == A else (slice(None),
                                                                       slice(rank, None))
        np.testing.assert_array_equal(decoded[key].numpy()[untrained],
                                      reference[key].numpy()[untrained])
    assert (residual is None) == (dtype == "fp32")


@pytest.mark.parametrize("dtype, ratio", [("fp32", 1.0), ("bf16", 0.5), ("fp16", 0.5),
                                          ("int8", 0.25)])
def test_bytes_shrink_with_dtype_and_rank(dtype, ratio):
    reference = _arrays(0)
    full = count_bytes(reference)
    update = _plus(reference, _arrays(1, 1e-2))
    wire, _ = encode_upload(update, reference, 8, dtype)
    scales = 4 * len(SHAPES) if dtype == "int8" else 0
    assert count_bytes(wire) == full * ratio + scales
    low, _ = encode_upload(update, reference, 2, dtype)
    assert count_bytes(low) == full * ratio * 2 / 8 + scales


def test_error_feedback_keeps_the_accumulated_error_bounded():
    """int8 with one scale per tensor rounds a coordinate 400x smaller than the largest to
    zero every round; without feedback the loss grows with the rounds, with it it stays
    below one quantisation step."""
    reference = ArrayRecord({A: Array(np.zeros((2, 2), np.float32)),
                             B: Array(np.zeros((2, 2), np.float32))})
    step = ArrayRecord({A: Array(np.array([[1.0, 0.0025], [0.5, -0.001]], np.float32)),
                        B: Array(np.array([[0.3, 0.0], [0.0, 0.002]], np.float32))})
    rounds = 50
    sent_plain = sent_fed = 0.0
    residual = None
    for _ in range(rounds):
        wire, _ = encode_upload(step, reference, 2, "int8")
        sent_plain = sent_plain + decode_upload(wire, reference, "int8")[0][A].numpy()
        wire, residual = encode_upload(step, reference, 2, "int8", residual)
        sent_fed = sent_fed + decode_upload(wire, reference, "int8")[0][A].numpy()
    truth = step[A].numpy() * rounds
    plain_error, fed_error = np.abs(sent_plain - truth).max(), np.abs(sent_fed - truth).max()
    assert plain_error >= 0.0025 * rounds  # 0.0025 lost every round, at least
    assert fed_error <= 1.0 / 127 / 2 + 1e-6  # at most half a step, whatever the rounds


def _reply(wire: ArrayRecord) -> Message:
    incoming = Message(content=RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    return Message(content=RecordDict({
        "arrays": wire, "site": ConfigRecord({"name": "curious"}),
        "metrics": MetricRecord({"num-examples": 8, "train-seconds": 0.1})}),
        reply_to=incoming)


def _encoded(dtype: str, rank: int = 8) -> ArrayRecord:
    reference = _arrays(0)
    return encode_upload(_plus(reference, _arrays(1, 1e-2)), reference, rank, dtype)[0]


def _with(wire: ArrayRecord, key: str, value: np.ndarray | None) -> ArrayRecord:
    items = {k: v for k, v in wire.items() if k != key}
    if value is not None:
        items[key] = Array(value)
    return ArrayRecord(items)


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8"])
def test_the_server_accepts_a_well_formed_compact_upload(dtype):
    reference = _arrays(0)
    arrays, report = AdapterFedAvg(upload_dtype=dtype).validate(_reply(_encoded(dtype, 3)),
                                                                reference)
    assert report.bytes_up == count_bytes(_encoded(dtype, 3))
    assert arrays[A].numpy().shape == SHAPES[A]


def _nan_fp16() -> ArrayRecord:
    wire = _encoded("fp16")
    bad = wire[A].numpy().copy()
    bad[0, 0] = np.nan
    return _with(wire, A, bad)


def _bad_scale(value) -> ArrayRecord:
    return _with(_encoded("int8"), A + SCALE_SUFFIX, value)


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("dtype, wire, match", [
    ("fp16", _nan_fp16, r"contains NaN or Inf"),
    ("fp16", lambda: _with(_encoded("fp16"), A, np.full((8, 64), 7e4, np.float32)),
     r"travels as float16, got float32"),
    ("int8", lambda: _encoded("fp32"), r"int8 upload needs one scale per tensor"),
    ("bf16", lambda: _encoded("int8"), r"carries no scales"),
    ("int8", lambda: _bad_scale(np.array(np.nan, np.float32)), r"one finite float32 >= 0"),
    ("int8", lambda: _bad_scale(np.array(-1.0, np.float32)), r"one finite float32 >= 0"),
    ("int8", lambda: _bad_scale(np.ones(3, np.float32)), r"one finite float32 >= 0"),
    ("int8", lambda: _bad_scale(np.array(1e39, np.float64)), r"one finite float32 >= 0"),
    ("int8", lambda: _bad_scale(None), r"tensors without: \['m.q_proj.lora_A.weight'\]"),
    ("fp16", lambda: _with(_encoded("fp16"), A, np.zeros((8, 65), np.float16)),
     r"expected shape \[8, 64\]"),
    ("fp16", lambda: _with(_encoded("fp16"), A, np.zeros((9, 64), np.float16)),
     r"different ranks"),
    ("fp16", lambda: _with(_with(_encoded("fp16"), A, np.zeros((9, 64), np.float16)), B,
                           np.zeros((32, 9), np.float16)), r"rank 9 exceeds the global"),
    ("fp16", lambda: _with(_encoded("fp16"), A, np.zeros(3, np.float16)),
     r"a LoRA tensor is a matrix"),
    ("fp16", lambda: _with(_encoded("fp16"), "m.embed.weight", np.zeros((2, 2), np.float16)),
     r"unexpected \[.m.embed.weight.\]"),
    ("fp32", lambda: _with(_encoded("fp32"), B, None), r"missing \['m.q_proj.lora_B.weight'\]"),
    ("int8", lambda: _with(_encoded("int8"), A, np.full((8, 64), 1e30, np.float32)),
     r"travels as int8, got float32"),
])
def test_the_server_rejects_a_bad_encoded_payload(dtype, wire, match):
    """What a curious or malicious site could send instead of its encoded update."""
    with pytest.raises(UpdateRejected, match=match):
        AdapterFedAvg(upload_dtype=dtype).validate(_reply(wire()), _arrays(0))


@pytest.mark.usefixtures("flower_task")
def test_a_huge_int8_scale_is_caught_by_the_norm_bound():
    wire = _bad_scale(np.array(1e30, np.float32))
    with pytest.raises(UpdateRejected, match=r"(exceeds the bound 5|NaN or Inf)"):
        AdapterFedAvg(upload_dtype="int8", max_update_norm=5.0).validate(_reply(wire),
                                                                         _arrays(0))


def test_compact_uploads_are_a_config_error_under_secagg():
    refused = r"`federation.upload_dtype` must be \"fp32\" under secure aggregation"
    with pytest.raises(ConfigError, match=refused):
        load_config("smoke", overrides=["secagg.mode=on", "federation.upload_dtype=int8"])
    auto = load_config("smoke", overrides=["federation.upload_dtype=bf16"])  # secagg: auto
    assert auto.with_secagg_resolved(deployment=False).federation.upload_dtype == "bf16"
    with pytest.raises(ConfigError, match=refused):  # a deployment turns SecAgg on
        auto.with_secagg_resolved(deployment=True)
    with pytest.raises(ConfigError, match=r"must be one of \['fp32', 'bf16', 'fp16', 'int8'\]"):
        load_config("smoke", overrides=["federation.upload_dtype=int4"])
