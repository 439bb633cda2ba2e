"""DP utility against a site's unit count N: the share of DP-off adaptation that unit-level
DP-SGD keeps at ε = 1, 4 and 8, for one site of about 1k, 10k and 100k units.

The corpus is ``gcide:entries`` (one privacy unit per dictionary headword, ~108k of them).
One held-out set (units chosen by a salted hash) serves every point; the sites are the
remaining units capped by the site's own rule (:func:`fedcpt.core.data.kept_by_hash`), so
the 1k site's units are among the 10k site's. Every point runs the site's training code
(:func:`fedcpt.core.training.train_adapter` with DP off, :func:`fedcpt.privacy.dpsgd.
train_adapter_dp` with σ planned by :func:`fedcpt.privacy.plan.plan_site` for the budget)
from the same initial adapter at the same compute: ``--steps`` steps of ``--batch`` blocks
(expected, under Poisson sampling) of ``--block-size`` tokens, with shakespeare-dp's DP
recipe (C = 0.1, FFA-LoRA, lr 0.01, AdamW). Adaptation = base − final held-out loss.

The block size is shorter than the default 128 tokens because a unit shorter than one
block gives no block (``core/data.py``): at 24 tokens ~95k entries count, at 128 only ~10k.
The compute is about 144 blocks of 128 tokens (12 × 64 × 24 = 18,432 tokens) per point.

    python benchmarks/dp_utility_vs_units.py --out results/dp_utility_vs_units.json

The JSON is rewritten after every point, so a cut run keeps what finished. On a shared CPU
the site sizes can run as separate processes (``--units 1000 --out a.json`` …) and be
joined with ``--merge a.json b.json … --out results/dp_utility_vs_units.json``, which
refuses parts whose settings or base held-out loss differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from _common import cpu_class, load_average, setup, write

from fedcpt.config import load_config
from fedcpt.core.data import (
    blocks_of_units,
    group_units,
    heldout_by_hash,
    kept_by_hash,
    read_records,
    spread,
)
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.model import AdaptedModel, load_adapted_model
from fedcpt.core.training import train_adapter
from fedcpt.privacy.dpsgd import train_adapter_dp
from fedcpt.privacy.plan import plan_site

log = logging.getLogger("dp_utility_vs_units")
CORPUS = "gcide:entries"
SALT = "dp-utility-vs-units"  # a public salt: this benchmark's split, not a site's secret


def adapter_state(lm: AdaptedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters() if "lora_" in n}


def restore(lm: AdaptedModel, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in lm.model.named_parameters():
            if name in state:
                param.copy_(state[name])


def kept_shares(points: list[dict]) -> dict[str, dict[str, float]]:
    """Adaptation kept = DP / DP-off adaptation, per site size and ε."""
    off = {p["units"]: p["adaptation"] for p in points if p["epsilon"] is None}
    shares: dict[str, dict[str, float]] = {}
    for p in points:
        if p["epsilon"] is not None and p["units"] in off:
            shares.setdefault(str(p["units"]), {})[str(p["epsilon"])] = (
                p["adaptation"] / off[p["units"]])
    return shares


SAME = ("model", "corpus", "unit", "block_size", "steps", "expected_batch",
        "tokens_per_point", "lr", "max_grad_norm", "ffa_lora", "accountant", "corpus_units",
        "heldout_blocks")


def merge(parts: list[dict]) -> dict:
    """One result from runs of the same benchmark over different site sizes."""
    first = parts[0]
    for part in parts[1:]:
        differ = [k for k in SAME if part[k] != first[k]]
        if differ or abs(part["base_loss"] - first["base_loss"]) > 1e-3:
            raise SystemExit(f"cannot merge runs that differ in {differ or ['base_loss']}")
    points = sorted((p for part in parts for p in part["points"]),
                    key=lambda p: (p["units"], p["epsilon"] is not None, -(p["epsilon"] or 0)))
    return {**{k: first[k] for k in ("benchmark", *SAME, "base_loss", "cpu_class")},
            "points": points, "kept": kept_shares(points),
            "load_average": [a for part in parts for a in part["load_average"]],
            "parts": len(parts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="join these results (one per site size) into --out")
    parser.add_argument("--model", default="", help="model name (default: shakespeare-dp's)")
    parser.add_argument("--units", type=int, nargs="+", default=[1_000, 10_000, 100_000],
                        help="target site sizes; one beyond the corpus takes all its units")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 1.0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=24)
    parser.add_argument("--heldout-fraction", type=float, default=0.02)
    parser.add_argument("--eval-blocks", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    setup(args.threads)
    if args.merge:
        write(args.out, merge([json.loads(path.read_text()) for path in args.merge]))
        return
    load_before = load_average()

    cfg = load_config("shakespeare-dp")
    model_cfg = (dataclasses.replace(cfg.model, name=args.model) if args.model
                 else cfg.model)
    train = dataclasses.replace(cfg.train, local_steps=args.steps, batch_size=args.batch,
                                max_physical_batch_size=32)
    lm = load_adapted_model(model_cfg, cfg.lora, cfg.seed)
    initial = adapter_state(lm)

    units = group_units(read_records(CORPUS), "document")
    split = heldout_by_hash(args.heldout_fraction, SALT)
    candidates = sum(1 for held in split(list(units)) if not held)
    heldout = None
    base_loss = None
    points: list[dict] = []
    header = {
        "benchmark": "dp_utility_vs_units",
        "model": model_cfg.name,
        "corpus": CORPUS,
        "unit": "document (one dictionary entry)",
        "block_size": args.block_size,
        "steps": args.steps,
        "expected_batch": args.batch,
        "tokens_per_point": args.steps * args.batch * args.block_size,
        "lr": train.lr,
        "max_grad_norm": cfg.privacy.max_grad_norm,
        "ffa_lora": cfg.privacy.ffa_lora,
        "accountant": cfg.privacy.accountant,
        "corpus_units": len(units),
    }

    for target in args.units:
        share = min(1.0, target / candidates)
        blocks = blocks_of_units(units, lm.tokenizer, block_size=args.block_size,
                                 heldout_rule=split,
                                 keep_rule=kept_by_hash(share, SALT) if share < 1 else None,
                                 what=CORPUS, unit="document")
        if heldout is None:
            heldout = spread(blocks.heldout, args.eval_blocks)
            base_loss = evaluate_blocks(lm, heldout, cfg.train.eval_batch_size).loss
            log.info("base held-out loss %.4f on %d blocks", base_loss, len(heldout))
        n = blocks.units
        for eps in [None, *args.epsilons]:
            restore(lm, initial)
            start = time.perf_counter()
            point: dict = {"target_units": target, "units": n, "epsilon": eps}
            if eps is None:
                result = train_adapter(lm, blocks.train, train, lr=train.lr, seed=cfg.seed)
            else:
                privacy = dataclasses.replace(cfg.privacy, target_epsilon=eps)
                plan = plan_site(privacy, site="benchmark", records=n,
                                 batch_size=train.batch_size, steps=train.local_steps)
                point.update(delta=plan.delta, sample_rate=plan.sample_rate,
                             noise_multiplier=plan.noise_multiplier,
                             planned_epsilon=plan.expected_epsilon)
                result = train_adapter_dp(lm, blocks.train, train, privacy, lr=train.lr,
                                          noise_multiplier=plan.noise_multiplier,
                                          sample_rate=plan.sample_rate,
                                          units=blocks.train_units)
            final = evaluate_blocks(lm, heldout, cfg.train.eval_batch_size).loss
            point.update(final_loss=final, adaptation=base_loss - final,
                         train_seconds=result.seconds,
                         point_seconds=time.perf_counter() - start,
                         load_average=load_average())
            points.append(point)
            log.info("N=%d ε=%s: adaptation %.4f (%.0f s)", n, eps, base_loss - final,
                     point["point_seconds"])
            write(args.out, {**header, "heldout_blocks": len(heldout), "base_loss": base_loss,
                             "points": points, "kept": kept_shares(points),
                             "cpu_class": cpu_class(),
                             "load_average": [load_before, load_average()]})


if __name__ == "__main__":
    main()
