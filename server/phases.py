"""Which nodes a phase trains on, while every site is still evaluated, and the adapter
each phase began from.

A continual stream (``[[phases]]``) trains some sites per phase but needs every site's
held-out loss after each phase (the loss matrix), so the round loop samples training
nodes from the phase's nodes (:func:`phase_nodes`) and evaluation nodes from all. Node
ids are random per process, so the server asks each node once which site it is
(:func:`discover_sites`, answered by the ClientApp's query handler).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedcpt.config import Phase
from fedcpt.core import protocol as p
from fedcpt.exceptions import FedcptError

log = logging.getLogger(__name__)


def discover_sites(grid: Grid, num_sites: int, config: ConfigRecord,
                   timeout: float) -> dict[int, str]:
    """Node id → site name, asked of every connected node once ``num_sites`` are up."""
    while len(nodes := list(grid.get_node_ids())) < num_sites:
        log.info("waiting for sites to connect: %d of %d", len(nodes), num_sites)
        time.sleep(1)
    queries = [Message(content=RecordDict({p.CONFIG: ConfigRecord(dict(config))}),
                       dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    names: dict[int, str] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise FedcptError(f"node {node} did not say which site it is: "
                              f"{reply.error.reason}")
        names[node] = str(reply.content.config_records[p.SITE]["name"])
    missing = sorted(set(nodes) - set(names))
    if missing:
        raise FedcptError(f"nodes {missing} did not say which site they are within "
                          f"{timeout:g} s")
    return names


def phase_nodes(directory: dict[int, str], sites: Iterable[str], phase: str) -> list[int]:
    """The nodes of a phase's sites; FedcptError if a site has no connected node."""
    wanted = set(sites)
    nodes = [n for n, name in directory.items() if name in wanted]
    absent = sorted(wanted - {directory[n] for n in nodes})
    if absent:
        raise FedcptError(f"phase {phase!r} needs sites {absent}, but no connected node is "
                          f"that site (connected: {sorted(set(directory.values()))})")
    return nodes


class PhaseStarts:
    """The global adapter each phase began from (the phase anchor's target, the phase
    teacher): the adapter of the phase's first round, or, in a run resumed inside the
    phase, the version committed before that round (``version(round, layout)``)."""

    def __init__(self, version: Callable[[int, ArrayRecord], ArrayRecord]) -> None:
        self.version = version
        self._held: tuple[int, ArrayRecord] | None = None

    def at(self, phase: Phase, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The adapter ``phase`` began from, in its round ``server_round`` (``arrays``: the
        adapter that round began from)."""
        if self._held is None or self._held[0] != phase.index:
            start = (arrays if server_round == phase.first_round
                     else self.committed(phase, arrays))
            self._held = (phase.index, start)
        return self._held[1]

    def committed(self, phase: Phase, layout: ArrayRecord) -> ArrayRecord:
        """The adapter ``phase`` began from as committed: the version of the round before
        its first (``layout``: its tensors' layout)."""
        return self.version(phase.first_round - 1, layout)
