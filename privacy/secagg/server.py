"""The server's side of a SecAgg+ round: route keys and shares, then unmask the sum.

:meth:`SecAggRound.share_keys` runs stages 1–2 (signed public keys, encrypted shares)
before the sites train; the training messages then carry each site's inbound shares
(stage 3); :meth:`SecAggRound.unmask` runs the consistency check (stage 4: every
survivor signs the survivor set; the server forwards all signatures) and the unmasking
(stage 5) on the masked vectors that arrived, rebuilding the private mask seeds of the
sites that answered and the mask keys of those that dropped after sharing keys. The
server never holds a site's update, only the sum. Nothing here is trusted by the sites:
:mod:`.site` checks everything this module sends.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.serverapp import Grid

from fedcpt.core import protocol as p
from fedcpt.exceptions import FedcptError
from fedcpt.privacy.secagg.context import TRAIN, RoundContext
from fedcpt.privacy.secagg.masking import agree, expand, public_key
from fedcpt.privacy.secagg.params import MIN_SECAGG_SITES, SecAggParams, neighbours
from fedcpt.privacy.secagg.site import MASK, STATE

log = logging.getLogger(__name__)

_ACTIONS = (p.SECAGG_SETUP, p.SECAGG_SHARE_KEYS, p.SECAGG_MASKED, p.SECAGG_CONSISTENCY,
            p.SECAGG_UNMASK)


def stage_types(purpose: str) -> tuple[str, ...]:
    """The message types of a session's five stages (core.protocol's actions in the
    purpose's category: ``train.secagg_setup`` … or ``evaluate.secagg_setup`` …)."""
    category = MessageType.TRAIN if purpose == TRAIN else MessageType.EVALUATE
    return tuple(f"{category}.{action}" for action in _ACTIONS)


# The training session's; stage 3 is the training message itself.
SETUP, SHARE_KEYS, MASKED, CONSISTENCY, UNMASK = stage_types(TRAIN)


class SecAggFailed(FedcptError):
    """Too few sites stayed in the round to finish secure aggregation."""


