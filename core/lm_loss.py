"""Next-token loss and KL to a teacher of a causal LM without full-vocabulary logits.

``model(input_ids=x, labels=x).loss`` builds (B, T, V) fp32 logits (200 MB for 8 × 128
tokens and SmolLM2's 49k vocabulary), a log-softmax of the same size, and its gradient:
about a tenth of a CPU training step. Here the frozen output head and the cross-entropy
run together over chunks of tokens, and the gradient with respect to the final hidden
states is formed in the same pass (the approach of Liger-Kernel's fused linear
cross-entropy; no maintained library offers it for CPU, hence this file). The same
chunking gives the KL to a teacher (the base model, or an earlier adapter) for
self-distillation (:func:`next_token_kl`).

The loss is the same mean over all (B · (T − 1)) predicted tokens that transformers
computes, so Opacus' ``loss_reduction="mean"`` sees the same scale. Only the decoder's
modules run through autograd, so Opacus' per-sample-gradient hooks on LoRA layers work
unchanged. Models whose head is not a plain frozen linear layer, or that post-process
logits, take transformers' own path.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

CHUNK_TOKENS = 256
"""Tokens per head chunk: (256, 49152) fp32 is 50 MB, and the head matmul stays efficient."""

_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3"})
"""Model types whose logits are exactly ``lm_head(final hidden state)``: no soft-capping or
logit scaling. Others fall back to transformers' loss."""


class _GradInForward(torch.autograd.Function):
    """A scalar loss whose forward already computed d loss / d hidden (saved on ``ctx``):
    the backward only scales it (the frozen head and the other inputs get no gradient)."""

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


class _HeadCrossEntropy(_GradInForward):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, chunked over tokens.

    ``weight`` is frozen, so the only gradient is with respect to ``hidden``; it is computed
    in the forward pass (softmax − one-hot, times the weight) and replayed in backward.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        n = hidden.shape[0]  # hidden (N, H), weight (V, H), targets (N,)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, as HF does
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.t()).to(acc)  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            if want_grad:
                probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[start:start + chunk] = (probs.to(weight.dtype) @ weight) / n
        ctx.save_for_backward(grad if want_grad else torch.empty(0))
        return total / n


def _plain_head(causal_lm: nn.Module) -> nn.Linear | None:
    """The output head if the chunked loss reproduces transformers' exactly, else None."""
    config = getattr(causal_lm, "config", None)
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm,
                                                        "get_output_embeddings") else None
    if (config is None or getattr(config, "model_type", None) not in _PLAIN_HEAD_TYPES
            or type(head) is not nn.Linear or head.bias is not None
            or head.weight.requires_grad):
        return None
    return head


def next_token_loss(model: nn.Module, input_ids: torch.Tensor,
                    chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` (a peft or transformers causal LM) on
    ``input_ids`` (B, T): equal to ``model(input_ids=x, labels=x).loss``."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = _plain_head(causal_lm)
    if head is None:
        return model(input_ids=input_ids, labels=input_ids).loss
    hidden = causal_lm.get_decoder()(input_ids=input_ids).last_hidden_state  # (B, T, H)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B·(T−1), H)
    targets = input_ids[:, 1:].reshape(-1)
    return _HeadCrossEntropy.apply(hidden, head.weight, targets, chunk)


class _HeadKLToTeacher(_GradInForward):
    """Mean KL(softmax(teacher @ weight.T) ‖ softmax(hidden @ weight.T)), chunked over
    tokens: the distillation loss toward a teacher that shares the frozen head.

    The gradient with respect to the student's logits is softmax(student) − p_teacher (the
    soft-target form of the cross-entropy gradient); it is formed in the forward pass, as
    in :class:`_HeadCrossEntropy`.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, teacher: torch.Tensor,
                chunk: int) -> torch.Tensor:
        n = hidden.shape[0]  # hidden (N, H), teacher (N, H), weight (V, H)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        acc = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, chunk):
            log_s = torch.log_softmax((hidden[start:start + chunk] @ weight.t()).to(acc), -1)
            log_t = torch.log_softmax((teacher[start:start + chunk] @ weight.t()).to(acc), -1)
            p_t = log_t.exp()  # (c, V)
            total += (p_t * (log_t - log_s)).sum()
            if want_grad:
                grad[start:start + chunk] = ((log_s.exp_() - p_t).to(weight.dtype) @ weight) / n
        ctx.save_for_backward(grad if want_grad else torch.empty(0))
        return total / n


def next_token_kl(model: nn.Module, input_ids: torch.Tensor,
                  positions: torch.Tensor | None = None, chunk: int = CHUNK_TOKENS,
                  teacher: Callable[[], AbstractContextManager] | None = None,
                  ) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ adapted) of the next-token distributions of a peft model
    on ``input_ids`` (B, T), with no gradient through the teacher. The teacher is the base
    (the adapter disabled), or the model inside the context ``teacher()`` gives (e.g.
    :func:`fedcpt.core.adapters.swapped_adapter`: an earlier adapter).

    ``positions`` (B, T − 1, bool) picks which predictions count (None: all of them), e.g.
    only the answer of a chat-formatted prompt. Equal to the mean of
    :func:`fedcpt.core.evaluation.kl_divergence` over those positions.
    """
    as_teacher = teacher or model.disable_adapter
    causal_lm = model.get_base_model()
    head = _plain_head(causal_lm)
    if head is None:
        with torch.no_grad(), as_teacher():
            target = torch.log_softmax(model(input_ids=input_ids).logits[:, :-1].float(), -1)
        adapted = torch.log_softmax(model(input_ids=input_ids).logits[:, :-1].float(), -1)
        kl = (target.exp() * (target - adapted)).sum(-1)  # (B, T−1)
        return kl.mean() if positions is None else kl[positions].mean()
    decoder = causal_lm.get_decoder()
    with torch.no_grad(), as_teacher():
        target = decoder(input_ids=input_ids).last_hidden_state[:, :-1]  # (B, T−1, H)
    hidden = decoder(input_ids=input_ids).last_hidden_state[:, :-1]
    if positions is None:
        positions = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    hidden, target = hidden[positions], target[positions]  # (N, H)
    return _HeadKLToTeacher.apply(hidden, head.weight, target, chunk)
