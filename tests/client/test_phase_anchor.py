"""The phase anchor at a site: local training is pulled toward the adapter the server says
the phase began from, and a request without one is refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

import fedcpt.client.app as client_app
from fedcpt.config import load_config
from fedcpt.core import protocol as p
from fedcpt.core.model import load_adapted_model
from fedcpt.exceptions import ConfigError, UpdateRejected
from fedcpt.testing.site_round import site_context, task_identity, train_message

CFG = load_config("smoke", overrides=["strategy.anchor=phase", "strategy.anchor_weight=40"])


def _distance(x: ArrayRecord, y: ArrayRecord) -> float:
    return float(sum(np.sum((x[k].numpy() - y[k].numpy()) ** 2) for k in x.keys()))


def _train(context, start: ArrayRecord | None):
    initial = load_adapted_model(CFG.model, CFG.lora, CFG.seed).initial_adapter
    with task_identity():  # Messages are built inside a Flower task
        msg = train_message(CFG, "run-a", 1, initial)
        if start is not None:
            msg.content[p.ANCHOR] = start
        return client_app.train(msg, context)


def test_training_is_pulled_toward_the_adapter_the_phase_began_from(tmp_path, write_text):
    context = site_context(str(write_text("clinic.txt")), tmp_path / "clinic.ledger.json",
                           name="clinic", **{"require-dp": "false"})  # a run without DP
    initial = load_adapted_model(CFG.model, CFG.lora, CFG.seed).initial_adapter
    # an earlier phase's solution: B moved away from 0 (a real ΔW = BA)
    start = ArrayRecord({k: Array(a.numpy() + (0.05 if "lora_B" in k else 0.0))
                         for k, a in initial.items()})
    toward_start = _train(context, start).content["arrays"]
    toward_initial = _train(context, initial).content["arrays"]  # the same seed and data
    assert _distance(toward_start, start) < 0.5 * _distance(toward_initial, start)


def test_the_phase_anchor_and_site_level_dp_are_a_config_error():
    with pytest.raises(ConfigError, match='anchor = "phase"'):
        load_config("smoke", overrides=["strategy.anchor=phase", "privacy.user_level=true"])


def test_a_request_without_the_phase_start_is_refused(tmp_path, write_text):
    context = site_context(str(write_text("clinic.txt")), tmp_path / "clinic.ledger.json",
                           name="clinic", **{"require-dp": "false"})  # a run without DP
    with pytest.raises(UpdateRejected, match="carries no 'anchor' record"):
        _train(context, None)  # Flower's runtime replies with the error


@pytest.mark.slow  # a real three-phase simulation: minutes on 2 cores (the slow tier)
def test_a_stream_with_the_phase_anchor_and_teacher_runs_every_phase(tmp_path):
    """Both pulls toward the phase's start, in one run: the sites' anchor, and the server's
    distillation toward the version committed before each later phase (none in phase 1)."""
    import json

    from fedcpt.simulations.runner import simulate

    summary = simulate(load_config("smoke-stream", overrides=[
        "strategy.anchor=phase", "strategy.distillation=pool", "strategy.distill_steps=1",
        "strategy.distill_teacher=phase"]), tmp_path / "run")
    assert summary["rounds_aggregated"] == 3 and summary["failures"] == 0
    assert summary["continual"]["bwt"] is not None
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    distilled = {r["round"]: r["server_steps"]["self_distillation"] for r in lines
                 if "self_distillation" in r.get("server_steps", {})}
    assert distilled[1] == {"steps": 0}
    assert distilled[2]["teacher"] == distilled[3]["teacher"] == "phase"
