"""A site's evaluation ↔ the uint32 vector that is masked and summed with the other sites'.

What is summed (``FIELDS``): the held-out token count ``T``; loss × T, base loss × T and
ECE × T in fixed point; and how many of the site's three statistics it clipped. Their
sums give the federation's token-weighted means, exactly what per-site ``plain`` replies
would give once averaged, and nothing per site.

Fixed point: a statistic ``v`` is clipped at the site to its range — loss and base loss
to ``[0, eval_loss_bound]`` (the site's policy), ECE to ``[0, 1]`` — and ``v × T`` is
rounded to the nearest multiple of ``2^-RESOLUTION_BITS``: each site's sum is off by at
most 2^-17, so the federation's mean is within **2^-17 ≈ 7.6e-6** (nats for the losses)
of the mean of the clipped values. A clipped value (or a non-finite one, clipped as
+∞ → the bound) is counted in the last field, never wrapped.

No wrap: every field is split into ``LIMBS`` limbs of ``LIMB_BITS`` = 24 bits (a site's
field must stay below 2^72, e.g. T × bound < 2^56, or the site refuses). Summing at most
``MAX_SITES`` = 255 sites keeps every limb sum below 255 × 2^24 < 2^32, so the mod-2^32
sum of the masked vectors, once unmasked, is the exact integer sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedcpt.config import MAX_SECURE_EVAL_SITES
from fedcpt.core import protocol as p
from fedcpt.exceptions import UpdateRejected

RESOLUTION_BITS = 16  # fixed-point step 2^-16 on each site's v × T
LIMB_BITS, LIMBS = 24, 3  # each field as three 24-bit limbs, least significant first
MAX_SITES = MAX_SECURE_EVAL_SITES  # 255 × (2^24 − 1) < 2^32: limb sums never wrap
FIELDS = ("tokens", "loss", "base_loss", "ece", "clipped")
VECTOR_LENGTH = LIMBS * len(FIELDS)
_LIMIT = 2**(LIMB_BITS * LIMBS)


@dataclass(frozen=True)
class EvalSum:
    """The federation's evaluation as the unmasked sum gives it: token-weighted means."""

    sites: int
    tokens: int
    loss: float
    base_loss: float
    ece: float
    clipped: int
    """Statistics the sites clipped to their range before summing (all sites together)."""


def encode_evaluation(metrics: dict[str, float], loss_bound: float) -> tuple[np.ndarray, int]:
    """A site's evaluation metrics (those a plain release would send) as the limb vector,
    and how many it clipped; UpdateRejected if a value is NaN or a field would not fit."""
    tokens = int(metrics[p.NUM_EXAMPLES])
    if tokens <= 0:
        raise UpdateRejected(f"evaluation over {tokens} tokens")
    fields, clipped = [tokens], 0
    for key, bound in ((p.DOMAIN_LOSS, loss_bound), (p.DOMAIN_BASE_LOSS, loss_bound),
                       (p.DOMAIN_ECE, 1.0)):
        value = float(metrics[key])
        if math.isnan(value):
            raise UpdateRejected(f"evaluation {key} is NaN; nothing is sent")
        kept = min(max(value, 0.0), bound)
        clipped += kept != value
        fields.append(round(kept * tokens * 2**RESOLUTION_BITS))
    fields.append(clipped)
    if max(fields) >= _LIMIT:
        raise UpdateRejected(f"evaluation of {tokens} tokens with loss bound {loss_bound:g} "
                             f"does not fit the {LIMB_BITS * LIMBS}-bit fixed-point sum")
    mask = 2**LIMB_BITS - 1
    return np.array([(f >> (LIMB_BITS * i)) & mask for f in fields for i in range(LIMBS)],
                    dtype=np.uint32), clipped


def decode_evaluation(total: np.ndarray, sites: int) -> EvalSum:
    """The means from the unmasked sum of ``sites`` encoded vectors; UpdateRejected if it
    cannot be the sum of that many (a limb above what honest sites could add up to)."""
    if not 0 < sites <= MAX_SITES:
        raise UpdateRejected(f"an evaluation sum over {sites} sites (1 to {MAX_SITES})")
    if total.shape != (VECTOR_LENGTH,) or int(total.max()) > sites * (2**LIMB_BITS - 1):
        raise UpdateRejected(f"the unmasked evaluation sum is not the sum of {sites} "
                             "encoded evaluations")
    limbs = [int(x) for x in total]
    values = [sum(limbs[f * LIMBS + i] << (LIMB_BITS * i) for i in range(LIMBS))
              for f in range(len(FIELDS))]
    tokens, loss, base, ece, clipped = values
    if tokens <= 0:
        raise UpdateRejected("the unmasked evaluation sum covers no tokens")
    scale = 2**RESOLUTION_BITS * tokens
    return EvalSum(sites=sites, tokens=tokens, loss=loss / scale, base_loss=base / scale,
                   ece=ece / scale, clipped=clipped)
