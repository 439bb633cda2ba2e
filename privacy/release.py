"""What a site's evaluation may release about its held-out units, by its own policy.

- ``nothing``: no loss leaves the site (the evaluation is refused with the reason).
- ``plain``: loss, base loss and ECE on ``data.heldout_blocks`` held-out blocks taken
  round-robin over the held-out units (so a query covers at least the site's minimum of
  units, counted in units, not blocks), *not* covered by ε (listed as such in the privacy
  report). Still refused below the site's minimum of held-out units.
- ``noised``: the discrete Gaussian mechanism on per-unit statistics. A query covers
  exactly ``k = data.heldout_blocks`` held-out units (one block each, the first ``k`` in
  the site's salted order; a site holding fewer answers anyway, the missing units
  counting 0, so that whether it answers never depends on its data); each unit's loss is
  clipped to ``[0, L]`` and its ECE to ``[0, 1]``, rounded onto a fixed integer grid, and
  their integer sums get exact discrete Gaussian noise of std σ times the grid's span
  (:mod:`fedcpt.privacy.discrete_noise`, OpenDP): no floating-point noise ever touches a
  data-dependent value. Removing one unit replaces at most one chosen unit by the next,
  so each sum moves by at most its bound: each statistic is one Gaussian-equivalent
  mechanism, recorded in the site's ledger as ``(σ', q = 1, 1 step)`` with σ' ≤ σ from
  OpenDP's own zCDP bound, *before* it is released, and composed with DP-SGD by the same
  accountant. Laplace is not offered: Opacus's accountants, which the ledger uses,
  analyse Gaussian noise only.

With a data-drift record (:mod:`fedcpt.privacy.data_drift`), a plain or noised release also
carries ``data-drift``: the released base loss minus the mean of the site's previous runs'
released base losses (absent on a site's first run). It is computed from released values
only, so it is released exactly as the base loss is (plain → plain; noised →
post-processing of the noised base loss, no extra ε; nothing → nothing). A masked
evaluation (below) carries none: it would be one site's value.

- ``secagg``: the statistics of ``plain`` (the same query and minimum), released only
  as a sum with the other sites' under SecAgg+ (:mod:`fedcpt.privacy.secagg.eval_sum`,
  :mod:`fedcpt.client.eval_step`): a plain evaluate message is refused. *Not* covered by
  ε; the sum hides each site's values from the server, not the federation's mean.

Under ``secagg.mode = "on"`` every site evaluates through the masked stage, whatever its
release (``plain`` and ``noised`` sites allow strictly more; a ``noised`` site masks its
noised values, still accounted in its ledger; ``nothing`` refuses and drops out of the
sum). Without secure aggregation a ``secagg`` site refuses to evaluate.
"""

from __future__ import annotations

import logging

import torch

from fedcpt.config import RunConfig
from fedcpt.core import protocol as p
from fedcpt.core.data import TokenBlocks, blocks_across_units, first_block_per_unit
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.model import AdaptedModel
from fedcpt.privacy.data_drift import DataDriftRecord, RunEntry, blocks_digest, model_digest
from fedcpt.privacy.discrete_noise import accounted_noise_multiplier, noised_mean
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.privacy.plan import EVAL_RUN_SUFFIX
from fedcpt.privacy.policy import PolicyRefused, SitePolicy, accept_proposal, check_query

log = logging.getLogger(__name__)

EVAL_SAMPLE_RATE = 1.0  # every chosen unit is in the query: no subsampling amplification


def evaluation_queries(rounds: int) -> int:
    """Noised statistics a run's evaluations release: loss and ECE each round (round 0
    included) and the base loss once; reserved in the DP plan."""
    return 2 * (rounds + 1) + 1


def eval_reservation(policy: SitePolicy, rounds: int) -> tuple[tuple[float, float, int], ...]:
    """The spend a DP plan keeps free for this run's noised evaluations (none otherwise)."""
    if policy.eval_release != "noised":
        return ()
    return ((policy.eval_noise_multiplier, EVAL_SAMPLE_RATE, evaluation_queries(rounds)),)


