"""Drive a site's real train handler (:func:`fedcpt.client.app.train`) without Flower's
runtime: the same Message and Context a SuperNode would hand it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcpt.config import RunConfig
from fedcpt.core import protocol as p

_IDENTITY = ("task_id", "run_id", "node_id")


def _current(name: str) -> int | None:
    try:
        return getattr(TaskIdentity, name)
    except RuntimeError:  # Flower's getter raises while no task runs in this process
        return None


@contextlib.contextmanager
def task_identity() -> Iterator[None]:
    """Messages are created inside a running Flower task; act as one (task 1, run 1,
    node 0) through TaskIdentity's public setters, as Flower's own runtimes do."""
    saved = {name: _current(name) for name in _IDENTITY}
    for name, value in zip(_IDENTITY, (1, 1, 0), strict=True):
        setattr(TaskIdentity, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


def train_message(cfg: RunConfig, run_id: str, server_round: int,
                  arrays: ArrayRecord) -> Message:
    """The server's request: train ``arrays`` for round ``server_round`` of run ``run_id``."""
    config = ConfigRecord({p.RUN_CONFIG: cfg.to_json(), p.RUN_ID: run_id,
                           p.SERVER_ROUND: server_round})
    return Message(content=RecordDict({p.ARRAYS: arrays, p.CONFIG: config}), dst_node_id=1,
                   message_type=MessageType.TRAIN)


def site_context(data: str, ledger: Path, name: str = "site", unit: str = "passage",
                 **policy: str) -> Context:
    """A deployed site's context: its name, data, ledger and privacy policy from
    ``--node-config`` (the unit defaults to passages: test sites are one generated file)."""
    node_config = {"site-name": name, "data-path": data, "ledger-path": str(ledger),
                   "privacy-unit": unit, **policy}
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})
