"""Self-distillation toward the base model: after aggregation the server pulls the
adapted model's next-token distributions back toward the frozen base model's, or, in a
stream of phases, toward the global adapter the current phase began from.

Rehearsal trains on general text with hard labels, so it recalibrates the model toward raw
text and leaves much of the drift from the base in place (docs/strategies.md). Here the
teacher is the base model itself (the adapter disabled, as peft's ``disable_adapter``
gives it) and the loss is KL(base ‖ adapted), the drift the run measures (Hinton et al.
2015, https://arxiv.org/abs/1503.02531; as a guard against forgetting: Li & Hoiem 2017,
"Learning without Forgetting", https://arxiv.org/abs/1606.09282). Two kinds of text:

- ``pool``: blocks of the server's rehearsal pool;
- ``chat``: the base model's own greedy answers to built-in chat-formatted prompts
  (:data:`fedcpt.core.behaviour.REHEARSAL_PROMPTS`, disjoint from the evaluation prompts),
  scored on the answer positions only — chat-format rehearsal;
- ``both``: the pool KL plus ``chat_weight`` × the chat KL, every step.

With the phase teacher (:class:`PhaseTeacher`) the pull keeps the previous phases'
solution in function space, against backward transfer (Li & Hoiem's LwF with the
previous task's model as teacher), where the phase anchor pulls in parameter space.

The step sees the aggregate and the server's own text only, never site data, so it
composes with secure aggregation and, under DP, is post-processing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord

from fedcpt.config import Phase
from fedcpt.core.adapters import (
    adapter_state,
    from_arrays,
    load_adapter,
    swapped_adapter,
    to_arrays,
)
from fedcpt.core.lm_loss import next_token_kl
from fedcpt.core.model import AdaptedModel
from fedcpt.server.phases import PhaseStarts
from fedcpt.server.steps.base import StepResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatAnswers:
    """Chat-formatted prompts with the base model's answers (N, L), and the predictions
    that produce the answers (N, L − 1, bool): :func:`fedcpt.core.behaviour.answer_batch`."""

    ids: torch.Tensor
    positions: torch.Tensor


class PhaseTeacher:
    """The global adapter the current phase of a stream began from; none in the first
    phase, which has nothing earlier to keep."""

    def __init__(self, phase_of: Callable[[int], Phase],
                 version: Callable[[int, ArrayRecord], ArrayRecord]) -> None:
        self.phase_of = phase_of
        self.starts = PhaseStarts(version)

    def at(self, server_round: int, global_arrays: ArrayRecord
           ) -> dict[str, torch.Tensor] | None:
        """The teacher's adapter tensors for ``server_round`` (``global_arrays``: the
        adapter the round began from)."""
        phase = self.phase_of(server_round)
        if phase.index == 0:
            return None
        return from_arrays(self.starts.at(phase, server_round, global_arrays))


class SelfDistillation:
    """A few AdamW steps on the aggregate minimising KL(teacher ‖ adapted) on server text;
    the teacher is the base, or the phase's starting adapter (``phase_teacher``)."""

    name = "self_distillation"

    def __init__(self, lm: AdaptedModel, *, pool: torch.Tensor | None,
                 chat: ChatAnswers | None, steps: int, batch_size: int, lr: float,
                 lr_at: Callable[[int], float], chat_weight: float, max_grad_norm: float,
                 seed: int, from_round: int = 1,
                 phase_teacher: PhaseTeacher | None = None) -> None:
        if pool is None and chat is None:
            raise ValueError("self-distillation needs pool text, chat answers or both")
        self.lm = lm
        self.pool = pool
        self.chat = chat
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        """0: the sites' learning rate of the round (``lr_at``)."""
        self.lr_at = lr_at
        self.chat_weight = chat_weight
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.from_round = from_round
        """Rounds before this one keep the aggregate unchanged."""
        self.phase_teacher = phase_teacher

    def _backward(self, generator: torch.Generator, teacher: dict[str, torch.Tensor] | None
                  ) -> dict[str, float]:
        """Backpropagate the step's objective on one batch of each kind of text; its parts.
        Each kind's KL is backpropagated before the next teacher forward, which (with an
        earlier adapter as teacher) swaps the parameters that graph holds."""
        device, model = self.lm.device, self.lm.model
        as_teacher = None if teacher is None else (lambda: swapped_adapter(model, teacher))
        parts: dict[str, float] = {}
        if self.pool is not None:
            idx = torch.randint(len(self.pool), (self.batch_size,), generator=generator)
            with self.lm.autocast():
                kl = next_token_kl(model, self.pool[idx].to(device),  # (B, T) blocks
                                   teacher=as_teacher)
            kl.backward()
            parts["pool_kl"] = kl.item()
        if self.chat is not None:
            idx = torch.randint(len(self.chat.ids), (self.batch_size,), generator=generator)
            with self.lm.autocast():
                kl = next_token_kl(model, self.chat.ids[idx].to(device),
                                   self.chat.positions[idx].to(device), teacher=as_teacher)
            weight = 1.0 if self.pool is None else self.chat_weight
            (weight * kl).backward()
            parts["chat_kl"] = kl.item()
        return parts

    def apply(self, server_round: int, global_arrays: ArrayRecord, aggregated: ArrayRecord,
              client_examples: int) -> StepResult:
        if server_round < self.from_round:
            log.info("round %d · self-distillation: not before round %d", server_round,
                     self.from_round)
            return StepResult(aggregated, {"steps": 0})
        teacher = None
        if self.phase_teacher is not None:
            teacher = self.phase_teacher.at(server_round, global_arrays)
            if teacher is None:
                log.info("round %d · self-distillation: the first phase has no earlier "
                         "adapter to keep", server_round)
                return StepResult(aggregated, {"steps": 0})
        model = self.lm.model
        load_adapter(model, aggregated)
        lr = self.lr or self.lr_at(server_round)
        params = [p for p in model.parameters() if p.requires_grad]  # the adapter only
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(self.seed * 1000 + server_round)
        model.train()
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        for i in range(self.steps):
            last = self._backward(generator, teacher)
            first = first or last
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.debug("round %d · self-distillation step %d: %s", server_round, i, last)
        model.eval()
        log.info("round %d · self-distillation: %d steps at lr %.2g, KL to the %s %s",
                 server_round, self.steps, lr, "base" if teacher is None else "phase's start",
                 ", ".join(f"{k} {first[k]:.4f} → {last[k]:.4f}" for k in last))
        return StepResult(to_arrays(adapter_state(model)),
                          {"steps": self.steps, "lr": lr,
                           "teacher": "base" if teacher is None else "phase",
                           **{f"first_{k}": v for k, v in first.items()},
                           **{f"last_{k}": v for k, v in last.items()}})
