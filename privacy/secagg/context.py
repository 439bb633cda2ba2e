"""The round context every SecAgg key, share and signature is bound to.

A round's context is a hash of (run id, round, purpose, the global adapter, the config,
the participants, the SecAgg parameters). The purpose is the session's job: ``train``
(the masked updates) or ``evaluate`` (the masked evaluation sums), so nothing of one
session — keys, signatures, shares — verifies or decrypts in the other. It goes into
the HKDF info of every derived key, the associated data of every encrypted share, and
every signature. A server that shows two sites different models or configs (Pasquini et
al., CCS 2022, "Eluding Secure Aggregation in Federated Learning via Model
Inconsistency") gives them different contexts: their signatures do not verify for one
another and their masks do not cancel. A site checks, before it trains or evaluates,
that the adapter and config it received are those its context committed to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from flwr.app import ArrayRecord, ConfigRecord

from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.secagg.params import SecAggParams

TRAIN, EVALUATE = "train", "evaluate"  # a session's purpose (and its message category)
PURPOSES = (TRAIN, EVALUATE)
_KEYS_LABEL, _SURVIVORS_LABEL = b"fedcpt/secagg/keys\0", b"fedcpt/secagg/survivors\0"


def adapter_digest(arrays: ArrayRecord) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name].numpy()
        h.update(json.dumps([name, str(a.dtype), list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def config_digest(config: ConfigRecord) -> str:
    """SHA-256 of a config record in canonical form (sorted keys; bytes as hex)."""
    def plain(value):
        if isinstance(value, bytes):
            return {"bytes": value.hex()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value
    text = json.dumps({k: plain(v) for k, v in config.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class RoundContext:
    """What the server committed to for one round, as every site must see it alike."""

    run_id: str
    server_round: int
    adapter: str
    """:func:`adapter_digest` of the global adapter the sites will train."""
    config: str
    """:func:`config_digest` of the training config the sites will receive."""
    participants: tuple[int, ...]
    """The node ids the server sampled for the round (sorted)."""
    purpose: str = TRAIN
    """What the session sums: the round's training updates or its evaluations."""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"run-id": self.run_id, "server-round": self.server_round,
                             "purpose": self.purpose,
                             "adapter-digest": self.adapter, "config-digest": self.config,
                             "participants": list(self.participants)})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundContext:
        try:
            participants = tuple(sorted(int(n) for n in record["participants"]))
            context = cls(run_id=str(record["run-id"]),
                          server_round=int(record["server-round"]),
                          adapter=str(record["adapter-digest"]),
                          config=str(record["config-digest"]), participants=participants,
                          purpose=str(record["purpose"]))
        except (KeyError, TypeError, ValueError) as err:
            raise UpdateRejected(f"malformed secure aggregation round context: {err}") from None
        if context.purpose not in PURPOSES:
            raise UpdateRejected(f"secure aggregation round context for purpose "
                                 f"{context.purpose!r}, not one of {list(PURPOSES)}")
        return context

    def digest(self, params: SecAggParams) -> bytes:
        """The 32-byte context hash (the parameters included)."""
        text = json.dumps({**asdict(self), "participants": list(self.participants),
                           "params": asdict(params)}, sort_keys=True)
        return hashlib.sha256(b"fedcpt/secagg/context\0" + text.encode()).digest()


def _node(node: int) -> bytes:
    return int(node).to_bytes(8, "little")


def keys_message(context: bytes, node: int, pk1: bytes, pk2: bytes) -> bytes:
    """What a site signs to advertise its round keys."""
    return _KEYS_LABEL + context + _node(node) + pk1 + pk2


def survivors_message(context: bytes, survivors: list[int], pk1: bytes, pk2: bytes) -> bytes:
    """What a site signs in the consistency check: the survivor set of the round, and its
    own public keys of this attempt. The keys are fresh each time the round is sent, so a
    signature from an earlier attempt of the same round cannot be replayed into this one."""
    return (_SURVIVORS_LABEL + context + pk1 + pk2
            + b"".join(_node(n) for n in sorted(survivors)))
