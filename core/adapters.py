"""LoRA adapter tensors ↔ Flower ArrayRecords: the only thing that crosses the wire."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from fedcpt.exceptions import ConfigError, UpdateRejected


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """A detached fp32 CPU copy of the adapter tensors (peft names, adapter name stripped)."""
    return {k: v.detach().to("cpu", torch.float32).clone()
            for k, v in get_peft_model_state_dict(model).items()}


def to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})


def from_arrays(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in arrays.items()}


def check_update(arrays: ArrayRecord, reference: ArrayRecord) -> None:
    """Raise UpdateRejected unless ``arrays`` has the reference's keys, shapes, dtypes and
    only finite values."""
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))[:3]
        extra = sorted(set(arrays.keys()) - set(reference.keys()))[:3]
        raise UpdateRejected(f"adapter keys differ (missing {missing}, unexpected {extra})")
    for key, ref in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            raise UpdateRejected(f"{key}: expected {ref.dtype}{list(ref.shape)}, "
                                 f"got {got.dtype}{list(got.shape)}")
        if not np.isfinite(got.numpy()).all():
            raise UpdateRejected(f"{key}: contains NaN or Inf")


def load_adapter(model: PeftModel, arrays: ArrayRecord) -> None:
    """Copy adapter tensors into ``model`` in place (no new parameters are created)."""
    _copy_into(model, from_arrays(arrays))


def _copy_into(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (peft names) into the model's adapter; UpdateRejected for a tensor
    the model does not have."""
    unexpected = getattr(set_peft_model_state_dict(model, state), "unexpected_keys", [])
    if unexpected:
        raise UpdateRejected(f"adapter tensors not in the model: {unexpected[:3]}")


@contextmanager
def swapped_adapter(model: PeftModel, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """``model`` with the adapter tensors ``state`` (peft names) inside the block, and its
    own adapter restored after it: a teacher that shares the model, e.g. an earlier global
    adapter. Use it without gradients, and backpropagate any graph built before the swap
    first: the swap and the restore copy into the parameters in place.

    Autocast keeps its low-precision copies of trainable leaf weights for the whole
    autocast region, keyed by tensor, so an in-place swap would leave it computing with
    the other adapter: its cache is cleared on each swap."""
    own = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    try:
        _copy_into(model, state)
        torch.clear_autocast_cache()
        yield
    finally:
        set_peft_model_state_dict(model, own)
        torch.clear_autocast_cache()


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``arrays - reference`` over all adapter tensors."""
    return math.sqrt(sum(
        float(np.square(arrays[k].numpy().astype(np.float64) - ref.numpy()).sum())
        for k, ref in reference.items()))


def check_update_bound(arrays: ArrayRecord, reference: ArrayRecord, bound: float) -> float:
    """The update's L2 distance from ``reference``; UpdateRejected if it exceeds ``bound``
    (0: no bound). The one check both the server and a masking site make."""
    norm = update_norm(arrays, reference)
    if bound and norm > bound:
        raise UpdateRejected(f"update norm {norm:.3f} exceeds the bound {bound}")
    return norm


def arrays_digest(arrays: ArrayRecord) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes (in key order)."""
    h = hashlib.sha256()
    for key in sorted(arrays.keys()):
        value = np.ascontiguousarray(arrays[key].numpy())
        h.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def count_bytes(arrays: ArrayRecord) -> int:
    """Payload bytes of the tensors (what an upload costs before framing)."""
    return sum(v.numpy().nbytes for v in arrays.values())


def weighted_sum(parts: list[tuple[ArrayRecord, float]]) -> ArrayRecord:
    """Σ wᵢ·xᵢ over adapters with identical keys (e.g. mixing in the server's own update,
    or global + α·(aggregate − global))."""
    keys = list(parts[0][0].keys())
    return ArrayRecord({
        k: Array(sum(np.asarray(rec[k].numpy(), dtype=np.float64) * w for rec, w in parts)
                 .astype(parts[0][0][k].numpy().dtype))
        for k in keys})


def read_version(path: str | Path) -> ArrayRecord:
    """A saved adapter (peft format) as fp32 arrays, unchecked; ConfigError if absent or
    unreadable."""
    from safetensors.numpy import load_file

    weights = Path(path) / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"no adapter version at {path} (expected {weights.name})")
    try:
        tensors = load_file(weights)
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ConfigError(f"adapter version {path} cannot be read: {err}") from None
    return ArrayRecord({k: Array(v.astype(np.float32)) for k, v in tensors.items()})


def load_version(path: str | Path, reference: ArrayRecord) -> ArrayRecord:
    """A saved adapter version (peft format) as an ArrayRecord matching ``reference``."""
    arrays = read_version(path)
    try:
        check_update(arrays, reference)
    except UpdateRejected as err:
        raise ConfigError(f"adapter version {path} does not fit this run's model and LoRA "
                          f"settings: {err}") from None
    return arrays
