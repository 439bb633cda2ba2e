"""The chunked head + cross-entropy: the same loss and gradients as full logits, also as
Opacus per-sample gradients, and transformers' path wherever the head is not plain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from fedcpt.config import LoraSettings
from fedcpt.core.lm_loss import next_token_loss
from fedcpt.core.model import attach_lora, tiny_llama


def _lora_model(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    model = attach_lora(tiny_llama(257), LoraSettings(r=4, alpha=8), seed=0).to(dtype)
    with torch.no_grad():  # B = 0 at creation would leave A's gradient zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    return model


def _reference_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits and cross-entropy in the model's own precision."""
    logits = model(input_ids=ids).logits[:, :-1]  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _lora_grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("chunk", [7, 64, 10_000])  # a ragged last chunk, exact, one chunk
def test_loss_and_gradients_equal_full_logits(chunk):
    model = _lora_model()
    ids = torch.randint(0, 257, (3, 33), generator=torch.Generator().manual_seed(0))
    ref_loss = _reference_loss(model, ids)
    ref = _lora_grads(model, ref_loss)
    loss = next_token_loss(model, ids, chunk=chunk)
    got = _lora_grads(model, loss)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert got.keys() == ref.keys() and len(got) == 8
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_matches_transformers_loss_in_fp32():
    model = _lora_model(torch.float32)
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(2))
    expected = model(input_ids=ids, labels=ids).loss
    assert next_token_loss(model, ids, chunk=16).item() == pytest.approx(expected.item(),
                                                                         rel=1e-6)


def test_opacus_per_sample_gradients_equal_full_logits():
    """DP-SGD clips each record's gradient: those must not change with the loss path."""
    model = _lora_model()
    gsm = GradSampleModule(model, loss_reduction="mean")
    ids = torch.randint(0, 257, (4, 17), generator=torch.Generator().manual_seed(3))

    def per_sample(loss_fn) -> dict[str, torch.Tensor]:
        loss_fn().backward()
        out = {n: p.grad_sample.clone() for n, p in model.named_parameters()
               if p.requires_grad}
        gsm.zero_grad(set_to_none=True)
        return out

    ref = per_sample(lambda: _reference_loss(gsm, ids))
    got = per_sample(lambda: next_token_loss(model, ids, chunk=5))
    gsm._close()
    assert got.keys() == ref.keys() and len(got) == 8
    for name in ref:
        assert got[name].shape[0] == 4  # one gradient per record
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)


def test_no_gradient_work_without_autograd():
    model = _lora_model()
    ids = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loss = next_token_loss(model, ids)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(_reference_loss(model, ids).item(), rel=1e-12)


def test_trainable_head_takes_transformers_path():
    """A head with its own gradient is outside the fused function's contract."""
    model = _lora_model()
    head = model.get_base_model().get_output_embeddings()
    head.weight.requires_grad_(True)
    ids = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(5))
    next_token_loss(model, ids).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk", [5, 10_000])
@pytest.mark.parametrize("masked", [False, True])
def test_kl_to_base_and_gradients_equal_full_logits(chunk, masked):
    from fedcpt.core.evaluation import kl_divergence
    from fedcpt.core.lm_loss import next_token_kl

    model = _lora_model()
    ids = torch.randint(0, 257, (3, 21), generator=torch.Generator().manual_seed(3))
    positions = (torch.rand(3, 20, generator=torch.Generator().manual_seed(4)) < 0.5
                 if masked else torch.ones(3, 20, dtype=torch.bool))
    with torch.no_grad(), model.disable_adapter():
        base = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
    ref_kl = kl_divergence(base, torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1))
    ref_kl = ref_kl[positions].mean()
    ref = _lora_grads(model, ref_kl)
    kl = next_token_kl(model, ids, positions if masked else None, chunk=chunk)
    got = _lora_grads(model, kl)
    assert ref_kl.item() > 1e-3  # the adapter moved the model: a KL worth matching
    assert kl.item() == pytest.approx(ref_kl.item(), rel=1e-10)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)


def test_kl_to_an_earlier_adapter_equals_full_logits_and_restores_the_adapter():
    """The phase teacher: KL(earlier adapter ‖ current) through swapped_adapter equals the
    full-logit KL against that adapter's own logits, and the current adapter comes back
    bit for bit."""
    from peft import get_peft_model_state_dict

    from fedcpt.core.adapters import swapped_adapter
    from fedcpt.core.evaluation import kl_divergence
    from fedcpt.core.lm_loss import next_token_kl

    model = _lora_model()
    own = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    earlier = {k: v + 0.2 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7),
                                         dtype=v.dtype) for k, v in own.items()}
    ids = torch.randint(0, 257, (3, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), swapped_adapter(model, earlier):
        teacher = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
    ref_kl = kl_divergence(teacher, torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1))
    ref = _lora_grads(model, ref_kl.mean())
    kl = next_token_kl(model, ids, teacher=lambda: swapped_adapter(model, earlier))
    got = _lora_grads(model, kl)
    assert kl.item() == pytest.approx(ref_kl.mean().item(), rel=1e-10)
    with torch.no_grad():  # the base (the default teacher) is another
        assert abs(kl.item() - next_token_kl(model, ids).item()) > 0.1 * kl.item()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)
    for key, value in get_peft_model_state_dict(model).items():
        assert torch.equal(value, own[key]), key


def test_kl_to_an_earlier_adapter_under_bf16_autocast_uses_each_adapter():
    """Autocast caches its bf16 copies of trainable weights for the whole region: without
    clearing that cache on a swap the student would run with the teacher's adapter (a KL
    of exactly 0 on SmolLM2 before the fix)."""
    from peft import get_peft_model_state_dict

    from fedcpt.core.adapters import swapped_adapter
    from fedcpt.core.evaluation import kl_divergence
    from fedcpt.core.lm_loss import next_token_kl

    model = _lora_model(torch.float32)
    earlier = {k: v + 0.2 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
               for k, v in get_peft_model_state_dict(model).items()}
    ids = torch.randint(0, 257, (3, 21), generator=torch.Generator().manual_seed(3))

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    with torch.no_grad(), swapped_adapter(model, earlier), autocast():
        teacher = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    with torch.no_grad(), autocast():
        student = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        kl = next_token_kl(model, ids, teacher=lambda: swapped_adapter(model, earlier))
    reference = kl_divergence(teacher, student).mean().item()
    assert reference > 1e-2
    assert kl.item() == pytest.approx(reference, rel=0.05)


def test_a_teacher_adapter_that_does_not_fit_is_refused_and_the_model_kept():
    from peft import get_peft_model_state_dict

    from fedcpt.core.adapters import swapped_adapter
    from fedcpt.exceptions import UpdateRejected

    model = _lora_model()
    own = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    foreign = {**{k: v + 1 for k, v in own.items()}, "lora_Z.weight": torch.zeros(2)}
    with pytest.raises(UpdateRejected, match="not in the model"):
        with swapped_adapter(model, foreign):
            pytest.fail("the swap must not happen")
    for key, value in get_peft_model_state_dict(model).items():
        assert torch.equal(value, own[key]), key
