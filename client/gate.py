"""The release gate: every reply leaves a site through :func:`send` or :func:`refuse`
(a released adapter may then be re-encoded for the wire: :func:`reencoded`).

:func:`send` applies the table of :mod:`fedcpt.privacy.gate` to each key of a reply: a key
that is accounted, public by construction, or released without DP by the site's own
policy leaves; any other key — including one nobody listed — is dropped and named in the
site's log (deny by default). A public key whose value the gate can compute from public
parameters must have exactly that value. :func:`refuse` sends the server one generic
sentence per error code; the reason stays in the site's own log. The ClientApp mod
:func:`fedcpt.client.errors.report_site_errors` sends nothing the gate did not pass.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, Error, Message, RecordDict

from fedcpt.client.node_keys import SITE_NAME_KEY
from fedcpt.core import protocol as p
from fedcpt.privacy import gate
from fedcpt.privacy.gate import NOT_SENT, PUBLIC, Mode

if TYPE_CHECKING:  # the key-exchange stages load this gate without the site's data code
    from fedcpt.client.request import SiteRequest

log = logging.getLogger(__name__)

GENERIC = {
    p.BUDGET_EXHAUSTED: "refused: the request is outside this site's privacy policy or "
                        "budget",
    p.UPDATE_REFUSED: "refused: a check at the site failed; nothing was sent",
    p.SITE_ERROR: "cannot take part in this round",
}
LOG_HINT = " (the reason is in the site's own log)"

_released: weakref.WeakSet[Message] = weakref.WeakSet()


class GateError(RuntimeError):
    """A handler gave the gate a public key with a value that is not the public one (a
    bug: it would leak a data-dependent value under a public label)."""


def mode(request: SiteRequest, reply: str, *, site_dp: bool = False) -> Mode:
    """The reply's mode, from the run config and the site's policy only."""
    return Mode(reply, dp_sgd=request.dp_sgd, site_dp=site_dp,
                eval_release=request.policy.eval_release,
                salted=bool(request.policy.ledger_path))


def _public_values(request: SiteRequest, m: Mode) -> dict[str, float]:
    """The public keys whose value the gate knows without the data."""
    if m.reply in (gate.TRAIN, gate.MASKED_TRAIN):
        values = {p.NUM_EXAMPLES: request.cfg.train.local_steps * request.cfg.train.batch_size}
        if m.protected:
            values[p.TRAIN_SECONDS] = 0.0
        return values
    if m.reply == gate.EVALUATE and m.eval_release == "noised":
        return {p.NUM_EXAMPLES: request.cfg.data.heldout_blocks * (request.cfg.data.block_size
                                                                   - 1)}
    return {}


def filtered(content: RecordDict, m: Mode, public: dict[str, float] | None = None,
             ) -> tuple[RecordDict, list[str]]:
    """``content`` with only what the gate lets out in mode ``m``, and what it dropped."""
    out, dropped = RecordDict(), []
    for name, record in content.items():
        if gate.is_whole_record(name):
            if gate.decide(name, None, m)[0] == NOT_SENT:
                dropped.append(name)
            else:
                out[name] = record
            continue
        kept = type(record)()
        for key in list(record.keys()):
            cls = gate.decide(name, key, m)[0]
            if cls == NOT_SENT:
                dropped.append(f"{name}.{key}")
                continue
            if cls == PUBLIC and public and key in public and record[key] != public[key]:
                raise GateError(f"`{name}.{key}` = {record[key]!r} is not its public value "
                                f"{public[key]!r} in {m.label()}")
            kept[key] = record[key]
        if len(kept):
            out[name] = kept
    return out, dropped


def send(request: SiteRequest, reply: str, content: RecordDict, *,
         site_dp: bool = False) -> Message:
    """The reply to ``request``, carrying only what the gate lets out."""
    m = mode(request, reply, site_dp=site_dp)
    return release(request.msg, request.node_config, m, content, _public_values(request, m))


def release(msg: Message, node_config: dict, m: Mode, content: RecordDict,
            public: dict[str, float] | None = None) -> Message:
    """The one exit of a reply with content: what the gate lets out in mode ``m``."""
    try:
        out, dropped = filtered(content, m, public)
    except GateError as err:
        log.error("release gate: %s", err)
        return refuse(msg, node_config, err, p.UPDATE_REFUSED)
    if dropped:
        log.warning("site %s: the release gate did not send %s (%s)", site_label(node_config),
                    ", ".join(dropped), m.label())
    message = Message(out, reply_to=msg)
    _released.add(message)
    return message


def reencoded(msg: Message, reply: Message, arrays: ArrayRecord) -> Message:
    """``reply`` (to ``msg``) with its released adapter replaced by ``arrays``: the same
    update cut to the site's rank and encoded for the wire (post-processing: no new key,
    nothing more about the data). Only a reply that passed the gate may be re-encoded."""
    if not released(reply) or p.ARRAYS not in reply.content.array_records:
        raise GateError("only a released adapter reply may be re-encoded")
    message = Message(RecordDict({**dict(reply.content.items()), p.ARRAYS: arrays}),
                      reply_to=msg)
    _released.add(message)
    return message


def site_label(node_config: dict) -> str:
    """How the site names itself in an error reply (a deployed site's name, else its
    simulated partition)."""
    if SITE_NAME_KEY in node_config:
        return str(node_config[SITE_NAME_KEY])
    return f"partition {node_config.get('partition-id', '?')}"


def refuse(msg: Message, node_config: dict, err: Exception, code: int) -> Message:
    """A generic error reply; the reason ``err`` is logged at the site only."""
    site = site_label(node_config)
    log.warning("site %s refused this %s message: %s", site, msg.metadata.message_type, err)
    return error_reply(msg, node_config, code)


def error_reply(msg: Message, node_config: dict, code: int) -> Message:
    """The error reply the server sees for ``code``: one generic sentence naming the site
    (the server knows it only by node id)."""
    message = Message(Error(code=code, reason=generic_reason(site_label(node_config), code)),
                      reply_to=msg)
    _released.add(message)
    return message


def generic_reason(site: str, code: int) -> str:
    return f"site {site}: {GENERIC.get(code, GENERIC[p.SITE_ERROR])}{LOG_HINT}"


def released(message: Message) -> bool:
    """Whether ``message`` left through this gate."""
    return message in _released
