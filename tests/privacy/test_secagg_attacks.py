"""A malicious server against honest sites: each attack of issue 12, run as the attacker
would run it, against the real site stages (:class:`secagg_grid.Sites`).

Every test plays the server: it chooses what each site is sent, and asserts on what the
sites gave back. Each attack must end at the sites with nothing revealed that would
unmask one site's update. On the code before issue 12 each of these attacks succeeded:
sites took any public keys the server listed, signed nothing, and revealed whichever
shares the server named.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord
from secagg_grid import Sites, make_identities

from fedcpt.config import RunConfig, SiteConfig
from fedcpt.core import protocol as p
from fedcpt.deploy.certs import make_server_cert
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.secagg.context import keys_message
from fedcpt.privacy.secagg.masking import new_key_pair
from fedcpt.privacy.secagg.params import SecAggParams

A, B, C, D, E = NODES = (11, 22, 33, 44, 55)
PARAMS = SecAggParams(num_shares=5, threshold=3, clipping_range=1.0,
                      quantization_range=2**22, max_weight=8)


def _training_config(lr: float) -> ConfigRecord:
    cfg = RunConfig(sites=tuple(SiteConfig(name=f"s{i}", data=("unused",)) for i in range(5)))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr))
    return ConfigRecord({p.RUN_CONFIG: cfg.to_json(), p.RUN_ID: "run-1", p.SERVER_ROUND: 1})


@pytest.fixture
def sites() -> Sites:
    adapter = ArrayRecord({"w.lora_A.weight": Array(np.zeros((4, 8), dtype=np.float32))})
    return Sites(NODES, PARAMS, adapter, _training_config(1e-3))


def _fails(call, match: str):
    """The site refused (UpdateRejected naming the reason), so it returned nothing."""
    with pytest.raises(UpdateRejected, match=match):
        call()


# --- 1. key substitution -----------------------------------------------------------------
def _server_made_keys(sites: Sites, how: str, genuine: ConfigRecord) -> ConfigRecord:
    """Keys for node B that the server made itself, with the best credentials it has."""
    pk1, pk2 = new_key_pair()[1], new_key_pair()[1]
    ctx = bytes(sites.contexts[A].state.config_records["secagg"]["ctx"])
    message = keys_message(ctx, B, pk1, pk2)
    cert, signature = genuine["cert"], genuine["signature"]  # B's, over B's own keys
    if how == "own CA":  # a CA the server made, issuing a certificate named like B's
        impostor = make_identities([B])[B]
        cert, signature = impostor.cert_der, impostor.sign(message)
    elif how == "SuperLink certificate":  # the federation CA's; the server holds its key
        ca_key, ca_cert = sites.ca
        key, tls = make_server_cert(ca_key, ca_cert, ["127.0.0.1"], days=1)
        cert = tls.public_bytes(serialization.Encoding.DER)
        signature = key.sign(message, ec.ECDSA(hashes.SHA384()))
    return ConfigRecord({"pk1": pk1, "pk2": pk2, "signature": signature, "cert": cert})


@pytest.mark.parametrize("how, match", [
    ("B's certificate", "did not make"),
    ("own CA", "did not issue"),
    ("SuperLink certificate", "not a SecAgg site certificate"),
])
def test_key_substitution_aborts_the_round_at_the_victim(sites, how, match):
    keys = {n: sites.setup(n) for n in NODES}
    keys[B] = _server_made_keys(sites, how, keys[B])
    _fails(lambda: sites.share_keys(A, Sites.key_list(keys, NODES)), match)
    # A sent no share of its secrets to anyone: it is still at stage 1, no mask seed drawn
    state = sites.contexts[A].state.config_records["secagg"]
    assert state["stage"] == "setup" and "seed" not in state


def test_a_colluding_site_posing_as_two_neighbours_is_refused(sites):
    # participants include a sixth node id; colluding site C signs keys for it too, so
    # that the server plus C would hold two of A's shares
    record = sites.round_record(nodes=[*NODES, 66])
    keys = {n: sites.setup(n, record) for n in NODES}
    ctx = bytes(sites.contexts[A].state.config_records["secagg"]["ctx"])
    pk1, pk2 = new_key_pair()[1], new_key_pair()[1]
    keys[66] = ConfigRecord({"pk1": pk1, "pk2": pk2, "cert": sites.identities[C].cert_der,
                             "signature": sites.identities[C].sign(
                                 keys_message(ctx, 66, pk1, pk2))})
    five = Sites.key_list(keys, [A, B, C, D, 66])
    _fails(lambda: sites.share_keys(A, five), "one site appears as several neighbours")


# --- 2. inconsistent views of who survived -----------------------------------------------
@pytest.mark.parametrize("victim_signs", [False, True])
def test_inconsistent_survivor_sets_reveal_nothing_that_unmasks_the_victim(sites,
                                                                           victim_signs):
    """The attack of issue 12: D and E are told A survived (so they give A's seed share),
    B and C that A dropped (so they give A's mask-key share): with both, A's update
    comes out of its masked vector alone."""
    sites.honest_until_masked()
    alive, dead = [A, B, C, D, E], [B, C, D, E]
    signatures = {n: bytes(sites.consistency(n, alive)["signature"]) for n in (D, E)}
    if victim_signs:  # A did send its update, so it signs the full set
        signatures[A] = bytes(sites.consistency(A, alive)["signature"])
    dead_view = {n: bytes(sites.consistency(n, dead)["signature"]) for n in (B, C)}

    # the server forwards each group the signatures over its own view (any other signature
    # fails to verify and aborts the site at once)
    revealed = []
    for n in (B, C):  # asked for A's mask-key share
        _fails(lambda n=n: sites.unmask(n, dead, dead_view, active=dead, dead=[A]),
               "below the threshold")
        assert sites.secrets_kept(n)
        _fails(lambda n=n: sites.unmask(n, dead, {**dead_view, **signatures}, active=dead,
                                        dead=[A]), "did not make")
    for n in (D, E):
        ask = dict(survivors=alive, signatures=signatures, active=alive, dead=[])
        if victim_signs:  # three signatures over the full set: D and E answer honestly
            revealed.append(sites.unmask(n, **ask))
        else:
            _fails(lambda n=n, ask=ask: sites.unmask(n, **ask), "below the threshold")
    # whatever was revealed holds no share of A's mask key: A's update stays masked
    assert all(list(r["nodes"]) == alive for r in revealed)
    assert len(revealed) == (2 if victim_signs else 0)


def test_survivor_signatures_from_an_earlier_attempt_of_the_round_are_refused(sites):
    """The server runs the round twice with the same context (a retry): in the first
    attempt it has D and E sign a set without A, then aborts; in the second it shows D
    and E the full set (they reveal A's seed share) and B and C the set without A, with
    D's and E's old signatures to reach the threshold (for A's mask-key share)."""
    sites.honest_until_masked()
    dead = [B, C, D, E]
    stale = {n: bytes(sites.consistency(n, dead)["signature"]) for n in (D, E)}
    sites.honest_until_masked()  # attempt 2: fresh keys, same round context
    fresh = {n: bytes(sites.consistency(n, dead)["signature"]) for n in (B, C)}
    for n in (B, C):
        _fails(lambda n=n: sites.unmask(n, dead, {**fresh, **stale}, active=dead, dead=[A]),
               "did not make")
        assert sites.secrets_kept(n)


def test_a_site_signs_one_survivor_set_per_round(sites):
    sites.honest_until_masked()
    sites.consistency(D, NODES)
    _fails(lambda: sites.consistency(D, [B, C, D, E]), "out of order")


def test_unmasking_against_another_set_than_the_one_signed_is_refused(sites):
    sites.honest_until_masked()
    signed = {n: bytes(sites.consistency(n, NODES)["signature"]) for n in NODES}
    _fails(lambda: sites.unmask(D, [B, C, D, E], signed, active=[B, C, D, E], dead=[A]),
           "another survivor set")
    assert sites.secrets_kept(D)


def test_forged_survivor_signatures_are_refused(sites):
    sites.honest_until_masked()
    signed = {D: bytes(sites.consistency(D, NODES)["signature"])}
    forged = {n: bytes(64) for n in (A, B)}  # the server cannot sign for A or B
    _fails(lambda: sites.unmask(D, NODES, {**signed, **forged}, active=NODES, dead=[]),
           "did not make")
    assert sites.secrets_kept(D)


# --- 3. model / config inconsistency (Pasquini et al. 2022) -------------------------------
def test_a_victim_with_a_different_config_than_the_others_is_refused_at_key_sharing(sites):
    """LR ≈ 0 for every site but A, committed honestly in each site's own context."""
    frozen = sites.round_record(config=_training_config(1e-12))
    keys = {A: sites.setup(A)} | {n: sites.setup(n, frozen) for n in (B, C, D, E)}
    request = Sites.key_list(keys, NODES)
    _fails(lambda: sites.share_keys(A, request), "did not make")
    for n in (B, C, D, E):
        _fails(lambda n=n: sites.share_keys(n, request), "did not make")
    assert "seed" not in sites.contexts[A].state.config_records["secagg"]


def test_a_config_other_than_the_committed_one_is_refused_before_training(sites):
    """The same context everywhere, then LR ≈ 0 in the training message to all but A."""
    keys = {n: sites.setup(n) for n in NODES}
    request = Sites.key_list(keys, NODES)
    sealed = {n: sites.share_keys(n, request) for n in NODES}
    sites.deliver(A, sealed)
    sites.mask(A, np.zeros(16, dtype=np.uint32))
    for n in (B, C, D, E):
        _fails(lambda n=n: sites.deliver(n, sealed, config=_training_config(1e-12)),
               "differs from what the round context committed to")
    # A alone holds a masked update; the others never trained or masked, and refuse to
    # sign any survivor set, so A never gets the signatures it needs to reveal
    signature = bytes(sites.consistency(A, NODES)["signature"])
    for n in (B, C, D, E):
        _fails(lambda n=n: sites.consistency(n, NODES), "out of order")
    _fails(lambda: sites.unmask(A, NODES, {A: signature}, active=NODES, dead=[]),
           "below the threshold")
    assert sites.secrets_kept(A)


# --- 4. asking for a site's own mask-key share --------------------------------------------
def test_a_site_named_dropped_gives_up_nothing(sites):
    sites.honest_until_masked()
    _fails(lambda: sites.consistency(A, [B, C, D, E]), "names this site as dropped")
    assert sites.secrets_kept(A)


def test_a_site_never_reveals_its_own_mask_key_share(sites):
    sites.honest_until_masked()
    signed = {n: bytes(sites.consistency(n, NODES)["signature"]) for n in NODES}
    _fails(lambda: sites.unmask(A, NODES, signed, active=[B, C, D, E], dead=[A]),
           "own mask-key share")
    assert sites.secrets_kept(A)


# --- 5. asking for both kinds of share of one neighbour -----------------------------------
@pytest.mark.parametrize("active, dead, match", [
    (NODES, [A], "both shares of one neighbour"),
    ([B, C, D, E], [A], "does not follow from the signed survivor set"),
])
def test_a_site_never_reveals_both_shares_of_one_neighbour(sites, active, dead, match):
    sites.honest_until_masked()
    signed = {n: bytes(sites.consistency(n, NODES)["signature"]) for n in NODES}
    _fails(lambda: sites.unmask(D, NODES, signed, active=active, dead=dead), match)
    assert sites.secrets_kept(D)


def test_the_honest_path_reveals_exactly_the_survivors_seed_shares(sites):
    sites.honest_until_masked()
    signed = {n: bytes(sites.consistency(n, NODES)["signature"]) for n in NODES}
    reply = sites.unmask(D, NODES, signed, active=NODES, dead=[])
    assert list(reply["nodes"]) == list(NODES) and len(reply["shares"]) == 5
    assert not sites.secrets_kept(D)  # the round's secrets are gone once answered
