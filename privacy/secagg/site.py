"""One site's side of a SecAgg+ round, secure against a malicious server.

Stages (Bonawitz et al. 2017, §4 malicious setting, on SecAgg+'s neighbour graph):

1. :func:`setup` — fresh key pairs, signed with the site's long-term identity over the
   round context (:mod:`.context`);
2. :func:`share_keys` — verify every neighbour's certificate and signature against this
   site's own CA, then send Shamir shares of the mask seed and mask key, each encrypted
   for one neighbour;
3. :func:`receive_shares` + :func:`mask` — check that the adapter and config received
   are those the context committed to, keep the inbound shares, mask the update;
4. :func:`consistency` — sign the survivor set the server announces (once per round);
5. :func:`unmask` — reveal shares only with ``threshold`` valid neighbour signatures over
   that same set: seed shares of survivors, mask-key shares of the others, never both
   for one neighbour and never its own mask key.

The site's secrets live in its Flower ``Context.state`` between messages and are deleted
once it has answered stage 5. Every stage checks that it follows the previous one, so a
server cannot replay or reorder them. A round has up to two sessions, one per purpose
(``train``: the masked update; ``evaluate``: the masked evaluation sum): each stage is
called with the purpose of the message that reached it, keeps its secrets under its own
key (:func:`state_key`), and stage 1 refuses a round context bound to another purpose.
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.secure_aggregation.crypto.shamir import create_shares

from fedcpt.exceptions import ConfigError, UpdateRejected
from fedcpt.privacy.secagg.context import (
    TRAIN,
    RoundContext,
    adapter_digest,
    config_digest,
    keys_message,
    survivors_message,
)
from fedcpt.privacy.secagg.identity import SiteIdentity, verify_signed
from fedcpt.privacy.secagg.masking import agree, expand, new_key_pair, seal, unseal
from fedcpt.privacy.secagg.params import MIN_SECAGG_SITES, SecAggParams

STATE = "secagg"  # the stage messages' record; in Context.state, the training secrets
SHARES, MASK = b"shares", b"mask"  # key-derivation purposes (the context is appended)


def state_key(purpose: str) -> str:
    """The Context.state record holding a session's secrets: one per purpose, so a
    round's evaluation never overwrites or reads its training session's."""
    return STATE if purpose == TRAIN else f"{STATE}-{purpose}"


def _state(context: Context, stage: str, purpose: str) -> ConfigRecord:
    state = context.state.config_records.get(state_key(purpose))
    if state is None or state["stage"] != stage:
        got = "none" if state is None else state["stage"]
        raise UpdateRejected(f"secure aggregation message out of order: expected the stage "
                             f"after '{stage}', this site is at '{got}'")
    return state


def _pack(seed_share: bytes, key_share: bytes) -> bytes:
    return len(seed_share).to_bytes(4, "little") + seed_share + key_share


def _unpack(data: bytes) -> tuple[bytes, bytes]:
    n = int.from_bytes(data[:4], "little")
    return data[4:4 + n], data[4 + n:]


def _ints(request: ConfigRecord, key: str) -> list[int]:
    try:
        return [int(n) for n in request[key]]
    except (KeyError, TypeError, ValueError):
        raise UpdateRejected(f"malformed secure aggregation request: no node list "
                             f"'{key}'") from None


def setup(context: Context, node: int, request: ConfigRecord,
          identity: SiteIdentity, purpose: str = TRAIN) -> ConfigRecord:
    """Stage 1: fresh key pairs for this round's ``purpose`` session; publish the public
    halves, signed over the round context, with this site's certificate."""
    params = SecAggParams.from_record(request)
    try:  # the site's own check: a server must not weaken what protects this update
        params.check(params.num_shares)
    except ConfigError as err:
        raise UpdateRejected(f"refusing secure aggregation parameters: {err}") from None
    round_context = RoundContext.from_record(request)
    if round_context.purpose != purpose:
        raise UpdateRejected(f"the round context is bound to the {round_context.purpose} "
                             f"session, but this is the round's {purpose} session; "
                             "nothing is shared")
    if node not in round_context.participants or (
            len(round_context.participants) < MIN_SECAGG_SITES):
        raise UpdateRejected("the round context does not list this site among at least "
                             f"{MIN_SECAGG_SITES} participants")
    ctx = round_context.digest(params)
    sk1, pk1 = new_key_pair()  # pairwise masks
    sk2, pk2 = new_key_pair()  # encrypting shares for neighbours
    signature = identity.sign(keys_message(ctx, node, pk1, pk2))
    context.state.config_records[state_key(purpose)] = ConfigRecord({
        "stage": "setup", "node": node, **params.to_record(), "ctx": ctx,
        "adapter-digest": round_context.adapter, "config-digest": round_context.config,
        "participants": list(round_context.participants),
        "sk1": sk1, "pk1": pk1, "sk2": sk2, "pk2": pk2})
    return ConfigRecord({"pk1": pk1, "pk2": pk2, "signature": signature,
                         "cert": identity.cert_der})


