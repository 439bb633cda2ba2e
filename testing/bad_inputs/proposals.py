"""Server proposals that would loosen a site's privacy policy, each fed to the site's real
ClientApp handlers as a hostile server would send it (through the ClientApp's last check,
:func:`fedcpt.client.errors.report_site_errors`, as Flower does). Each must be refused — one
generic sentence to the server, with no count or value in it (issue 25, attack 4b), the
site's own log naming the key — and leave the site's ledger byte for byte as it was."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Message

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


@dataclass
class Exchange:
    """What a hostile server's messages got from a deployed site: the replies, the site's
    ledger (its bytes before the first message) and the site's own log meanwhile."""

    replies: list[Message]
    ledger: Path
    before: bytes | None
    logged: list[str]

    def ledger_changed(self) -> bool:
        return (self.ledger.read_bytes() if self.ledger.exists() else None) != self.before


def exchange(folder: Path, overrides: list[str], handler: str = "train", *,
             ledger: bool = True, sent: dict[str, object] | None = None, asks: int = 1,
             **policy: str) -> Exchange:
    """Send a smoke-dp message with ``overrides`` (and the raw run-config keys ``sent``,
    which no config of fedcpt's would hold) ``asks`` times to a deployed site (unit:
    user_id), through the ClientApp's last check as Flower would
    (:func:`fedcpt.client.errors.report_site_errors`)."""
    import fedcpt.client.app as client_app
    from fedcpt.client.errors import report_site_errors
    from fedcpt.core import protocol as p
    from fedcpt.core.model import load_adapted_model

    cfg = load_config("smoke-dp", overrides=overrides)
    ledger_path = folder / "clinic.ledger.json"
    data = folder / "notes.jsonl"
    context = site_context(str(data if data.exists() else _site_data(folder)), ledger_path,
                           name="clinic", unit="field:user_id",
                           **{"heldout-fraction": "0.3", **policy})
    if not ledger:
        del context.node_config["ledger-path"]
    before = ledger_path.read_bytes() if ledger_path.exists() else None
    # the adapter the server sends, shaped by the scenario's model (the harness never
    # opens a model the hostile config names: whether the site does is the question)
    initial = load_adapted_model(load_config("smoke-dp").model, cfg.lora,
                                 cfg.seed).initial_adapter
    replies = []
    with task_identity(), site_log() as logged:
        for _ in range(asks):
            msg = train_message(cfg, RUN, 1, initial)
            if sent:
                config = json.loads(cfg.to_json())
                for key, value in sent.items():
                    section, name = key.split(".", 1)
                    config[section][name] = value
                msg.content[p.CONFIG][p.RUN_CONFIG] = json.dumps(config, sort_keys=True)
            replies.append(report_site_errors(msg, context, getattr(client_app, handler)))
    return Exchange(replies, ledger_path, before, logged)


def _hostile(overrides: list[str], handler: str = "train", ledger: bool = True,
             sent: dict[str, object] | None = None, **policy: str) -> Callable[[Path], object]:
    """Send a smoke-dp message with ``overrides`` to a deployed site (unit: user_id); a
    refusal counts only with the ledger unchanged and one generic sentence to the server
    (no count, no value: the reason is in the site's own log)."""
    def attempt(folder: Path) -> object:
        sent_back = exchange(folder, overrides, handler, ledger=ledger, sent=sent, **policy)
        [reply] = sent_back.replies
        if sent_back.ledger_changed():
            return f"accepted: the ledger changed ({handler})"
        if reply.has_error():
            if ("the reason is in the site's own log" not in reply.error.reason
                    or any(ch.isdigit() for ch in reply.error.reason)):
                return f"refused, but the reply names its reason: {reply.error.reason}"
            raise FedcptError(" | ".join(sent_back.logged))  # the site's own check, its log
        return f"accepted ({handler} replied without an error)"
    return attempt


PROPOSAL = [  # what a hostile server sends; the site must refuse it
    BadInput("proposal-delta-loosened", "proposal", _hostile(["privacy.target_delta=0.2"]),
             r"refuses `privacy.target_delta` = 0.2: it would loosen the site's δ"),
    BadInput("proposal-delta-uncomputable", "proposal", _hostile(["privacy.target_delta=1e-30"]),
             r"refuses `privacy.target_delta` = 1e-30: below 1e-12, the smallest δ at which "
             r"its accountant computes ε", attack="7b"),
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
             r"refuses `data.heldout_blocks` = 1: a query must cover at least 8", attack="6c"),
    BadInput("proposal-noised-query-below-the-floor", "proposal",  # on public values only
             _hostile(["data.heldout_blocks=7"], "evaluate", **{"eval-release": "noised"}),
             r"refuses `data.heldout_blocks` = 7: a query must cover at least 8", attack="4a"),
    BadInput("proposal-dp-switched-off", "proposal",
             _hostile(["privacy.enabled=false"], **{"epsilon-budget": "4"}),
             r"requires DP-SGD \(require-dp\) but the run has privacy.enabled = false",
             attack="3"),
    BadInput("proposal-evaluate-when-release-is-nothing", "proposal",
             _hostile([], "evaluate", **{"require-dp": "true"}),
             r"releases no evaluation \(eval_release = nothing"),
]