class SecAggRound:
    """Stages 1, 2, 4 and 5 of one round's session (``context.purpose``) over
    ``context.participants``, sent through ``grid``."""

    def __init__(self, grid: Grid, context: RoundContext, params: SecAggParams,
                 timeout: float) -> None:
        self.grid, self.params, self.timeout = grid, params, timeout
        self.context, self.round = context, context.server_round
        self.ctx = context.digest(params)
        self.nodes = list(context.participants)
        self.setup_type, self.share_type, _, self.consistency_type, self.unmask_type = (
            stage_types(context.purpose))
        self.public: dict[int, tuple[bytes, bytes]] = {}
        self.signed: dict[int, tuple[bytes, bytes]] = {}  # node -> (signature, certificate)
        self.peers: dict[int, list[int]] = {}
        self.shared: set[int] = set()
        self.failures: list[str] = []

    def _exchange(self, message_type: str, requests: Mapping[int, ConfigRecord],
                  ) -> dict[int, ConfigRecord]:
        """Send each node its request; the replies that came back without error."""
        messages = [Message(RecordDict({STATE: record}), dst_node_id=node,
                            message_type=message_type, group_id=str(self.round))
                    for node, record in requests.items()]
        replies: dict[int, ConfigRecord] = {}
        answered: set[int] = set()
        for msg in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_error():
                self._fail(node, message_type, msg.error.reason)
            elif STATE not in msg.content.config_records:
                self._fail(node, message_type, "reply carries no secagg record")
            else:
                replies[node] = msg.content.config_records[STATE]
        for node in sorted(set(requests) - answered):
            self._fail(node, message_type, "no reply within the round timeout")
        return replies

    def _fail(self, node: int, stage: str, reason: str) -> None:
        self.failures.append(f"node-{node}: {stage.split('_', 1)[-1]}: {reason}")
        log.warning("round %d: secure aggregation %s failed at node %d: %s", self.round,
                    stage, node, reason)

    def _require(self, present: set[int], stage: str) -> None:
        if len(present) < self.params.threshold:
            raise SecAggFailed(f"secure aggregation {stage}: {len(present)} sites left, below "
                               f"the reconstruction threshold {self.params.threshold}")

    def share_keys(self) -> dict[int, ConfigRecord]:
        """Stages 1–2; returns, per site still present, the shares addressed to it."""
        record = ConfigRecord({**self.params.to_record(), **self.context.to_record()})
        for node, reply in self._exchange(self.setup_type, {n: record for n in self.nodes}).items():
            keys = [reply.get(k) for k in ("pk1", "pk2", "signature", "cert")]
            if all(isinstance(k, bytes) for k in keys) and len(keys[0]) == len(keys[1]) == 32:
                self.public[node] = (keys[0], keys[1])
                self.signed[node] = (keys[2], keys[3])
            else:
                self._fail(node, self.setup_type, "malformed public keys")
        self._require(set(self.public), "setup")
        present = sorted(self.public)
        self.peers = {n: neighbours(present, n, self.params.num_shares) for n in present}
        requests = {n: ConfigRecord({"nodes": self.peers[n],
                                     "pk1": [self.public[p][0] for p in self.peers[n]],
                                     "pk2": [self.public[p][1] for p in self.peers[n]],
                                     "signature": [self.signed[p][0] for p in self.peers[n]],
                                     "cert": [self.signed[p][1] for p in self.peers[n]]})
                    for n in present}
        outgoing = {}
        for node, reply in self._exchange(self.share_type, requests).items():
            dsts, sealed = list(reply.get("dst", [])), list(reply.get("sealed", []))
            if sorted(dsts) != [p for p in self.peers[node] if p != node] or (
                    len(sealed) != len(dsts)) or not all(isinstance(c, bytes) for c in sealed):
                self._fail(node, self.share_type, "shares not addressed to its neighbours")
                continue
            outgoing[node] = dict(zip(dsts, sealed, strict=True))
        self.shared = set(outgoing)
        self._require(self.shared, "key sharing")
        return {dst: ConfigRecord({
                    "src": [s for s in sorted(self.shared) if dst in outgoing[s]],
                    "sealed": [outgoing[s][dst] for s in sorted(self.shared)
                               if dst in outgoing[s]]})
                for dst in sorted(self.shared)}

    def unmask(self, masked: Mapping[int, np.ndarray]) -> tuple[np.ndarray, int]:
        """Stage 4: the sum of the encoded vectors of the sites in ``masked`` (uint32),
        and how many sites it covers."""
        active = set(masked) & self.shared
        dead = self.shared - active
        self._require(active, "masked updates")
        if len(active) < MIN_SECAGG_SITES:
            raise SecAggFailed(f"secure aggregation: only {len(active)} masked updates "
                               f"arrived; a sum of fewer than {MIN_SECAGG_SITES} would reveal each "
                               "update to the other site")
        survivors = sorted(active)
        signatures = {}
        for node, reply in self._exchange(self.consistency_type, {n: ConfigRecord(
                {"survivors": survivors}) for n in survivors}).items():
            if isinstance(reply.get("signature"), bytes):
                signatures[node] = reply["signature"]
            else:
                self._fail(node, self.consistency_type, "no signature over the survivor set")
        self._require(set(signatures), "consistency check")
        signers = sorted(signatures)
        requests = {n: ConfigRecord({"survivors": survivors, "signers": signers,
                                     "signatures": [signatures[s] for s in signers],
                                     "active": [p for p in self.peers[n] if p in active],
                                     "dead": [p for p in self.peers[n] if p in dead]})
                    for n in signers}
        seed_shares: dict[int, list[bytes]] = {n: [] for n in active}
        key_shares: dict[int, list[bytes]] = {n: [] for n in dead}
        for node, reply in self._exchange(self.unmask_type, requests).items():
            nodes, shares = list(reply.get("nodes", [])), list(reply.get("shares", []))
            asked = requests[node]
            if nodes != list(asked["active"]) + list(asked["dead"]) or (
                    len(shares) != len(nodes)) or not all(isinstance(x, bytes) for x in shares):
                self._fail(node, self.unmask_type, "shares do not match the request")
                continue
            for owner, share in zip(nodes, shares, strict=True):
                (seed_shares if owner in active else key_shares)[owner].append(share)
        total = np.sum(np.stack([masked[n].astype(np.uint32) for n in sorted(active)]), axis=0,
                       dtype=np.uint32)
        for node, shares in seed_shares.items():
            total -= expand(self._rebuild(node, shares, "mask seed"), total.size)
        for node, shares in key_shares.items():
            partners = [p for p in self.peers[node] if p in active]
            if not partners:
                continue
            sk1 = self._rebuild(node, shares, "mask key")
            if public_key(sk1) != self.public[node][0]:
                raise SecAggFailed(f"secure aggregation: the shares of node {node}'s mask key "
                                   "rebuild a key that does not match its public key")
            for partner in partners:
                pairwise = expand(agree(sk1, self.public[partner][0], MASK + self.ctx),
                                  total.size)
                # the partner added it toward a higher id and subtracted it toward a lower
                total = total - pairwise if partner < node else total + pairwise
        return total, len(active)

    def _rebuild(self, node: int, shares: list[bytes], what: str) -> bytes:
        # Shares of one secret have one length and distinct indices (their first 4 bytes);
        # leave out any that do not, so one malformed reply cannot spoil the rebuild.
        length = Counter(len(x) for x in shares).most_common(1)[0][0] if shares else 0
        shares = list({x[:4]: x for x in shares if len(x) == length > 4}.values())
        if len(shares) < self.params.threshold:
            raise SecAggFailed(f"secure aggregation: only {len(shares)} shares of node "
                               f"{node}'s {what} arrived, below the threshold "
                               f"{self.params.threshold}")
        try:
            secret = combine_shares(shares[:self.params.threshold])
        except ValueError as err:  # pycryptodome's error for malformed shares
            raise SecAggFailed(f"secure aggregation: node {node}'s {what} cannot be rebuilt "
                               f"from its shares: {err}") from None
        if len(secret) != 32:
            raise SecAggFailed(f"secure aggregation: node {node}'s {what} rebuilt to "
                               f"{len(secret)} bytes, not 32")
        return secret
