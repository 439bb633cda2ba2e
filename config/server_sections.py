"""The server's sections of a run's settings: what it does with each round's aggregate
(``[strategy]``: rehearsal, self-distillation, delta scaling, the regression guard, the
server optimiser, anchors), how it watches the run (``[monitor]``: drift signals and their
action) and what its report shows (``[report]``: continuations of fixed prompts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedcpt.config.fields import opt as _opt
from fedcpt.config.rules import require


@dataclass(frozen=True)
class StrategyConfig:
    """How the server protects general capabilities while the sites adapt."""

    rehearsal: Literal["none", "mix", "finetune"] = _opt(
        "none", "Server-side rehearsal on its general pool: mix trains the server's own "
        "update from the global adapter and averages it in with weight ρ; finetune "
        "fine-tunes the aggregate for ρ × the round's client examples.")
    replay_fraction: float = _opt(
        0.25, "ρ: rehearsal relative to the round's client work (Ibrahim et al. 2024: 5% "
        "for weak shifts, 25% for strong ones).")
    anchor: Literal["none", "fedprox", "l2sp", "ewc", "phase"] = _opt(
        "none", "Client-side pull toward the global adapter (fedprox), the initial one, i.e. "
        "the base (l2sp), the base weighted by the server's diagonal Fisher on its "
        "rehearsal pool (ewc), or the global adapter the current phase began from, i.e. "
        "the previous phases' solution (phase: l2sp in the first phase).")
    anchor_weight: float = _opt(
        20.0, "μ: each step removes lr·μ of the distance to the anchor (decoupled, like "
        "AdamW's weight decay, so it is free under DP).")
    fisher_blocks: int = _opt(
        32, "EWC: rehearsal-pool blocks the server computes the diagonal Fisher on, each "
        "round.")
    distillation: Literal["none", "pool", "chat", "both", "samples"] = _opt(
        "none", "Self-distillation toward the base model after aggregation (and rehearsal): "
        "the server takes `distill_steps` AdamW steps minimising KL(base ‖ adapted) of the "
        "next-token distributions on its rehearsal pool (pool), on the base model's own "
        "answers to built-in chat-formatted prompts (chat: chat-format rehearsal), "
        "both, or on text sampled from the teacher itself (samples: generative replay; "
        "with the phase teacher, from the start of every phase so far). Only the server's "
        "general text and the models it holds are used, never site data.")
    distill_teacher: Literal["base", "phase"] = _opt(
        "base", "Self-distillation's teacher: the base model, or, in a stream "
        "(``[[phases]]``), the global adapter the current phase began from, i.e. the "
        "previous phases' solution (a function-space pull against backward transfer, "
        "Learning without Forgetting; the first phase then is not distilled).")
    distill_steps: int = _opt(8, "Self-distillation: optimizer steps per round.")
    distill_lr: float = _opt(
        0.0, "Self-distillation: learning rate; 0: the sites' learning rate of the round.")
    distill_chat_weight: float = _opt(
        1.0, "Self-distillation `both`: weight of the chat-answer KL beside the pool KL.")
    distill_batch_size: int = _opt(
        0, "Self-distillation: sequences of each kind of text per step; 0: "
        "`train.batch_size` (a DP logical batch can be far larger than the step needs).")
    distill_samples: int = _opt(
        64, "Self-distillation `samples`: sequences sampled from each teacher, of "
        "`data.block_size` tokens.")
    distill_from_round: int = _opt(
        1, "Self-distillation: the first round it runs in; earlier rounds keep the "
        "aggregate as it is (distillation in late rounds only).")
    delta_scaling: bool = _opt(
        False, "Scale each round's aggregated delta by the largest α whose rehearsal "
        "validation loss rises at most `delta_tolerance`.")
    delta_alphas: tuple[float, ...] = _opt((0.25, 0.5, 0.75, 1.0), "Candidate α.")
    delta_tolerance: float = _opt(
        0.01, "Allowed rise of rehearsal validation loss per round (nats).")
    rehearsal_val_blocks: int = _opt(
        32, "Rehearsal-pool blocks kept aside for choosing α and for the regression guard.")
    regression_guard: float = _opt(
        0.0, "Reject a round whose rehearsal validation loss rises more than this many nats "
        "over the accepted version (0: off); the previous version stays global.")
    server_optimizer: Literal["none", "fedavgm", "fedadam", "fedyogi"] = _opt(
        "none", "Server optimiser on the aggregated delta (Reddi et al. 2021): none "
        "(FedAvg), fedavgm, fedadam or fedyogi; see docs/strategies.md.")
    server_lr: float = _opt(
        0.0, "η of the server optimiser; 0: its default (1.0 for fedavgm, 0.01 for fedadam "
        "and fedyogi).")
    server_momentum: float = _opt(0.9, "FedAvgM's momentum β.")
    beta_1: float = _opt(0.9, "FedAdam / FedYogi first-moment decay.")
    beta_2: float = _opt(0.99, "FedAdam / FedYogi second-moment decay.")
    tau: float = _opt(1e-3, "FedAdam / FedYogi adaptivity τ (added to √v).")

    def __post_init__(self) -> None:
        require(0 < self.replay_fraction <= 1, "strategy.replay_fraction",
                self.replay_fraction, "in (0, 1]")
        require(self.anchor_weight >= 0, "strategy.anchor_weight", self.anchor_weight, ">= 0")
        require(self.distill_steps > 0, "strategy.distill_steps", self.distill_steps, "> 0")
        require(self.distill_lr >= 0, "strategy.distill_lr", self.distill_lr,
                ">= 0 (0: the sites' learning rate)")
        require(self.distill_chat_weight > 0, "strategy.distill_chat_weight",
                self.distill_chat_weight, "> 0")
        require(self.distill_batch_size >= 0, "strategy.distill_batch_size",
                self.distill_batch_size, ">= 0 (0: train.batch_size)")
        require(self.distill_samples > 0, "strategy.distill_samples", self.distill_samples,
                "> 0")
        require(self.distill_from_round >= 1, "strategy.distill_from_round",
                self.distill_from_round, ">= 1")
        require(self.fisher_blocks > 0, "strategy.fisher_blocks", self.fisher_blocks, "> 0")
        require(len(self.delta_alphas) > 0 and all(0 < a <= 1 for a in self.delta_alphas),
                "strategy.delta_alphas", self.delta_alphas, "values in (0, 1]")
        require(self.delta_tolerance >= 0, "strategy.delta_tolerance", self.delta_tolerance,
                ">= 0")
        require(self.rehearsal_val_blocks > 0, "strategy.rehearsal_val_blocks",
                self.rehearsal_val_blocks, "> 0")
        require(self.regression_guard >= 0, "strategy.regression_guard",
                self.regression_guard, ">= 0 (0: off)")
        require(self.server_lr >= 0, "strategy.server_lr", self.server_lr,
                ">= 0 (0: the optimiser's default)")
        require(0 <= self.server_momentum < 1, "strategy.server_momentum",
                self.server_momentum, "in [0, 1)")
        require(0 <= self.beta_1 < 1, "strategy.beta_1", self.beta_1, "in [0, 1)")
        require(0 <= self.beta_2 < 1, "strategy.beta_2", self.beta_2, "in [0, 1)")
        require(self.tau > 0, "strategy.tau", self.tau, "> 0")


@dataclass(frozen=True)
class MonitorConfig:
    """Drift alarms that act (`[monitor]`): after each accepted round the server compares
    the global update's norm and its general loss with the last good rounds; each site's
    released data drift is compared with a threshold (a flag, never a rollback)."""

    window: int = _opt(3, "Last good rounds the drift baselines look back over.")
    update_drift: float = _opt(
        0.0, "Flag a round whose global update norm is more than this many times the "
        "median of the window's (0: off).")
    general_loss_drift: float = _opt(
        0.0, "Flag a round whose general loss is more than this many nats above the "
        "window's lowest (0: off).")
    action: Literal["rollback", "flag"] = _opt(
        "rollback", "On a flagged round: roll the global adapter back to the last good "
        "version (the round's version is that one), or only flag it in the report.")
    data_drift_threshold: float = _opt(
        0.0, "Flag a site whose released data drift (the base model's held-out loss on its "
        "data now minus the mean of its previous runs) is more than this many nats either "
        "way (0: off). A flag only, never a rollback: a change of data is not a bad update.")

    def __post_init__(self) -> None:
        require(self.window >= 1, "monitor.window", self.window, ">= 1")
        require(self.data_drift_threshold >= 0, "monitor.data_drift_threshold",
                self.data_drift_threshold, ">= 0 (0: off)")
        require(self.update_drift == 0 or self.update_drift > 1, "monitor.update_drift",
                self.update_drift, "> 1 (a multiple of the median norm) or 0 (off)")
        require(self.general_loss_drift >= 0, "monitor.general_loss_drift",
                self.general_loss_drift, ">= 0 (0: off)")


MAX_REPORT_PROMPTS = 8  # per kind: each costs two short greedy generations at the end


@dataclass(frozen=True)
class ReportConfig:
    """What the report shows in words (`[report]`): the server's greedy continuations of
    fixed prompts by the base model and by the final global adapter, side by side. The
    prompts are the scenario's own text, never a site's data."""

    general_prompts: tuple[str, ...] = _opt(
        (), "Openings of general text (what the model should keep), continued by the base "
        "model and the final adapter (empty: none).")
    domain_prompts: tuple[str, ...] = _opt(
        (), "Openings in the sites' domain (what the model should learn), written for the "
        "scenario, not taken from any site's data (empty: none).")
    continuation_tokens: int = _opt(24, "New tokens per continuation (greedy).")

    def __post_init__(self) -> None:
        for key in ("general_prompts", "domain_prompts"):
            prompts = getattr(self, key)
            require(len(prompts) <= MAX_REPORT_PROMPTS, f"report.{key}", prompts,
                    f"at most {MAX_REPORT_PROMPTS} prompts")
            require(all(isinstance(p, str) and p.strip() for p in prompts), f"report.{key}",
                    prompts, "non-empty strings")
        require(0 < self.continuation_tokens <= 256, "report.continuation_tokens",
                self.continuation_tokens, "in 1..256")

    @property
    def prompts(self) -> list[tuple[str, str]]:
        """``(kind, prompt)`` pairs: the general prompts, then the domain ones."""
        return ([("general", p) for p in self.general_prompts]
                + [("domain", p) for p in self.domain_prompts])
