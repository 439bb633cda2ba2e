"""Per-site LoRA ranks (HetLoRA zero-padding): truncate the global adapter to a site's rank,
pad the site's adapter back, keep the LoRA scale, and average mixed ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedcpt.config import LoraSettings, ModelConfig
from fedcpt.core.adapters import load_adapter
from fedcpt.core.model import load_adapted_model
from fedcpt.core.ranks import lora_at_rank, max_rank, pad, site_rank, truncate
from fedcpt.exceptions import UpdateRejected
from fedcpt.strategies.fedavg import AdapterFedAvg

SHAPES = {"m.q_proj.lora_A.weight": (8, 6), "m.q_proj.lora_B.weight": (5, 8)}


def _arrays(seed: int, shapes: dict = SHAPES) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32))
                        for k, s in shapes.items()})


def test_truncate_keeps_the_first_components():
    x = _arrays(0)
    cut = truncate(x, 3)
    assert cut["m.q_proj.lora_A.weight"].numpy().shape == (3, 6)
    assert cut["m.q_proj.lora_B.weight"].numpy().shape == (5, 3)
    np.testing.assert_array_equal(cut["m.q_proj.lora_A.weight"].numpy(),
                                  x["m.q_proj.lora_A.weight"].numpy()[:3])
    np.testing.assert_array_equal(cut["m.q_proj.lora_B.weight"].numpy(),
                                  x["m.q_proj.lora_B.weight"].numpy()[:, :3])
    assert max_rank(cut) == 3 and max_rank(x) == 8


def test_pad_fills_untrained_components_from_the_reference():
    reference, trained = _arrays(0), _arrays(1)
    padded = pad(truncate(trained, 3), reference)
    a, b = padded["m.q_proj.lora_A.weight"].numpy(), padded["m.q_proj.lora_B.weight"].numpy()
    np.testing.assert_array_equal(a[:3], trained["m.q_proj.lora_A.weight"].numpy()[:3])
    np.testing.assert_array_equal(a[3:], reference["m.q_proj.lora_A.weight"].numpy()[3:])
    np.testing.assert_array_equal(b[:, 3:], reference["m.q_proj.lora_B.weight"].numpy()[:, 3:])
    # the update is zero on every coordinate the site did not train
    assert not (a - reference["m.q_proj.lora_A.weight"].numpy())[3:].any()


@pytest.mark.parametrize("shapes, match", [
    ({"m.q_proj.lora_A.weight": (3, 6), "m.q_proj.lora_B.weight": (5, 2)},
     r"different ranks \[2, 3\]"),
    ({"m.q_proj.lora_A.weight": (9, 6), "m.q_proj.lora_B.weight": (5, 9)},
     r"rank 9 exceeds the global adapter's 8"),
    ({"m.q_proj.lora_A.weight": (3, 7), "m.q_proj.lora_B.weight": (5, 3)}, r"float32\[3, 6\]"),
    ({"m.q_proj.lora_A.weight": (3, 6)}, r"missing \['m.q_proj.lora_B.weight'\]"),
])
def test_pad_rejects_what_is_not_a_truncation(shapes, match):
    with pytest.raises(UpdateRejected, match=match):
        pad(_arrays(1, shapes), _arrays(0))


def test_site_rank_is_the_cap_when_lower():
    assert site_rank(8, 0) == 8 and site_rank(8, 4) == 4 and site_rank(8, 16) == 8


def test_lora_at_rank_keeps_the_scale():
    lora = LoraSettings(r=8, alpha=16)
    low = lora_at_rank(lora, 2)
    assert (low.r, low.alpha / low.r) == (2, lora.alpha / lora.r)
    assert lora_at_rank(lora, 8) is lora


def test_a_truncated_adapter_at_its_rank_is_the_global_model_of_its_components():
    """A rank-2 model holding the global rank-8 adapter's first two components computes
    exactly what the rank-8 model does with the other six zeroed: same LoRA scale."""
    model_cfg, lora = ModelConfig(name="tiny-llama", precision="fp32"), LoraSettings(r=8,
                                                                                     alpha=16)
    full = load_adapted_model(model_cfg, lora, 0)
    low = load_adapted_model(model_cfg, lora_at_rank(lora, 2), 0)
    global_adapter = _random_like(full.initial_adapter, seed=3)
    only_two = pad(truncate(global_adapter, 2), _zeros_like(global_adapter))
    load_adapter(full.model, only_two)
    load_adapter(low.model, truncate(global_adapter, 2))
    tokens = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        ref = full.model(input_ids=tokens).logits
        got = low.model(input_ids=tokens).logits
        load_adapter(full.model, _zeros_like(global_adapter))
        base = full.model(input_ids=tokens).logits
    assert not torch.allclose(ref, base, atol=1e-4)  # the adapter matters here
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_zero_padding_averages_each_component_over_every_site():
    """HetLoRA's zero-padding: sites of rank 2, 4 and 8 send padded adapters; component k
    of the mean update is the sum of the updates of the sites that train it, over n."""
    reference = _arrays(0)
    ranks, updates, records = (2, 4, 8), [], []
    for i, rank in enumerate(ranks):
        trained = truncate(_arrays(10 + i), rank)
        padded = pad(trained, reference)
        updates.append(padded["m.q_proj.lora_A.weight"].numpy()
                       - reference["m.q_proj.lora_A.weight"].numpy())
        records.append(RecordDict({"arrays": padded,
                                   "metrics": MetricRecord({"num-examples": 16})}))
    mean = AdapterFedAvg().aggregate(records, reference)
    got = mean["m.q_proj.lora_A.weight"].numpy() - reference["m.q_proj.lora_A.weight"].numpy()
    np.testing.assert_allclose(got, sum(updates) / 3, rtol=1e-5, atol=1e-6)
    assert not updates[0][2:].any() and not updates[1][4:].any()
    np.testing.assert_allclose(got[4:], updates[2][4:] / 3, rtol=1e-5, atol=1e-6)


def _random_like(arrays: ArrayRecord, seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array((rng.normal(size=v.numpy().shape) * 0.5).astype(np.float32))
                        for k, v in arrays.items()})


def _zeros_like(arrays: ArrayRecord) -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros_like(v.numpy())) for k, v in arrays.items()})
