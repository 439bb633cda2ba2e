"""Per-site LoRA ranks: truncate the global max-rank adapter to a site's rank, pad a site's
rank-r adapter back to the max-rank layout.

The method is HetLoRA's zero-padding (Cho et al., 2024, "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models", https://arxiv.org/abs/2401.06432): the global
adapter has the run's rank R (``lora.r``); a site of rank r ≤ R trains the first r rank-one
components, ``A[:r, :]`` and ``B[:, :r]`` of every module, and its *update* is zero on the
other coordinates. The server averages the zero-padded updates over the max-rank layout, so
component k is averaged over every site (a site that does not train it counts as a zero
update; HetLoRA's sparsity weighting and rank self-pruning are not used), and each site
next receives the max-rank result, of which it again trains the first r components.

LoRA's scale is alpha / r. A site at rank r uses alpha·r/R (:func:`lora_at_rank`), so every
site's scale is alpha / R: its truncated adapter is exactly the first r components of the
global one, and ΔW = scale·B·A has the same scale at every rank.

A peft key holds ``lora_A`` (shape ``(r, in)``) or ``lora_B`` (shape ``(out, r)``); fedcpt
adapts linear layers only (:class:`~fedcpt.config.LoraSettings`), so there is no other kind.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flwr.app import Array, ArrayRecord

from fedcpt.config import LoraSettings
from fedcpt.exceptions import UpdateRejected


def rank_axis(key: str) -> int:
    """The axis of tensor ``key`` that runs over the rank: 0 for ``lora_A``, 1 for
    ``lora_B``; UpdateRejected for anything else."""
    if ".lora_A." in key:
        return 0
    if ".lora_B." in key:
        return 1
    raise UpdateRejected(f"{key}: not a LoRA A or B tensor")


def max_rank(reference: ArrayRecord) -> int:
    """The rank of an adapter; UpdateRejected unless every tensor is a matrix and all
    share one rank."""
    bad = [k for k, v in reference.items() if v.numpy().ndim != 2]
    if bad:
        raise UpdateRejected(f"{bad[0]}: a LoRA tensor is a matrix, got shape "
                             f"{list(reference[bad[0]].numpy().shape)}")
    ranks = {ref.numpy().shape[rank_axis(k)] for k, ref in reference.items()}
    if len(ranks) != 1:
        raise UpdateRejected(f"adapter tensors have different ranks {sorted(ranks)}")
    return ranks.pop()


def site_rank(global_rank: int, cap: int) -> int:
    """The rank a site trains at: the run's ``lora.r``, or the site's cap if lower (0: none)."""
    return min(global_rank, cap) if cap else global_rank


def lora_at_rank(lora: LoraSettings, rank: int) -> LoraSettings:
    """``lora`` at ``rank`` ≤ ``lora.r``, with alpha scaled by rank / r so the LoRA scale
    alpha / r stays that of the global adapter."""
    if not 0 < rank <= lora.r:
        raise ValueError(f"rank {rank} outside [1, {lora.r}]")  # a caller's bug
    if rank == lora.r:
        return lora
    return dataclasses.replace(lora, r=rank, alpha=lora.alpha * rank / lora.r)


def shape_at_rank(key: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """Tensor ``key`` of a max-rank adapter (``shape``) at ``rank``."""
    out = list(shape)
    out[rank_axis(key)] = rank
    return tuple(out)


def truncate(arrays: ArrayRecord, rank: int) -> ArrayRecord:
    """The first ``rank`` components of every module (``A[:rank]``, ``B[:, :rank]``)."""
    out = {}
    for key, value in arrays.items():
        x = value.numpy()
        if rank > x.shape[rank_axis(key)]:
            raise UpdateRejected(f"{key}: rank {x.shape[rank_axis(key)]} is below {rank}")
        x = x[:rank] if rank_axis(key) == 0 else x[:, :rank]
        out[key] = Array(np.ascontiguousarray(x))
    return ArrayRecord(out)


def pad(trained: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``trained`` (rank r) in ``reference``'s max-rank layout: its r components, and
    ``reference``'s values elsewhere, so the update ``pad − reference`` is zero on every
    coordinate the site did not train. UpdateRejected unless ``trained`` has exactly
    ``reference``'s keys, one rank r ≤ R and otherwise its shapes and dtypes."""
    if set(trained.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(trained.keys()))[:3]
        extra = sorted(set(trained.keys()) - set(reference.keys()))[:3]
        raise UpdateRejected(f"adapter keys differ (missing {missing}, unexpected {extra})")
    rank = max_rank(trained)
    out = {}
    for key, ref in reference.items():
        base, got = ref.numpy(), trained[key].numpy()
        full = base.shape[rank_axis(key)]
        expected = shape_at_rank(key, base.shape, min(rank, full))
        if got.shape != expected or got.dtype != base.dtype:
            at = (f" (rank {rank} exceeds the global adapter's {full})" if rank > full
                  else f" (rank {rank} of {full})" if rank < full else "")
            raise UpdateRejected(f"{key}: expected {base.dtype}{list(expected)}, got "
                                 f"{got.dtype}{list(got.shape)}{at}")
        padded = base.copy()
        if rank_axis(key) == 0:
            padded[:rank] = got
        else:
            padded[:, :rank] = got
        out[key] = Array(padded)
    return ArrayRecord(out)
