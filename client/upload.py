"""Client mod: a plain training reply leaves the site at the site's own LoRA rank and in the
run's ``federation.upload_dtype`` (:mod:`fedcpt.core.upload`), with error feedback.

The train handler returns the adapter in the global max-rank layout (what Flower's
clipping mod and the secure-aggregation encoding work on); this mod, outside both, cuts it
to the site's rank and encodes it. Secure-aggregation messages are not touched: their
update is quantised for masking already.

The error-feedback residual is kept in the site's state (``context.state``, which Flower
keeps per node for the run). For each round it starts from the residual the previous
round left, so a round sent again (a retry, or a DP site resending the update it already
paid for, :mod:`~fedcpt.client.update_cache`) encodes to the same bytes and never adds
the residual twice. A residual of another run, rank or dtype is dropped.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedcpt.client import gate
from fedcpt.core import protocol as p

log = logging.getLogger(__name__)

RESIDUAL = "upload-residual"        # ArrayRecord: the error the last encoded round left
RESIDUAL_IN = "upload-residual-in"  # ArrayRecord: the residual that round started from
RESIDUAL_OF = "upload-residual-of"  # ConfigRecord: run, round, rank and dtype of the two


def compact_upload(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Encode a plain training reply's adapter for the wire (see the module docstring)."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error() or (
            p.ARRAYS not in reply.content.array_records):
        return reply
    # imported past the return above, so that other messages start without torch
    # (Flower starts a ClientApp process per message: fedcpt.client.app)
    from fedcpt.client.request import request_for
    from fedcpt.core.upload import encode_upload

    request = request_for(msg, context)  # the handler's, resolved once
    rank, dtype = request.rank, request.cfg.federation.upload_dtype
    run, server_round = request.run_id, request.server_round
    residual = _residual(context.state, run, server_round, rank, dtype)
    wire, left = encode_upload(reply.content[p.ARRAYS], msg.content[p.ARRAYS], rank, dtype,
                               residual)
    if left is not None:
        context.state[RESIDUAL_IN] = residual if residual is not None else ArrayRecord()
        context.state[RESIDUAL] = left
        context.state[RESIDUAL_OF] = ConfigRecord({"run": run, "round": server_round,
                                                   "rank": rank, "dtype": dtype})
    return gate.reencoded(msg, reply, wire)


def _residual(state: RecordDict, run: str, server_round: int, rank: int,
              dtype: str) -> ArrayRecord | None:
    """The residual round ``server_round`` starts from (None: none yet)."""
    of = state.config_records.get(RESIDUAL_OF)
    if of is None:
        return None
    if (str(of["run"]), int(of["rank"]), str(of["dtype"])) != (run, rank, dtype):
        log.info("dropping the upload residual of another run, rank or dtype")
        return None
    if int(of["round"]) == server_round:  # the same round again: start where it started
        kept = state.array_records[RESIDUAL_IN]
        return kept if len(kept) else None
    return state.array_records[RESIDUAL]
