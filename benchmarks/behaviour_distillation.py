"""Behaviour drift with and without the self-distillation step, from the same adapted start.

SmolLM2-135M-Instruct with the `shakespeare-fedavg` scenario's LoRA and data settings. The adapter
is trained on the three sites' Shakespeare (pooled: a centralised stand-in for the round's
aggregate, since a federated grid does not fit this shared machine), then each arm applies
one server step to that same adapter:

- ``none``: nothing (the drifted aggregate);
- ``distill-<text>``: :class:`~fedcpt.server.steps.self_distillation.SelfDistillation` on
  the rehearsal pool, the chat answers, or both.

For each arm: mean KL(base ‖ adapted) per token on held-out general text (in-pool kinds,
out-of-pool kinds, overall), the loss of the base model's answers to the evaluation prompts
(increase over the base) and their exact-match rate, and the held-out Shakespeare loss
(adaptation = base − after). "removed" is the share of the ``none`` arm's drift an arm
takes away; "kept" the share of its adaptation.

    python benchmarks/behaviour_distillation.py --out results/behaviour_distillation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from _common import cpu_class, load_average, setup, write

from fedcpt.client.site import site_blocks
from fedcpt.config import load_config
from fedcpt.core.adapters import adapter_state, load_adapter, to_arrays
from fedcpt.core.behaviour import INSTRUCTION_PROMPTS, answer_retention, base_answers
from fedcpt.core.data import spread
from fedcpt.core.evaluation import evaluate_blocks, evaluate_kinds
from fedcpt.core.model import load_adapted_model
from fedcpt.core.training import train_adapter
from fedcpt.server.app import general_data, self_distillation


def measure(lm, kinds, in_pool, answers, domain, batch: int) -> dict:
    per_kind, overall = evaluate_kinds(lm, kinds, batch, kl_to_base=True)
    inside = [per_kind[k].kl_to_base for k in kinds if k in in_pool]
    outside = [per_kind[k].kl_to_base for k in kinds if k not in in_pool]
    kept = answer_retention(lm, answers)
    return {"kl_overall": overall.kl_to_base, "kl_in_pool": sum(inside) / len(inside),
            "kl_out_of_pool": sum(outside) / len(outside),
            "kl_per_kind": {k: r.kl_to_base for k, r in per_kind.items()},
            "answer_loss": kept.loss, "exact_match": kept.exact_match,
            "domain_loss": evaluate_blocks(lm, domain, batch).loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenario", default="shakespeare-fedavg")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--distill-steps", type=int, default=8)
    parser.add_argument("--arms", default="pool,both", help="distillation texts to try")
    parser.add_argument("--eval-blocks", type=int, default=8, help="per general kind")
    parser.add_argument("--prompts", type=int, default=8, help="evaluation prompts")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    start = time.perf_counter()
    cfg = load_config(args.scenario, overrides=[f"strategy.distill_steps={args.distill_steps}"])
    lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
    general = general_data(cfg)
    kinds = {k: spread(v, args.eval_blocks) for k, v in general.kinds.items()}
    sites = [site_blocks(s, cfg.model, cfg.data) for s in cfg.sites]
    domain_train = torch.cat([b.train for b in sites])
    domain_eval = spread(torch.cat([b.heldout for b in sites]), 16)
    answers = base_answers(lm, INSTRUCTION_PROMPTS[:args.prompts], cfg.data.answer_tokens)
    base = measure(lm, kinds, general.in_pool, answers, domain_eval,  # B = 0: the base
                   cfg.train.eval_batch_size)
    train = dataclasses.replace(cfg.train, local_steps=args.train_steps)
    train_adapter(lm, domain_train, train, lr=cfg.train.lr, seed=cfg.seed)
    drifted = to_arrays(adapter_state(lm.model))
    arms = {"none": measure(lm, kinds, general.in_pool, answers, domain_eval,
                            cfg.train.eval_batch_size)}
    timing = {}
    for text in [a.strip() for a in args.arms.split(",") if a.strip()]:
        arm_cfg = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy,
                                                                        distillation=text))
        step = self_distillation(arm_cfg, lm, general)
        t0 = time.perf_counter()
        result = step.apply(1, drifted, drifted, client_examples=0)
        timing[f"distill-{text}"] = time.perf_counter() - t0
        load_adapter(lm.model, result.arrays)
        arms[f"distill-{text}"] = measure(lm, kinds, general.in_pool, answers, domain_eval,
                                          cfg.train.eval_batch_size)
        load_adapter(lm.model, drifted)
    ref = arms["none"]
    ref_answer = ref["answer_loss"] - base["answer_loss"]
    ref_adapt = base["domain_loss"] - ref["domain_loss"]
    for row in arms.values():
        row["answer_loss_increase"] = row["answer_loss"] - base["answer_loss"]
        row["adaptation"] = base["domain_loss"] - row["domain_loss"]
        row["removed"] = {k: 1 - row[k] / ref[k] for k in ("kl_overall", "kl_in_pool",
                                                            "kl_out_of_pool")}
        row["removed"]["answer_loss_increase"] = 1 - row["answer_loss_increase"] / ref_answer
        row["adaptation_kept"] = row["adaptation"] / ref_adapt
    write(args.out, {"benchmark": "behaviour_distillation", "scenario": args.scenario,
                     "train_steps": args.train_steps, "distill_steps": args.distill_steps,
                     "lr": cfg.train.lr, "eval_blocks_per_kind": args.eval_blocks,
                     "prompts": args.prompts, "base": base, "arms": arms,
                     "distill_seconds": timing, "seconds": time.perf_counter() - start,
                     "cpu": cpu_class(), "load_average": load_average()})


if __name__ == "__main__":
    main()
