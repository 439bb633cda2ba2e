"""One DP site as its own process, training round after round through the real ClientApp
train handler, that can SIGKILL itself at a chosen point of a chosen round.

    python -m fedcpt.testing.site_process --config cfg.json --data site.txt \\
        --ledger site.ledger.json --run-id RUN --replies DIR [--kill ROUND:POINT]

Each round's request is the previous round's reply (the first round's is the model's
initial adapter), as for a federation of one site; replies are written to
``DIR/round-NNN.safetensors`` once the handler returns. The process starts at the first
round without a reply, so running it again after a kill re-asks the killed round, as a
server does when a reply never came. The fault points are monkeypatched here; production
code has no fault hooks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save

import fedcpt.client.app as client_app
import fedcpt.client.train_step as train_step
import fedcpt.client.update_cache as update_cache
import fedcpt.privacy.ledger as ledger_module
from fedcpt.config import RunConfig
from fedcpt.core import protocol as p
from fedcpt.core.durable import write_durably
from fedcpt.core.model import load_adapted_model
from fedcpt.testing.site_round import site_context, task_identity, train_message

log = logging.getLogger("fedcpt.testing.site_process")

# Where a site can die, in the order a round passes them.
POINTS = {
    "training": "during DP-SGD training, before anything is written",
    "update-write": "half-way through writing the stored update (torn temp file)",
    "ledger-write": "half-way through the ledger write: update stored, spend not recorded",
    "after-ledger-write": "spend recorded and update stored, reply not yet sent",
    "after-reply": "reply built, lost before the server got it",
}


def die(point: str) -> None:
    log.warning("fault injection: killing site at %s", point)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def torn_write(point: str) -> Callable[[Path, bytes], None]:
    def write(path: Path, data: bytes) -> None:
        path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
        die(point)
    return write


def arm(point: str) -> None:
    """Install the kill at ``point`` (``after-reply`` is handled by the round loop)."""
    if point == "training":
        def train(*args, **kwargs):
            die(point)
        train_step.train_adapter_dp = train
    elif point == "update-write":
        update_cache.write_durably = torn_write(point)
    elif point == "ledger-write":
        ledger_module.write_durably = torn_write(point)
    elif point == "after-ledger-write":
        def write_then_die(path: Path, data: bytes) -> None:
            write_durably(path, data)
            die(point)
        ledger_module.write_durably = write_then_die
    elif point != "after-reply":
        raise SystemExit(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")


def reply_path(replies: Path, server_round: int) -> Path:
    return replies / f"round-{server_round:03d}.safetensors"


def read_arrays(path: Path) -> ArrayRecord:
    tensors = load_file(path)
    return ArrayRecord({k: Array(v) for k, v in sorted(tensors.items())})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="RunConfig JSON")
    parser.add_argument("--data", required=True)
    parser.add_argument("--ledger", type=Path, required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--replies", type=Path, required=True)
    parser.add_argument("--kill", default="", help="ROUND:POINT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s",
                        force=True)
    cfg = RunConfig.from_json(args.config.read_text())
    kill_round, _, point = args.kill.partition(":")
    args.replies.mkdir(parents=True, exist_ok=True)
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    context = site_context(args.data, args.ledger.resolve(), name="site")
    for server_round in range(1, cfg.federation.rounds + 1):
        if reply_path(args.replies, server_round).exists():
            continue
        request = (initial if server_round == 1
                   else read_arrays(reply_path(args.replies, server_round - 1)))
        killing = bool(point) and int(kill_round) == server_round
        if killing:
            arm(point)
        with task_identity():
            reply = client_app.train(train_message(cfg, args.run_id, server_round, request),
                                     context)
        if reply.has_error():
            log.error("round %d refused: %s", server_round, reply.error.reason)
            return 1
        if killing and point == "after-reply":
            die(point)
        arrays = reply.content[p.ARRAYS]
        metrics = {k: float(v) for k, v in reply.content[p.METRICS].items()}
        write_durably(reply_path(args.replies, server_round), save(
            {k: v.numpy() for k, v in arrays.items()},
            metadata={"metrics": json.dumps(metrics)}))
        log.info("round %d replied", server_round)
    return 0


if __name__ == "__main__":
    sys.exit(main())
