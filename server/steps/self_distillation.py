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
- ``both``: the pool KL plus ``chat_weight`` × the chat KL, every step;
- ``samples``: the teacher's own text, sampled from it (:mod:`fedcpt.core.samples`):
  generative replay. With the phase teacher these are drawn at the start of every phase so
  far, so the text replays what each earlier phase taught, where the pool is only as close
  to it as general text happens to be.

With the phase teacher (:class:`PhaseTeacher`) the pull keeps the previous phases'
solution in function space, against backward transfer (Li & Hoiem's LwF with the
previous task's model as teacher), where the phase anchor pulls in parameter space.

The step sees the aggregate and the server's own text only, never site data, so it
composes with secure aggregation and, under DP, is post-processing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
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
from fedcpt.core.samples import sample_seed, sample_text
from fedcpt.server.phases import PhaseStarts
from fedcpt.server.steps.base import StepResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredText:
    """Token ids (N, L) and the predictions that count (N, L − 1, bool; None: all), e.g.
    chat prompts with the base model's answers scored on the answer only
    (:func:`fedcpt.core.behaviour.answer_batch`)."""

    ids: torch.Tensor
    positions: torch.Tensor | None = None

    def batch(self, idx: torch.Tensor, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``idx`` on ``device``."""
        return (self.ids[idx].to(device),
                None if self.positions is None else self.positions[idx].to(device))


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

    def earlier_starts(self, server_round: int, global_arrays: ArrayRecord
                       ) -> dict[int, Callable[[], dict[str, torch.Tensor] | None]]:
        """Phase index → the adapter that phase began from, read when called, for every
        phase after the first up to ``server_round``'s."""
        phase = self.phase_of(server_round)
        starts: dict[int, Callable[[], dict[str, torch.Tensor] | None]] = {}
        if phase.index > 0:
            starts[phase.index] = lambda: self.at(server_round, global_arrays)
        while phase.index > 1:
            phase = self.phase_of(phase.first_round - 1)
            starts[phase.index] = functools.partial(self._committed_start, phase,
                                                    global_arrays)
        return starts

    def _committed_start(self, phase: Phase, layout: ArrayRecord
                         ) -> dict[str, torch.Tensor]:
        """An earlier ``phase``'s start, as committed."""
        return from_arrays(self.starts.committed(phase, layout))


class TeacherSamples:
    """The teacher's own samples, ``count`` of up to ``tokens`` tokens from each teacher,
    drawn once and kept: the base's, or those of the adapter each phase so far began from.
    A resumed run draws them again from the committed adapters, the same ones on the same
    device, threads and library versions."""

    def __init__(self, lm: AdaptedModel, *, count: int, tokens: int, seed: int) -> None:
        self.lm = lm
        self.count = count
        self.tokens = tokens
        self.seed = seed
        self._drawn: dict[int, ScoredText] = {}

    def text(self, teachers: dict[int, Callable[[], dict[str, torch.Tensor] | None]]
             ) -> ScoredText:
        """The samples of every teacher in ``teachers`` (key → its adapter tensors; None:
        the base), drawn for those not drawn yet."""
        model = self.lm.model
        for key in sorted(teachers.keys() - self._drawn.keys()):
            state = teachers[key]()
            as_teacher: AbstractContextManager = (
                model.disable_adapter() if state is None else swapped_adapter(model, state))
            with as_teacher:
                ids, positions = sample_text(self.lm, self.count, self.tokens,
                                             seed=sample_seed(self.seed, key))
            self._drawn[key] = ScoredText(ids, positions)
            log.info("self-distillation: %d samples of %d tokens from the %s", self.count,
                     self.tokens, "base" if state is None else f"start of phase {key}")
        kept = [self._drawn[key] for key in sorted(teachers)]
        return ScoredText(torch.cat([t.ids for t in kept]),
                          torch.cat([t.positions for t in kept]))


class SelfDistillation:
    """A few AdamW steps on the aggregate minimising KL(teacher ‖ adapted) on server text;
    the teacher is the base, or the phase's starting adapter (``phase_teacher``)."""

    name = "self_distillation"

    def __init__(self, lm: AdaptedModel, *, pool: torch.Tensor | None,
                 chat: ScoredText | None, steps: int, batch_size: int, lr: float,
                 lr_at: Callable[[int], float], chat_weight: float, max_grad_norm: float,
                 seed: int, from_round: int = 1,
                 phase_teacher: PhaseTeacher | None = None,
                 samples: TeacherSamples | None = None) -> None:
        if pool is None and chat is None and samples is None:
            raise ValueError("self-distillation needs pool text, chat answers or samples")
        self.lm = lm
        self.pool = None if pool is None else ScoredText(pool)
        self.chat = chat
        self.samples = samples
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

    def _texts(self, server_round: int, global_arrays: ArrayRecord
               ) -> list[tuple[str, ScoredText, float]]:
        """Each kind of text of the round with its weight in the objective."""
        texts = []
        if self.pool is not None:
            texts.append(("pool", self.pool, 1.0))
        if self.chat is not None:
            texts.append(("chat", self.chat, 1.0 if self.pool is None else self.chat_weight))
        if self.samples is not None:
            teachers = ({0: lambda: None} if self.phase_teacher is None
                        else self.phase_teacher.earlier_starts(server_round, global_arrays))
            texts.append(("samples", self.samples.text(teachers), 1.0))
        return texts

    def _backward(self, generator: torch.Generator, teacher: dict[str, torch.Tensor] | None,
                  texts: list[tuple[str, ScoredText, float]]) -> dict[str, float]:
        """Backpropagate the step's objective on one batch of each kind of text; its parts.
        Each kind's KL is backpropagated before the next teacher forward, which (with an
        earlier adapter as teacher) swaps the parameters that graph holds."""
        device, model = self.lm.device, self.lm.model
        as_teacher = None if teacher is None else (lambda: swapped_adapter(model, teacher))
        parts: dict[str, float] = {}
        for name, text, weight in texts:
            idx = torch.randint(len(text.ids), (self.batch_size,), generator=generator)
            with self.lm.autocast():
                kl = next_token_kl(model, *text.batch(idx, device), teacher=as_teacher)
            (weight * kl).backward()
            parts[f"{name}_kl"] = kl.item()
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
        texts = self._texts(server_round, global_arrays)
        lr = self.lr or self.lr_at(server_round)
        params = [p for p in model.parameters() if p.requires_grad]  # the adapter only
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(self.seed * 1000 + server_round)
        model.train()
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        for i in range(self.steps):
            last = self._backward(generator, teacher, texts)
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
