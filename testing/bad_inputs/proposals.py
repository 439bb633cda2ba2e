"""Server proposals that would loosen a site's privacy policy, each fed to the site's real
ClientApp handlers as a hostile server would send it. Each must be refused — a generic
reply to the server, the site's own log naming the key — and leave the site's ledger byte
for byte as it was."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from fedcpt.config import load_config
from fedcpt.exceptions import FedcptError
from fedcpt.testing.bad_inputs.judge import BadInput
from fedcpt.testing.site_round import site_context, task_identity, train_message

RUN = "hostile-run"
USERS = 40


def _site_data(folder: Path) -> Path:
    """A site's notes, 40 users of ~800 characters each, keyed by ``user_id``."""
    path = folder / "notes.jsonl"
    lines = [json.dumps({"user_id": f"p{u}", "text": " ".join(
        f"Note {i} of patient {u}: slept well, walked a little, asked about lunch."
        for i in range(11))}) for u in range(USERS)]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@contextlib.contextmanager
def site_log() -> Iterator[list[str]]:
    """The warnings and errors the site's ClientApp logs meanwhile (its refusal reasons)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler, logger = Keep(logging.WARNING), logging.getLogger("fedcpt.client")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def _hostile(overrides: list[str], handler: str = "train", ledger: bool = True,
             **policy: str) -> Callable[[Path], object]:
    """Send a smoke-dp message with ``overrides`` to a deployed site (unit: user_id)."""
    def attempt(folder: Path) -> object:
        import fedcpt.client.app as client_app
        from fedcpt.core.model import load_adapted_model

        cfg = load_config("smoke-dp", overrides=overrides)
        ledger_path = folder / "clinic.ledger.json"
        context = site_context(str(_site_data(folder)), ledger_path, name="clinic",
                               unit="field:user_id", **{"heldout-fraction": "0.3", **policy})
        if not ledger:
            del context.node_config["ledger-path"]
        before = ledger_path.read_bytes() if ledger_path.exists() else None
        # the adapter the server sends, shaped by the scenario's model (the harness never
        # opens a model the hostile config names: whether the site does is the question)
        initial = load_adapted_model(load_config("smoke-dp").model, cfg.lora,
                                     cfg.seed).initial_adapter
        with task_identity(), site_log() as logged:
            reply = getattr(client_app, handler)(train_message(cfg, RUN, 1, initial), context)
        after = ledger_path.read_bytes() if ledger_path.exists() else None
        if after != before:
            return f"accepted: the ledger changed ({handler})"
        if reply.has_error():
            if "the reason is in the site's own log" not in reply.error.reason:
                return f"refused, but the reply names its reason: {reply.error.reason}"
            raise FedcptError(" | ".join(logged))  # the site's own check, from its log
        return f"accepted ({handler} replied without an error)"
    return attempt


PROPOSAL = [  # what a hostile server sends; the site must refuse it
    BadInput("proposal-delta-loosened", "proposal", _hostile(["privacy.target_delta=0.2"]),
             r"refuses `privacy.target_delta` = 0.2: it would loosen the site's δ"),
    BadInput("proposal-delta-uncomputable", "proposal", _hostile(["privacy.target_delta=1e-30"]),
             r"refuses `privacy.target_delta` = 1e-30: below 1e-12, the smallest δ at which "
             r"its accountant computes ε"),
    BadInput("proposal-budget-raised", "proposal", _hostile(["privacy.target_epsilon=50"]),
             r"refuses `privacy.target_epsilon` = 50: it would loosen the site's ε budget 8"),
    BadInput("proposal-ledger-placed-by-server", "proposal",
             _hostile(["privacy.ledger_dir=/tmp/elsewhere"], ledger=False),
             r"has no ledger location: set `ledger-path`"),
    BadInput("proposal-heldout-fraction-raised", "proposal",
             _hostile(["data.heldout_fraction=0.99"]),
             r"refuses `data.heldout_fraction` = 0.99"),
    BadInput("proposal-single-heldout-block", "proposal",
             _hostile(["data.heldout_blocks=1"], "evaluate", **{"eval-release": "plain"}),
             r"refuses `data.heldout_blocks` = 1: a query must cover at least 8"),
    BadInput("proposal-dp-switched-off", "proposal",  # issue 25, attack 3
             _hostile(["privacy.enabled=false"], **{"epsilon-budget": "4"}),
             r"requires DP-SGD \(require-dp\) but the run has privacy.enabled = false"),
    BadInput("proposal-evaluate-when-release-is-nothing", "proposal",
             _hostile([], "evaluate", **{"require-dp": "true"}),
             r"releases no evaluation \(eval_release = nothing"),
]