def _verified_neighbours(state: ConfigRecord, request: ConfigRecord,
                         identity: SiteIdentity) -> tuple[list[int], list, list, list]:
    """The neighbour list of a share_keys request, every entry checked: certified by this
    site's CA, signed over this round's context, one node per site name."""
    me, ctx = int(state["node"]), bytes(state["ctx"])
    try:
        peers = [int(n) for n in request["nodes"]]
        pk1s, pk2s = list(request["pk1"]), list(request["pk2"])
        sigs, certs = list(request["signature"]), list(request["cert"])
    except (KeyError, TypeError, ValueError):
        raise UpdateRejected("malformed neighbour key list") from None
    if not len(peers) == len(pk1s) == len(pk2s) == len(sigs) == len(certs):
        raise UpdateRejected("malformed neighbour key list")
    if me not in peers or pk1s[peers.index(me)] != state["pk1"] or (
            pk2s[peers.index(me)] != state["pk2"]):
        raise UpdateRejected("the server listed this site's public keys incorrectly")
    if not set(peers) <= {int(n) for n in state["participants"]}:
        raise UpdateRejected("neighbours outside the round's participants")
    names = [verify_signed(identity, cert, keys_message(ctx, peer, pk1, pk2), sig)
             for peer, pk1, pk2, sig, cert in zip(peers, pk1s, pk2s, sigs, certs, strict=True)]
    if names[peers.index(me)] != identity.name:
        raise UpdateRejected("the server listed another site's certificate for this site")
    if len(set(names)) != len(names):
        raise UpdateRejected("one site appears as several neighbours")
    return peers, pk1s, pk2s, certs


def share_keys(context: Context, request: ConfigRecord, identity: SiteIdentity,
               purpose: str = TRAIN) -> ConfigRecord:
    """Stage 2: split a fresh mask seed and the mask key into shares, one per verified
    neighbour, each encrypted for that neighbour alone."""
    state = _state(context, "setup", purpose)
    params, me, ctx = SecAggParams.from_record(state), int(state["node"]), bytes(state["ctx"])
    peers, pk1s, pk2s, certs = _verified_neighbours(state, request, identity)
    if not (MIN_SECAGG_SITES <= len(peers) <= params.num_shares
            and 2 * params.threshold > len(peers)):
        raise UpdateRejected(f"{len(peers)} neighbours with threshold {params.threshold}: "
                             f"need {MIN_SECAGG_SITES} to num_shares ({params.num_shares}) "
                             "neighbours of which the threshold is a majority")
    if len(set(pk1s + pk2s)) != 2 * len(peers) or len(set(peers)) != len(peers):
        raise UpdateRejected("neighbour keys or ids are not unique")
    seed = os.urandom(32)
    seed_shares = create_shares(seed, params.threshold, len(peers))
    key_shares = create_shares(bytes(state["sk1"]), params.threshold, len(peers))
    dsts, sealed = [], []
    for peer, pk2, seed_share, key_share in zip(peers, pk2s, seed_shares, key_shares,
                                                strict=True):
        if peer == me:
            held_seed, held_key = seed_share, key_share
            continue
        key = agree(bytes(state["sk2"]), pk2, SHARES + ctx)
        dsts.append(peer)
        sealed.append(seal(key, me, peer, _pack(seed_share, key_share), ctx))
    state.update({"stage": "share_keys", "seed": seed, "peers": peers, "peer-pk1": pk1s,
                  "peer-pk2": pk2s, "peer-cert": certs, "held-nodes": [me],
                  "held-seed": [held_seed], "held-key": [held_key]})
    return ConfigRecord({"dst": dsts, "sealed": sealed})


def reconstruction(context: Context, purpose: str = TRAIN) -> tuple[int, int]:
    """The session's reconstruction threshold and neighbour count (this site included),
    once stage 2 has verified the neighbours."""
    state = _state(context, "receive_shares", purpose)
    return int(state["threshold"]), len(state["peers"])


def receive_shares(context: Context, request: ConfigRecord, adapter: ArrayRecord,
                   config: ConfigRecord, purpose: str = TRAIN) -> None:
    """Stage 3, first half, before training: the adapter and config must be those the
    round context committed to; keep the shares neighbours sent (they are the neighbours
    still present); fail if fewer than the threshold arrived."""
    state = _state(context, "share_keys", purpose)
    if adapter_digest(adapter) != state["adapter-digest"] or (
            config_digest(config) != state["config-digest"]):
        raise UpdateRejected(f"the global adapter or {purpose} config differs from what "
                             "the round context committed to")
    me, peers, ctx = int(state["node"]), [int(n) for n in state["peers"]], bytes(state["ctx"])
    nodes, seeds, keys = (list(state["held-nodes"]), list(state["held-seed"]),
                          list(state["held-key"]))
    if len(request["src"]) != len(request["sealed"]):
        raise UpdateRejected("malformed share delivery")
    for src, sealed in zip(request["src"], request["sealed"], strict=True):
        src = int(src)
        if src not in peers or src in nodes:
            raise UpdateRejected(f"unexpected shares from node {src}")
        key = agree(bytes(state["sk2"]), state["peer-pk2"][peers.index(src)], SHARES + ctx)
        seed_share, key_share = _unpack(unseal(key, src, me, sealed, ctx))
        nodes.append(src)
        seeds.append(seed_share)
        keys.append(key_share)
    threshold = int(state["threshold"])
    if len(nodes) < threshold:
        raise UpdateRejected(f"only {len(nodes)} of this site's neighbours hold its shares; "
                             f"the threshold is {threshold}")
    state.update({"stage": "receive_shares", "held-nodes": nodes, "held-seed": seeds,
                  "held-key": keys})


