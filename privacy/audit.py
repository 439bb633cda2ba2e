"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023,
https://arxiv.org/abs/2305.08846).

``m`` random canary blocks are made; each is inserted into a site's training data with
probability ½, as a privacy unit of its own (so the bound is on the unit-level ε). After
training the site's step exactly as a real run would (DP-SGD with its planned σ, or
without DP), each canary is scored by how much its loss dropped under the
trained adapter compared with the base model. The auditor guesses "inserted" for the
highest scores and "not inserted" for the lowest; the number of correct guesses turns
into a lower bound on ε that holds with confidence 1 − β. Under DP the bound must stay
below the accountant's ε; without DP it shows how much a site's data leaks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
from scipy import stats

from fedcpt.config import RunConfig
from fedcpt.core.adapters import load_adapter
from fedcpt.core.data import load_blocks
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.model import load_adapted_model
from fedcpt.core.training import train_adapter
from fedcpt.exceptions import ConfigError
from fedcpt.privacy.accounting import epsilon
from fedcpt.privacy.dpsgd import train_adapter_dp
from fedcpt.privacy.plan import plan_site
from fedcpt.privacy.policy import site_policy

log = logging.getLogger(__name__)

AUDIT_DELTA = 1e-5


def audit_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[≥ v of r guesses correct] if training were (ε, δ)-DP (the paper's Theorem 5.2).

    Under ε-DP each guess is right with probability at most sigmoid(ε), so correct guesses
    are dominated by Binomial(r, sigmoid(ε)); δ adds at most 2mδ times the largest
    average of the binomial's mass just below v.
    """
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0:
        return min(1.0, tail)
    slack, mass = 0.0, 0.0
    for i in range(1, v + 1):
        mass += float(stats.binom.pmf(v - i, r, q))
        slack = max(slack, mass / i)
    return min(1.0, tail + 2 * m * delta * slack)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """Largest ε that ``v`` correct of ``r`` guesses rejects at level ``beta`` (0 if none)."""
    if r == 0 or audit_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        if audit_p_value(m, r, v, mid, delta) < beta:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one auditing run at one site."""

    site: str
    dp: bool
    canaries: int
    inserted: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    confidence: float
    accountant_epsilon: float | None
    delta: float
    tpr_at_fpr: dict[str, float]
    steps: int
    noise_multiplier: float | None


def guess_and_bound(scores: torch.Tensor, inserted: torch.Tensor, delta: float,
                    beta: float) -> tuple[int, int, float]:
    """Best (guesses, correct, ε lower bound) over symmetric abstention levels.

    The auditor guesses the top k scores "in" and the bottom k "out" for a few k; trying
    several k is paid for with a Bonferroni correction (β / number of k tried).
    """
    m = len(scores)
    order = torch.argsort(scores, descending=True)
    levels = sorted({max(1, int(m * f)) for f in (0.05, 0.1, 0.2, 0.3)} | {m // 2})
    best = (0, 0, 0.0)
    for k in levels:
        top, bottom = order[:k], order[m - k:]  # disjoint: k ≤ m / 2
        correct = int(inserted[top].sum()) + int((~inserted[bottom]).sum())
        guesses = len(top) + len(bottom)
        eps = epsilon_lower_bound(m, guesses, correct, delta, beta / len(levels))
        if eps > best[2] or best[0] == 0:
            best = (guesses, correct, eps)
    return best


def tpr_at_fpr(scores: torch.Tensor, inserted: torch.Tensor,
               fprs: tuple[float, ...] = (0.01, 0.05, 0.1)) -> dict[str, float]:
    """True-positive rate of the score threshold at each false-positive rate."""
    negatives = scores[~inserted].sort(descending=True).values
    positives = scores[inserted]
    result = {}
    for fpr in fprs:
        k = int(fpr * len(negatives))
        threshold = negatives[k] if k < len(negatives) else negatives[-1]
        result[str(fpr)] = float((positives > threshold).float().mean()) if len(positives) else 0.0
    return result


def run_audit(cfg: RunConfig, *, site_index: int = 0, canaries: int = 200,
              data_blocks: int = 200, steps: int = 0, seed: int = 0,
              beta: float = 0.05) -> AuditResult:
    """Insert canaries into one site's data, train its step, and bound ε from the result.

    ``data_blocks`` of the site's own training blocks are kept beside the canaries (a small
    set, so every canary is sampled often); ``steps`` defaults to the run's planned total
    (rounds × local steps).
    """
    if canaries < 10 or canaries % 2:
        raise ConfigError(f"--canaries must be an even number ≥ 10, got {canaries}")
    site = cfg.sites[site_index]
    steps = steps or cfg.federation.rounds * cfg.train.local_steps
    lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
    load_adapter(lm.model, lm.initial_adapter)
    policy = site_policy(cfg, site, {}, deployed=False)
    blocks = load_blocks(site.data, lm.tokenizer, cfg.data, what=f"site {site.name!r}",
                         unit=policy.unit)
    # The audit's own small training set: the first ``data_blocks`` blocks. It is an
    # experiment on simulated data, not a site's trained set; its N is counted below.
    data, data_units = blocks.train[:data_blocks], blocks.train_units[:data_blocks]
    site_units = int(data_units.max()) + 1 if len(data_units) else 0

    generator = torch.Generator().manual_seed(seed)
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    canary_blocks = torch.randint(0, vocab, (canaries, data.shape[1]), generator=generator)
    inserted = torch.rand(canaries, generator=generator) < 0.5
    # Each canary is a privacy unit of its own, beside the site's units (``policy.unit``).
    train_set = torch.cat([data, canary_blocks[inserted]])
    owners = torch.cat([data_units, site_units + torch.arange(int(inserted.sum()))])
    records = site_units + int(inserted.sum())
    batch = cfg.train.eval_batch_size

    with lm.model.disable_adapter():
        base = torch.tensor(evaluate_blocks(lm, canary_blocks, batch).block_losses)
    train = dataclasses.replace(cfg.train, local_steps=steps)
    sigma = None
    accountant_eps = None
    # 1/N would make the 2mδ slack of the bound vacuous for a few hundred canaries
    delta = cfg.privacy.target_delta or AUDIT_DELTA
    try:
        if cfg.privacy.enabled:
            plan = plan_site(cfg.privacy, site=site.name, records=records,
                             batch_size=cfg.train.batch_size, steps=steps, delta=delta)
            sigma = plan.noise_multiplier
            train_adapter_dp(lm, train_set, train, cfg.privacy, lr=cfg.train.lr,
                             noise_multiplier=sigma, sample_rate=plan.sample_rate,
                             units=owners)
            accountant_eps = epsilon([(sigma, plan.sample_rate, steps)], delta,
                                     cfg.privacy.accountant)
        else:
            train_adapter(lm, train_set, train, lr=cfg.train.lr, seed=seed)
        trained = torch.tensor(evaluate_blocks(lm, canary_blocks, batch).block_losses)
    finally:
        load_adapter(lm.model, lm.initial_adapter)  # the audit trained from the initial one
    scores = base - trained  # how much each canary's loss dropped
    guesses, correct, eps_lb = guess_and_bound(scores, inserted, delta, beta)
    result = AuditResult(
        site=site.name, dp=cfg.privacy.enabled, canaries=canaries,
        inserted=int(inserted.sum()), guesses=guesses, correct=correct,
        epsilon_lower_bound=eps_lb, confidence=1 - beta, accountant_epsilon=accountant_eps,
        delta=delta, tpr_at_fpr=tpr_at_fpr(scores, inserted), steps=steps,
        noise_multiplier=sigma,
    )
    log.info("audit of site %s: %d/%d guesses correct -> ε ≥ %.3f at %.0f%% confidence "
             "(accountant ε: %s)", site.name, correct, guesses, eps_lb, 100 * (1 - beta),
             "n/a (no DP)" if accountant_eps is None else f"{accountant_eps:.3f}")
    return result
