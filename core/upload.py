"""What a plain (not secure-aggregated) training reply carries: the site's rank-r adapter,
in fp32 or compressed (``federation.upload_dtype``), and how the server reads it back.

- ``fp32``: the rank-r adapter values, as trained.
- ``bf16`` / ``fp16``: the rank-r *update* (adapter − global) rounded to nearest; bf16
  travels as its 16 bits in a uint16 array (numpy has no bf16).
- ``int8``: the update, per tensor, as ``round(Δ / s)`` in [−127, 127] with the float32
  scale ``s = max|Δ| / 127`` beside it (key ``<tensor>#scale``).

The compressed forms send the update, not the adapter: an update is small beside the
adapter values, so its rounding error stays small beside the change it carries. They use
error feedback (Seide et al., 2014; Karimireddy et al., 2019, "Error Feedback Fixes
SignSGD", https://arxiv.org/abs/1901.09847): what rounding lost in one round is added to
the site's next update, so the errors do not accumulate over rounds. The residual stays at
the site (:mod:`fedcpt.client.upload`). Rounding is deterministic: the same update and
residual always encode to the same bytes.

Under DP the encoding runs after DP-SGD, on its output: post-processing, at no privacy
cost. Under secure aggregation the sites' updates are already quantised to integers for
masking (:mod:`fedcpt.privacy.secagg.encoding`): that is the compression there, and the
config refuses a second one.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedcpt.core.ranks import max_rank, pad, truncate
from fedcpt.exceptions import UpdateRejected

UploadDtype = Literal["fp32", "bf16", "fp16", "int8"]
SCALE_SUFFIX = "#scale"  # a peft tensor name never contains '#'
INT8_LEVELS = 127
WIRE_DTYPES = {"bf16": np.dtype(np.uint16), "fp16": np.dtype(np.float16),
               "int8": np.dtype(np.int8)}


def encode_upload(update: ArrayRecord, reference: ArrayRecord, rank: int,
                  dtype: UploadDtype, residual: ArrayRecord | None = None,
                  ) -> tuple[ArrayRecord, ArrayRecord | None]:
    """The wire form of a site's max-rank-layout ``update`` trained at ``rank`` from the
    global ``reference``, and the new residual (None for fp32). ``residual`` is the error
    left by the previous round's encoding (rank-r shapes; None: none)."""
    trained = truncate(update, rank)
    if dtype == "fp32":
        return trained, None
    base = truncate(reference, rank)
    wire, new_residual = {}, {}
    for key in trained.keys():
        target = trained[key].numpy().astype(np.float32) - base[key].numpy()
        if residual is not None:
            target = target + residual[key].numpy()
        encoded, scale = _encode(target, dtype)
        wire[key] = Array(encoded)
        if scale is not None:
            wire[key + SCALE_SUFFIX] = Array(scale)
        new_residual[key] = Array(target - _decode(encoded, scale, dtype))
    return ArrayRecord(wire), ArrayRecord(new_residual)


def decode_upload(wire: ArrayRecord, reference: ArrayRecord, dtype: UploadDtype,
                  ) -> tuple[ArrayRecord, int]:
    """The site's adapter in ``reference``'s max-rank layout (fp32) and its rank, from a
    reply's wire record; UpdateRejected if the record is not exactly ``dtype``'s layout
    (keys, one rank ≤ the global one, wire dtypes, finite non-negative int8 scales).
    Finite adapter values and the norm bound are checked on the result by the caller."""
    if dtype == "fp32":
        padded = pad(wire, reference)
        return padded, max_rank(wire)
    scales = {k.removesuffix(SCALE_SUFFIX) for k in wire.keys() if k.endswith(SCALE_SUFFIX)}
    tensors = ArrayRecord({k: v for k, v in wire.items() if not k.endswith(SCALE_SUFFIX)})
    if dtype == "int8" and scales != set(tensors.keys()):
        unscaled = sorted(set(tensors.keys()) - scales)[:3]
        stray = sorted(scales - set(tensors.keys()))[:3]
        raise UpdateRejected(f"an int8 upload needs one scale per tensor and no other "
                             f"(tensors without: {unscaled}, scales without a tensor: {stray})")
    if dtype != "int8" and scales:
        raise UpdateRejected(f"a {dtype} upload carries no scales, got {sorted(scales)[:3]}")
    for key, value in tensors.items():
        if value.numpy().dtype != WIRE_DTYPES[dtype]:
            raise UpdateRejected(f"{key}: a {dtype} upload travels as {WIRE_DTYPES[dtype]}, "
                                 f"got {value.numpy().dtype}")
    if set(tensors.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(tensors.keys()))[:3]
        extra = sorted(set(tensors.keys()) - set(reference.keys()))[:3]
        raise UpdateRejected(f"adapter keys differ (missing {missing}, unexpected {extra})")
    rank = max_rank(tensors)
    if rank > max_rank(reference):
        raise UpdateRejected(f"rank {rank} exceeds the global adapter's {max_rank(reference)}")
    base = truncate(reference, rank)
    decoded = {}
    for key, value in tensors.items():
        if value.numpy().shape != base[key].numpy().shape:
            raise UpdateRejected(f"{key}: expected shape {list(base[key].numpy().shape)} "
                                 f"(rank {rank}), got {list(value.numpy().shape)}")
        scale = wire[key + SCALE_SUFFIX].numpy() if dtype == "int8" else None
        if scale is not None and (scale.dtype != np.float32 or scale.size != 1 or not (
                np.isfinite(scale).all() and scale.item() >= 0)):
            raise UpdateRejected(f"{key}: its int8 scale must be one finite float32 >= 0, "
                                 f"got {scale.dtype}{list(scale.shape)}")
        delta = _decode(value.numpy(), scale, dtype)
        decoded[key] = Array((base[key].numpy() + delta).astype(base[key].numpy().dtype))
    return pad(ArrayRecord(decoded), reference), rank


def _encode(x: np.ndarray, dtype: UploadDtype) -> tuple[np.ndarray, np.ndarray | None]:
    if dtype == "fp16":
        return x.astype(np.float16), None
    if dtype == "bf16":  # torch rounds to nearest even; the bits travel as uint16
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(
            torch.int16).numpy().view(np.uint16), None
    peak = float(np.abs(x).max()) if x.size else 0.0
    scale = np.float32(peak / INT8_LEVELS)
    if scale == 0:
        return np.zeros(x.shape, np.int8), np.array(scale, np.float32)
    q = np.clip(np.rint(x / scale), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return q, np.array(scale, np.float32)


def _decode(x: np.ndarray, scale: np.ndarray | None, dtype: UploadDtype) -> np.ndarray:
    if dtype == "fp16":
        return x.astype(np.float32)
    if dtype == "bf16":
        return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(
            torch.bfloat16).float().numpy()
    return x.astype(np.float32) * np.float32(scale.item())