def release_evaluation(cfg: RunConfig, lm: AdaptedModel, policy: SitePolicy,
                       blocks: TokenBlocks, *, base_cache: dict, run_id: str,
                       ledger: PrivacyLedger | None, drift: DataDriftRecord | None = None,
                       secure: bool = False) -> dict[str, float]:
    """The evaluation metrics the site's policy lets it release for the received adapter
    (``base_cache`` keeps the base model's released loss across rounds), with the data
    drift when the site keeps a ``drift`` record; ``secure``: they will leave the site only
    masked, in a SecAgg+ sum."""
    if policy.eval_release == "nothing":
        raise PolicyRefused(f"site {policy.site!r} releases no evaluation (eval_release = "
                            f"nothing, {policy.who('eval_release')})")
    if policy.eval_release == "secagg" and not secure:
        raise PolicyRefused(f"site {policy.site!r} releases its evaluation only as a sum "
                            f"under secure aggregation (eval_release = secagg, "
                            f"{policy.who('eval_release')}); it refuses this plain evaluate "
                            "message")
    accept_proposal(policy, cfg, blocks.units)
    if policy.eval_release in ("plain", "secagg"):
        check_query(policy, cfg, available=None)  # the query's size, not its units
        if blocks.heldout_unit_count < policy.eval_min_units:
            raise PolicyRefused(
                f"site {policy.site!r} holds {blocks.heldout_unit_count} held-out units, "
                f"fewer than its minimum of {policy.eval_min_units} per query "
                f"({policy.who('eval_min_units')})")
        # round-robin over units: the query covers min(heldout_blocks, units) ≥ the minimum
        heldout = blocks_across_units(blocks.heldout, blocks.heldout_units,
                                      cfg.data.heldout_blocks)
        if "plain" not in base_cache:
            with lm.model.disable_adapter():
                base_cache["plain"] = evaluate_blocks(lm, heldout, cfg.train.eval_batch_size).loss
        result = evaluate_blocks(lm, heldout, cfg.train.eval_batch_size)
        released = {p.NUM_EXAMPLES: result.tokens, p.DOMAIN_LOSS: result.loss,
                    p.DOMAIN_BASE_LOSS: base_cache["plain"], p.DOMAIN_ECE: result.ece}
        # "by unit": not comparable with earlier runs' evenly spaced blocks
        measure = f"plain {len(heldout)}x{heldout.shape[1]} by unit"
        return released | _data_drift(drift, base_cache, run_id, lm, heldout, released,
                                      measure=measure)
    if ledger is None:
        raise PolicyRefused(f"site {policy.site!r} releases only noised evaluations, which "
                            "its ledger must account for, and it has no ledger location")
    # k is public (the query's size): a site holding fewer held-out units answers anyway,
    # the missing ones counting 0, so whether it answers never depends on its data
    k = check_query(policy, cfg, None)
    chosen = first_block_per_unit(blocks.heldout, blocks.heldout_units, k)
    queries = 2 + ("noised" not in base_cache)
    sigma = policy.eval_noise_multiplier
    accounted = accounted_noise_multiplier(sigma)  # public parameters only
    with ledger.locked():
        ledger.check_budget(accounted, EVAL_SAMPLE_RATE, queries,
                            public_sample_rate=EVAL_SAMPLE_RATE, action="evaluate",
                            spend=f"releasing {queries} noised statistics")
        losses, eces = _padded(_per_unit(lm, chosen), k)
        base = None
        if "noised" not in base_cache:
            with lm.model.disable_adapter():
                base = _padded(_per_unit(lm, chosen), k)[0]
        evals = sum(1 for e in ledger.entries if e.run == run_id + EVAL_RUN_SUFFIX)
        ledger.policy = policy.record()
        ledger.record(run_id + EVAL_RUN_SUFFIX, evals + 1, accounted, EVAL_SAMPLE_RATE,
                      queries, kind="eval", public_sample_rate=EVAL_SAMPLE_RATE)  # durable first
    bound = policy.eval_loss_bound
    if base is not None:
        base_cache["noised"] = noised_mean(base, bound, sigma)
    log.info("site %s released a noised evaluation over %d units (σ=%g)", policy.site, k,
             sigma)
    released = {p.NUM_EXAMPLES: k * (chosen.shape[1] - 1),
                p.DOMAIN_LOSS: noised_mean(losses, bound, sigma),
                p.DOMAIN_BASE_LOSS: base_cache["noised"],
                p.DOMAIN_ECE: noised_mean(eces, 1.0, sigma)}
    # Post-processing: the drift is the noised base loss just released (and accounted)
    # minus earlier runs' noised releases (accounted then); no new query of the data.
    return released | _data_drift(drift, base_cache, run_id, lm, chosen, released,
                                  measure=f"noised {k}x{chosen.shape[1]} L={bound:g}")


def _data_drift(record: DataDriftRecord | None, base_cache: dict, run_id: str,
                lm: AdaptedModel, blocks: torch.Tensor, released: dict[str, float],
                measure: str) -> dict[str, float]:
    """``{data-drift: …}`` for this run (empty: no record, or no previous run to compare
    with): on the run's first release in this process, the released base loss is recorded
    and compared; later rounds repeat the same value."""
    if record is None:
        return {}
    key = ("data-drift", run_id)
    if key not in base_cache:
        base_cache[key] = record.record_run(RunEntry(
            run=run_id, model=model_digest(lm), measure=measure, data=blocks_digest(blocks),
            base_loss=released[p.DOMAIN_BASE_LOSS], tokens=int(released[p.NUM_EXAMPLES])))
    return {} if base_cache[key] is None else {p.DATA_DRIFT: base_cache[key]}


def _padded(stats: tuple[list[float], list[float]], k: int,
            ) -> tuple[list[float], list[float]]:
    """Each statistic over exactly ``k`` units: units the site does not hold count 0 (the
    sum still moves by at most its bound when one unit is removed)."""
    if len(stats[0]) < k:
        log.warning("the noised query asks for %d held-out units; this site holds %d, the "
                    "others count 0", k, len(stats[0]))
    return tuple(values + [0.0] * (k - len(values)) for values in stats)  # type: ignore[return-value]


def _per_unit(lm: AdaptedModel, chosen: torch.Tensor) -> tuple[list[float], list[float]]:
    """Each unit's loss and ECE (one block per unit)."""
    results = [evaluate_blocks(lm, chosen[i:i + 1], 1) for i in range(len(chosen))]
    return [r.loss for r in results], [r.ece for r in results]

