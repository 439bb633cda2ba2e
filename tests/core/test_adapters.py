"""Adapter tensors <-> Flower ArrayRecords, update validation, loading and payload size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedcpt.core.adapters import (
    adapter_state,
    check_update,
    count_bytes,
    from_arrays,
    load_adapter,
    to_arrays,
    update_norm,
)
from fedcpt.exceptions import UpdateRejected


@pytest.fixture
def reference(fresh_lm) -> ArrayRecord:
    return to_arrays(adapter_state(fresh_lm.model))


def _with(arrays: ArrayRecord, key: str, value: np.ndarray) -> ArrayRecord:
    items = {k: Array(v.numpy().copy()) for k, v in arrays.items()}
    items[key] = Array(value)
    return ArrayRecord(items)


def _first_key(arrays: ArrayRecord, part: str = "lora_A") -> str:
    return next(k for k in arrays.keys() if part in k)


def test_adapter_state_is_detached_fp32_copy(fresh_lm):
    state = adapter_state(fresh_lm.model)
    assert state and all("lora_" in k for k in state)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    assert all(not v.requires_grad for v in state.values())
    key = _first_key(ArrayRecord({k: Array(v.numpy()) for k, v in state.items()}))
    state[key].add_(1.0)  # mutating the copy leaves the model alone
    assert not torch.equal(adapter_state(fresh_lm.model)[key], state[key])


def test_arrays_round_trip(fresh_lm):
    state = adapter_state(fresh_lm.model)
    state = {k: v + torch.randn_like(v) for k, v in state.items()}
    back = from_arrays(to_arrays(state))
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype
        assert torch.equal(back[key], value)


def test_from_arrays_returns_independent_tensors(reference):
    tensors = from_arrays(reference)
    key = _first_key(reference)
    tensors[key].fill_(123.0)
    assert not np.any(reference[key].numpy() == 123.0)


def test_check_update_accepts_well_formed_update(reference):
    update = to_arrays({k: v * 2 for k, v in from_arrays(reference).items()})
    check_update(update, reference)  # no exception


def test_check_update_rejects_nan(reference):
    key = _first_key(reference)
    bad = reference[key].numpy().copy()
    bad[0, 0] = np.nan
    with pytest.raises(UpdateRejected, match=rf"{key}: contains NaN or Inf"):
        check_update(_with(reference, key, bad), reference)


def test_check_update_rejects_inf(reference):
    key = _first_key(reference, "lora_B")
    bad = reference[key].numpy().copy()
    bad[-1, -1] = -np.inf
    with pytest.raises(UpdateRejected, match=r"contains NaN or Inf"):
        check_update(_with(reference, key, bad), reference)


def test_check_update_rejects_wrong_shape(reference):
    key = _first_key(reference)
    shape = list(reference[key].shape)
    bad = np.zeros((shape[0] + 1, shape[1]), dtype=np.float32)
    with pytest.raises(UpdateRejected,
                       match=rf"{key}: expected float32\[{shape[0]}, {shape[1]}\], "
                             rf"got float32\[{shape[0] + 1}, {shape[1]}\]"):
        check_update(_with(reference, key, bad), reference)


def test_check_update_rejects_wrong_dtype(reference):
    key = _first_key(reference)
    bad = reference[key].numpy().astype(np.float64)
    with pytest.raises(UpdateRejected, match=rf"{key}: expected float32.*got float64"):
        check_update(_with(reference, key, bad), reference)


def test_check_update_rejects_missing_key(reference):
    key = _first_key(reference)
    partial = ArrayRecord({k: v for k, v in reference.items() if k != key})
    with pytest.raises(UpdateRejected, match=r"adapter keys differ \(missing \['.*'\], "
                                             r"unexpected \[\]\)"):
        check_update(partial, reference)


def test_check_update_rejects_extra_key(reference):
    extra = _with(reference, "base_model.model.lm_head.weight", np.zeros((2, 2), np.float32))
    with pytest.raises(UpdateRejected, match=r"missing \[\], unexpected "
                                             r"\['base_model\.model\.lm_head\.weight'\]"):
        check_update(extra, reference)


def test_load_adapter_changes_model_outputs(fresh_lm, text_blocks):
    model = fresh_lm.model
    model.eval()
    batch = text_blocks[:2]
    with torch.no_grad():
        base = model(input_ids=batch).logits
    state = adapter_state(model)
    generator = torch.Generator().manual_seed(0)
    changed = {k: (torch.randn(v.shape, generator=generator) * 0.5 if "lora_B" in k else v)
               for k, v in state.items()}
    load_adapter(model, to_arrays(changed))
    after_state = adapter_state(model)
    assert all(torch.equal(after_state[k], changed[k]) for k in changed)
    with torch.no_grad():
        adapted = model(input_ids=batch).logits
    assert not torch.allclose(base, adapted)
    # loading the original (B = 0) adapter restores the base outputs
    load_adapter(model, to_arrays(state))
    with torch.no_grad():
        restored = model(input_ids=batch).logits
    torch.testing.assert_close(restored, base)


def test_load_adapter_rejects_tensors_the_model_lacks(fresh_lm, reference):
    extra = _with(reference, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
                  np.zeros((4, 64), np.float32))
    with pytest.raises(UpdateRejected, match=r"adapter tensors not in the model: .*k_proj"):
        load_adapter(fresh_lm.model, extra)


def test_count_bytes_is_four_per_element(reference):
    numel = sum(int(np.prod(v.shape)) for v in reference.values())
    assert numel == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    assert count_bytes(reference) == 4 * numel


def test_update_norm(reference):
    assert update_norm(reference, reference) == 0.0
    shifted = to_arrays({k: v + 0.5 for k, v in from_arrays(reference).items()})
    numel = sum(int(np.prod(v.shape)) for v in reference.values())
    assert update_norm(shifted, reference) == pytest.approx(math.sqrt(numel * 0.25), rel=1e-6)