def mask(context: Context, vector: np.ndarray, purpose: str = TRAIN) -> np.ndarray:
    """Stage 3, second half: add the private mask and the pairwise masks (+ toward
    higher node ids, − toward lower ones, so they cancel in the sum)."""
    state = _state(context, "receive_shares", purpose)
    me, peers, ctx = int(state["node"]), [int(n) for n in state["peers"]], bytes(state["ctx"])
    masked = vector.astype(np.uint32) + expand(bytes(state["seed"]), vector.size)
    for peer in (int(n) for n in state["held-nodes"]):
        if peer == me:
            continue
        pairwise = expand(agree(bytes(state["sk1"]), state["peer-pk1"][peers.index(peer)],
                                MASK + ctx), vector.size)
        masked = masked + pairwise if me < peer else masked - pairwise
    state["stage"] = "mask"
    return masked


def consistency(context: Context, request: ConfigRecord, identity: SiteIdentity,
                purpose: str = TRAIN) -> ConfigRecord:
    """Stage 4: sign the survivor set the server announces — once per round, and only a
    set that names this site and enough neighbours whose shares it holds."""
    state = _state(context, "mask", purpose)
    me, threshold = int(state["node"]), int(state["threshold"])
    survivors = sorted(set(_ints(request, "survivors")))
    peers, held = {int(n) for n in state["peers"]}, {int(n) for n in state["held-nodes"]}
    if me not in survivors:
        raise UpdateRejected("the server names this site as dropped although it sent its "
                             "masked update; nothing is revealed")
    if not set(survivors) & peers <= held or len(set(survivors) & peers) < threshold or (
            len(survivors) < MIN_SECAGG_SITES):
        raise UpdateRejected(f"the survivor set names neighbours that never sent shares, or "
                             f"fewer than the threshold {threshold} (or {MIN_SECAGG_SITES} sites)")
    state.update({"stage": "consistency", "survivors": survivors})
    return ConfigRecord({"signature": identity.sign(survivors_message(
        bytes(state["ctx"]), survivors, bytes(state["pk1"]), bytes(state["pk2"])))})


def unmask(context: Context, request: ConfigRecord, identity: SiteIdentity,
           purpose: str = TRAIN) -> ConfigRecord:
    """Stage 5: with ``threshold`` valid neighbour signatures over the survivor set this
    site signed, reveal seed shares of the surviving neighbours and mask-key shares of the
    neighbours that dropped after sharing keys — exactly those. Then forget the round."""
    state = _state(context, "consistency", purpose)
    me, threshold, ctx = int(state["node"]), int(state["threshold"]), bytes(state["ctx"])
    survivors = [int(n) for n in state["survivors"]]
    peers = [int(n) for n in state["peers"]]
    held = [int(n) for n in state["held-nodes"]]
    if sorted(set(_ints(request, "survivors"))) != survivors:
        raise UpdateRejected("the unmasking request names another survivor set than the one "
                             "this site signed")
    signers, signatures = _ints(request, "signers"), list(request.get("signatures", []))
    if len(signers) != len(signatures):
        raise UpdateRejected("malformed survivor signatures")
    valid = set()
    for signer, signature in zip(signers, signatures, strict=True):
        if signer in peers:  # other sites' signatures this site cannot check
            i = peers.index(signer)
            message = survivors_message(ctx, survivors, bytes(state["peer-pk1"][i]),
                                        bytes(state["peer-pk2"][i]))
            verify_signed(identity, state["peer-cert"][i], message, signature)
            valid.add(signer)
    if len(valid) < threshold:
        raise UpdateRejected(f"only {len(valid)} neighbours signed the survivor set, below "
                             f"the threshold {threshold}; nothing is revealed")
    active, dead = _ints(request, "active"), _ints(request, "dead")
    if me in dead:
        raise UpdateRejected("the server asks for this site's own mask-key share")
    if set(active) & set(dead):
        raise UpdateRejected("the unmasking request asks for both shares of one neighbour")
    if sorted(active) != sorted(set(held) & set(survivors)) or (
            sorted(dead) != sorted(set(held) - set(survivors))):
        raise UpdateRejected("the unmasking request does not follow from the signed "
                             "survivor set")
    shares = ([state["held-seed"][held.index(n)] for n in active]
              + [state["held-key"][held.index(n)] for n in dead])
    del context.state.config_records[state_key(purpose)]
    return ConfigRecord({"nodes": active + dead, "shares": shares})
