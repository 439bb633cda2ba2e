"""The model's own samples: drawn from the adapter as loaded, reproducible from the seed,
scored only up to each sample's end, and leaving the model and the global RNG as they
were."""

from __future__ import annotations

import numpy as np
import torch

from fedcpt.config import TrainConfig
from fedcpt.core.adapters import adapter_state, to_arrays
from fedcpt.core.samples import sample_seed, sample_text
from fedcpt.core.training import train_adapter


def test_samples_are_reproducible_and_shaped(fresh_lm, monkeypatch):
    monkeypatch.setattr("fedcpt.core.samples.CHUNK", 16)
    ids, positions = sample_text(fresh_lm, count=20, tokens=12, seed=3)
    again, _ = sample_text(fresh_lm, count=20, tokens=12, seed=3)
    other, _ = sample_text(fresh_lm, count=20, tokens=12, seed=4)
    assert ids.shape == (20, 13) and positions.shape == (20, 12)  # two chunks of 16
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    assert (ids[:, 0] == fresh_lm.tokenizer.eos_token_id).all()


def test_sampling_leaves_the_global_rng_alone(fresh_lm):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    sample_text(fresh_lm, count=2, tokens=4, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_sample_seeds_are_apart_from_the_training_batch_seeds():
    seeds = {sample_seed(seed, key) for seed in range(3) for key in range(4)}
    assert len(seeds) == 12
    assert not seeds & {seed * 1000 + r for seed in range(3) for r in range(20)}


def test_predictions_after_a_samples_end_do_not_count(fresh_lm):
    eos = fresh_lm.tokenizer.eos_token_id
    ids, positions = sample_text(fresh_lm, count=64, tokens=40, seed=0)
    ended = 0
    for row, scored in zip(ids[:, 1:], positions, strict=True):
        ends = (row == eos).nonzero().flatten().tolist()
        if ends:
            ended += 1
            assert scored[:ends[0] + 1].all() and not scored[ends[0] + 1:].any()
            assert (row[ends[0]:] == eos).all()  # padding after the end
        else:
            assert scored.all()
    assert ended > 0  # a random tiny model ends some samples within 40 tokens


def _mean_logprob(lm, ids: torch.Tensor, positions: torch.Tensor) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[:, :-1].float(), -1)
    return logp.gather(-1, ids[:, 1:, None])[..., 0][positions].mean().item()


def test_samples_come_from_the_adapter_as_loaded(fresh_lm, byte_tok):
    """Each model's samples are likelier under itself than under the other: the adapted
    model's, and the base's with the adapter disabled (0.028 and 0.030 nats per token
    here; with both drawn from the base, −0.004 and 0.006). Sampling leaves the model's
    mode and weights as they were."""
    ids = byte_tok(["def f(x):\n    return x\n" * 80], add_special_tokens=False)["input_ids"]
    train_adapter(fresh_lm, torch.tensor(ids[0][:64 * 20]).view(20, 64),
                  TrainConfig(local_steps=300, batch_size=4, max_grad_norm=0), lr=2e-1,
                  seed=0)
    before = to_arrays(adapter_state(fresh_lm.model))
    fresh_lm.model.train()
    adapted = sample_text(fresh_lm, count=128, tokens=48, seed=1)
    with fresh_lm.model.disable_adapter():
        base = sample_text(fresh_lm, count=128, tokens=48, seed=1)
    assert fresh_lm.model.training
    after = to_arrays(adapter_state(fresh_lm.model))
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)

    fresh_lm.model.eval()
    own = _mean_logprob(fresh_lm, *adapted) - _mean_logprob(fresh_lm, *base)
    with fresh_lm.model.disable_adapter():
        own_base = _mean_logprob(fresh_lm, *base) - _mean_logprob(fresh_lm, *adapted)
    assert own > 0.02 and own_base > 0.02
