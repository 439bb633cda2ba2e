"""General retention, as a user would judge it: forgetting per kind of general text, in
and out of the rehearsal pool, and behaviour kept (drift from the base model's next-token
distribution, and the base model's own answers).

:class:`GeneralEvaluation` is built once per run (it generates the base answers) and
measures a :class:`GeneralReport` for every global model; :func:`retention_summary`
compares the base report (round 0) with a later one.

Sign conventions: forgetting = loss(after) − loss(base), positive = lost general skill;
``kl_to_base`` ≥ 0, 0 = the base's distribution; ``answer_loss_increase`` > 0 = the base's
answers became less likely.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fedcpt.config import DataConfig
from fedcpt.core.behaviour import (
    INSTRUCTION_PROMPTS,
    AnswerRetention,
    BaseAnswer,
    answer_retention,
    base_answers,
)
from fedcpt.core.evaluation import (
    BaseLogprobs,
    EvalResult,
    evaluate_kinds,
    paired_standard_error,
)
from fedcpt.core.model import AdaptedModel
from fedcpt.exceptions import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneralReport:
    """One global model's general metrics: per kind, overall, and on the base's answers."""

    kinds: dict[str, EvalResult]
    overall: EvalResult
    answers: AnswerRetention | None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (for checkpoints); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GeneralReport:
        answers = raw.get("answers")
        return cls({k: EvalResult(**v) for k, v in raw["kinds"].items()},
                   EvalResult(**raw["overall"]),
                   None if answers is None else AnswerRetention(
                       **{**answers, "matches": tuple(answers["matches"])}))


class GeneralEvaluation:
    """The server's fixed general evaluation: blocks per kind, which kinds are in the
    rehearsal pool, and the base model's answers to the built-in prompts."""

    def __init__(self, kinds: dict[str, torch.Tensor], in_pool: tuple[str, ...],
                 answers: list[BaseAnswer], batch_size: int, kl_blocks: int) -> None:
        self.kinds = kinds
        self.in_pool = in_pool
        self.answers = answers
        self.batch_size = batch_size
        self.kl_blocks = kl_blocks
        self.base_logprobs = BaseLogprobs()

    @classmethod
    def prepare(cls, lm: AdaptedModel, kinds: dict[str, torch.Tensor],
                in_pool: tuple[str, ...], data: DataConfig,
                batch_size: int) -> GeneralEvaluation:
        """Generate the base answers (``data.answer_prompts`` prompts, greedy, at most
        ``data.answer_tokens`` tokens each) and fix the evaluation."""
        if data.answer_prompts > len(INSTRUCTION_PROMPTS):
            raise ConfigError(f"`data.answer_prompts` must be at most the "
                              f"{len(INSTRUCTION_PROMPTS)} built-in prompts, got "
                              f"{data.answer_prompts}")
        prompts = INSTRUCTION_PROMPTS[:data.answer_prompts]
        answers = base_answers(lm, prompts, data.answer_tokens) if prompts else []
        if answers:
            log.info("base answers: %d prompts, %d answer tokens", len(answers),
                     sum(len(a.answer_ids) for a in answers))
        return cls(kinds, in_pool, answers, batch_size, data.kl_eval_blocks)

    @property
    def out_of_pool(self) -> tuple[str, ...]:
        return tuple(k for k in self.kinds if k not in self.in_pool)

    def evaluate(self, lm: AdaptedModel) -> GeneralReport:
        """Every kind's loss, ECE and KL to the base, and retention of the base answers."""
        per_kind, overall = evaluate_kinds(lm, self.kinds, self.batch_size, kl_to_base=True,
                                           kl_blocks=self.kl_blocks, base=self.base_logprobs)
        answers = answer_retention(lm, self.answers) if self.answers else None
        return GeneralReport(per_kind, overall, answers)


@dataclass(frozen=True)
class Forgetting:
    """Loss change of one kind or group of kinds from the base to a later model."""

    base_loss: float
    loss: float
    forgetting: float
    standard_error: float
    kl_to_base: float | None


@dataclass(frozen=True)
class Behaviour:
    """Behaviour kept: drift from the base distribution and the base's own answers."""

    kl_to_base: float | None
    answer_loss_base: float | None
    answer_loss: float | None
    answer_loss_increase: float | None
    exact_match_base: float | None
    exact_match: float | None
    token_agreement: float | None


@dataclass(frozen=True)
class RetentionSummary:
    """Forgetting per kind, in and out of the rehearsal pool, overall, and behaviour."""

    kinds: dict[str, Forgetting]
    in_pool: Forgetting | None
    out_of_pool: Forgetting | None
    overall: Forgetting
    behaviour: Behaviour
    eces: dict[str, tuple[float, float]]
    """Per kind: (base ECE, later ECE)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _forgetting(base: list[EvalResult], after: list[EvalResult]) -> Forgetting:
    """Forgetting over the blocks of one or more kinds together (block-weighted)."""
    before = [x for r in base for x in r.block_losses]
    later = [x for r in after for x in r.block_losses]
    kls = [(r.kl_to_base, r.tokens) for r in after if r.kl_to_base is not None]
    tokens = sum(t for _, t in kls)
    kl = sum(k * t for k, t in kls) / tokens if kls and tokens else None
    base_loss, loss = sum(before) / len(before), sum(later) / len(later)
    return Forgetting(base_loss, loss, loss - base_loss, paired_standard_error(before, later),
                      kl)


def retention_summary(base: GeneralReport, after: GeneralReport,
                      in_pool: tuple[str, ...]) -> RetentionSummary:
    """What ``after`` kept of ``base`` (the round-0 report of the same evaluation)."""
    names = list(base.kinds)
    pooled = [k for k in names if k in in_pool]
    others = [k for k in names if k not in in_pool]

    def group(kinds: list[str]) -> Forgetting | None:
        if not kinds:
            return None
        return _forgetting([base.kinds[k] for k in kinds], [after.kinds[k] for k in kinds])

    a0, a1 = base.answers, after.answers
    behaviour = Behaviour(
        kl_to_base=after.overall.kl_to_base,
        answer_loss_base=a0.loss if a0 else None,
        answer_loss=a1.loss if a1 else None,
        answer_loss_increase=a1.loss - a0.loss if a0 and a1 else None,
        exact_match_base=a0.exact_match if a0 else None,
        exact_match=a1.exact_match if a1 else None,
        token_agreement=a1.token_agreement if a1 else None,
    )
    return RetentionSummary(
        kinds={k: _forgetting([base.kinds[k]], [after.kinds[k]]) for k in names},
        in_pool=group(pooled),
        out_of_pool=group(others),
        overall=_forgetting(list(base.kinds.values()), list(after.kinds.values())),
        behaviour=behaviour,
        eces={k: (base.kinds[k].ece, after.kinds[k].ece) for k in names},
    )
