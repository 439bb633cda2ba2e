"""One site's side of a SecAgg+ round.

The site's secrets for the round (two key pairs, its mask seed, the shares it holds for
its neighbours) live in its Flower ``Context.state``, which persists between the
round's messages, and are deleted once the site has answered the unmasking request.
Every stage checks that it follows the previous one, so a server cannot replay or
reorder them, and a site never reveals both secrets of one neighbour.
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common.secure_aggregation.crypto.shamir import create_shares

from fedcpt.exceptions import ConfigError, UpdateRejected
from fedcpt.privacy.secagg.masking import agree, expand, new_key_pair, seal, unseal
from fedcpt.privacy.secagg.params import MIN_SECAGG_SITES, SecAggParams

STATE = "secagg"  # the ConfigRecord in Context.state holding this round's secrets
SHARES, MASK = b"shares", b"mask"  # key-derivation purposes


def _state(context: Context, stage: str) -> ConfigRecord:
    state = context.state.config_records.get(STATE)
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


def setup(context: Context, node: int, request: ConfigRecord) -> ConfigRecord:
    """Stage 1: fresh key pairs for this round; publish the public halves."""
    params = SecAggParams.from_record(request)
    try:  # the site's own check: a server must not weaken what protects this update
        params.check(params.num_shares)
    except ConfigError as err:
        raise UpdateRejected(f"refusing secure aggregation parameters: {err}") from None
    sk1, pk1 = new_key_pair()  # pairwise masks
    sk2, pk2 = new_key_pair()  # encrypting shares for neighbours
    context.state.config_records[STATE] = ConfigRecord({
        "stage": "setup", "node": node, **params.to_record(),
        "sk1": sk1, "pk1": pk1, "sk2": sk2, "pk2": pk2})
    return ConfigRecord({"pk1": pk1, "pk2": pk2})


def share_keys(context: Context, request: ConfigRecord) -> ConfigRecord:
    """Stage 2: split a fresh mask seed and the mask key into shares, one per
    neighbour, each encrypted for that neighbour alone."""
    state = _state(context, "setup")
    params, me = SecAggParams.from_record(state), int(state["node"])
    peers = [int(n) for n in request["nodes"]]
    pk1s, pk2s = list(request["pk1"]), list(request["pk2"])
    if not len(peers) == len(pk1s) == len(pk2s):
        raise UpdateRejected("malformed neighbour key list")
    if me not in peers or pk1s[peers.index(me)] != state["pk1"] or (
            pk2s[peers.index(me)] != state["pk2"]):
        raise UpdateRejected("the server listed this site's public keys incorrectly")
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
        key = agree(bytes(state["sk2"]), pk2, SHARES)
        dsts.append(peer)
        sealed.append(seal(key, me, peer, _pack(seed_share, key_share)))
    state.update({"stage": "share_keys", "seed": seed, "peers": peers, "peer-pk1": pk1s,
                  "peer-pk2": pk2s, "held-nodes": [me], "held-seed": [held_seed],
                  "held-key": [held_key]})
    return ConfigRecord({"dst": dsts, "sealed": sealed})


def receive_shares(context: Context, request: ConfigRecord) -> None:
    """Stage 3, first half: keep the shares neighbours sent (they are the neighbours
    still present); fail before training if fewer than the threshold arrived."""
    state = _state(context, "share_keys")
    me, peers = int(state["node"]), [int(n) for n in state["peers"]]
    nodes, seeds, keys = (list(state["held-nodes"]), list(state["held-seed"]),
                          list(state["held-key"]))
    if len(request["src"]) != len(request["sealed"]):
        raise UpdateRejected("malformed share delivery")
    for src, sealed in zip(request["src"], request["sealed"], strict=True):
        src = int(src)
        if src not in peers or src in nodes:
            raise UpdateRejected(f"unexpected shares from node {src}")
        key = agree(bytes(state["sk2"]), state["peer-pk2"][peers.index(src)], SHARES)
        seed_share, key_share = _unpack(unseal(key, src, me, sealed))
        nodes.append(src)
        seeds.append(seed_share)
        keys.append(key_share)
    threshold = int(state["threshold"])
    if len(nodes) < threshold:
        raise UpdateRejected(f"only {len(nodes)} of this site's neighbours hold its shares; "
                             f"the threshold is {threshold}")
    state.update({"stage": "receive_shares", "held-nodes": nodes, "held-seed": seeds,
                  "held-key": keys})


def mask(context: Context, vector: np.ndarray) -> np.ndarray:
    """Stage 3, second half: add the private mask and the pairwise masks (+ toward
    higher node ids, − toward lower ones, so they cancel in the sum)."""
    state = _state(context, "receive_shares")
    me, peers = int(state["node"]), [int(n) for n in state["peers"]]
    masked = vector.astype(np.uint32) + expand(bytes(state["seed"]), vector.size)
    for peer in (int(n) for n in state["held-nodes"]):
        if peer == me:
            continue
        pairwise = expand(agree(bytes(state["sk1"]), state["peer-pk1"][peers.index(peer)],
                                MASK), vector.size)
        masked = masked + pairwise if me < peer else masked - pairwise
    state["stage"] = "mask"
    return masked


def unmask(context: Context, request: ConfigRecord) -> ConfigRecord:
    """Stage 4: seed shares of neighbours whose masked update arrived, key shares of
    those that dropped — never both for one neighbour. Then forget the round."""
    state = _state(context, "mask")
    active, dead = [int(n) for n in request["active"]], [int(n) for n in request["dead"]]
    held = [int(n) for n in state["held-nodes"]]
    if set(active) & set(dead) or not set(active + dead) <= set(held):
        raise UpdateRejected("unmasking request names a neighbour twice or one whose "
                             "shares this site does not hold")
    if len(active) < int(state["threshold"]):
        raise UpdateRejected(f"only {len(active)} active neighbours, below the threshold")
    shares = ([state["held-seed"][held.index(n)] for n in active]
              + [state["held-key"][held.index(n)] for n in dead])
    del context.state.config_records[STATE]
    return ConfigRecord({"nodes": active + dead, "shares": shares})
