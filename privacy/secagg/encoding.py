"""A site's weighted adapter update ↔ the uint32 vector that is masked and summed.

Layout: ``[weight, q_1 … q_D]``. The weight is the site's ``num-examples`` (an exact
integer, so the server can divide the sum by the total weight); ``q`` quantises
``weight / max_weight · (update − global)`` over ``[−c, +c]`` into
``[0, quantization_range]`` with unbiased stochastic rounding. Sending the delta rather
than the adapter keeps the values small, so the quantisation step stays far below the
size of an update. With ``c`` set to the update-norm bound no coordinate is ever clipped,
since no coordinate of a vector exceeds its L2 norm.

Under distributed DP (site-level DP, :mod:`.ddp`) the mean is **unweighted**: the first
slot is 1 (so the sum counts the sites in it) and ``q`` is the site's *unweighted* update,
clipped to C, rounded and noised on the signed integer grid of step ``γ``, taken mod 2^32;
the sum is lifted back to signed integers and divided by the number of sites unmasked.
Each site then moves the mean by at most C/n whatever ``num-examples`` any site claims (a
weight is the site's own claim, and weights would let one site outweigh C/n).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.secagg.ddp import DistributedDP, from_ring, to_ring
from fedcpt.privacy.secagg.params import SecAggParams


def vector_length(reference: ArrayRecord) -> int:
    """Length of the encoded vector for adapters shaped like ``reference``."""
    return 1 + sum(a.numpy().size for a in reference.values())


def encode(update: ArrayRecord, reference: ArrayRecord, weight: int,
           params: SecAggParams, ddp: DistributedDP | None = None) -> np.ndarray:
    """Quantise ``weight/max_weight · (update − reference)`` into a uint32 vector (with
    ``ddp``: the unweighted update, clipped, rounded and noised on its grid, counted 1)."""
    if not 0 < weight <= params.max_weight:
        raise UpdateRejected(f"weight {weight} outside (0, {params.max_weight}]")
    delta = np.concatenate([
        (update[k].numpy().astype(np.float64) - ref.numpy()).ravel()
        for k, ref in reference.items()])
    if ddp is not None:
        return np.concatenate([[np.uint32(1)], to_ring(ddp.noised(delta))]).astype(np.uint32)
    c, levels = params.clipping_range, params.quantization_range
    scaled = (np.clip(delta * (weight / params.max_weight), -c, c) + c) * (levels / (2 * c))
    floor = np.floor(scaled)
    # Stochastic rounding keeps the sum unbiased; it needs no cryptographic randomness.
    quantized = floor + (np.random.default_rng().random(scaled.shape) < scaled - floor)
    return np.concatenate([[weight], np.minimum(quantized, levels)]).astype(np.uint32)


def decode(total: np.ndarray, contributors: int, reference: ArrayRecord,
           params: SecAggParams, ddp: DistributedDP | None = None) -> tuple[ArrayRecord, int]:
    """The weighted mean update (``reference`` + Σ wᵢ·Δᵢ / Σ wᵢ) and the total weight,
    from the unmasked sum of ``contributors`` encoded vectors (with ``ddp``: the unweighted
    mean Σ Δᵢ / n, and n as the weight)."""
    weight = int(total[0])
    if ddp is not None:
        if weight != contributors:
            raise UpdateRejected(f"the sum counts {weight} sites, not the {contributors} "
                                 "unmasked (under distributed DP each site counts once)")
        mean = from_ring(total[1:]).astype(np.float64) * (ddp.granularity / contributors)
    else:
        if not 0 < weight <= contributors * params.max_weight:
            raise UpdateRejected(f"the summed weight {weight} is impossible for "
                                 f"{contributors} sites of at most {params.max_weight} "
                                 "examples each")
        c, levels = params.clipping_range, params.quantization_range
        sums = total[1:].astype(np.float64) * (2 * c / levels) - contributors * c
        mean = sums * (params.max_weight / weight)
    arrays, start = {}, 0
    for key, ref in reference.items():
        base = ref.numpy()
        arrays[key] = Array((base + mean[start:start + base.size].reshape(base.shape))
                            .astype(base.dtype))
        start += base.size
    return ArrayRecord(arrays), weight
