"""A malicious server with k colluding sites against one honest site, A.

docs/secagg.md claims: honest sites can be shown different survivor sets only if
k ≥ 2·threshold − neighbours. The server needs ``threshold`` shares of A's mask seed (from
sites that see A as a survivor) *and* ``threshold`` shares of A's mask key (from sites that
see A as dropped); with both it strips every mask from A's vector. Colluders give their
shares and sign any set; each honest site signs one set, and only a set naming itself, so
A can only sign a set in which it survived.

The attacker's best play is two sets — every node (A survived), and every node but A
(A dropped) — since honest sites shown any third set add no signatures to either. The
test tries every split of the other honest sites between the two, against the real site
stages, and checks the claim both ways: below the bound no split reveals enough; at the
bound one does, and A's update comes out exactly. An honest site that refuses stage 5
keeps its secrets, and every site keeps records beside a ledger that stage 5 leaves byte
for byte unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from secagg_grid import Sites, keep_records

from fedcpt.config import load_config
from fedcpt.core import protocol as p
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.secagg import participation
from fedcpt.privacy.secagg.context import survivors_message
from fedcpt.privacy.secagg.masking import agree, expand
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.site import MASK

NODES = (11, 22, 33, 44, 55)
A = NODES[0]
SIZE = 16


def _masked_round(threshold: int, folder: Path | None = None,
                  ) -> tuple[Sites, dict[int, np.ndarray]]:
    """Stages 1–3, honest: each site masks its own distinct vector (each with a ledger
    location in ``folder`` and records beside it, when given)."""
    params = SecAggParams(num_shares=5, threshold=threshold, clipping_range=1.0,
                          quantization_range=2**22, max_weight=8)
    adapter = ArrayRecord({"w.lora_A.weight": Array(np.zeros((2, 8), dtype=np.float32))})
    sites = Sites(NODES, params, adapter, ConfigRecord({p.RUN_ID: "run-1", p.SERVER_ROUND: 1}))
    if folder is not None:
        for n in NODES:
            keep_records(sites.contexts[n], folder / f"site-{n}.ledger.json", f"site-{n}")
    keys = {n: sites.setup(n) for n in NODES}
    sealed = {n: sites.share_keys(n, Sites.key_list(keys, NODES)) for n in NODES}
    masked = {}
    for n in NODES:
        sites.deliver(n, sealed)
        masked[n] = sites.mask(n, np.arange(SIZE, dtype=np.uint32) * n)
    return sites, masked


def _state(sites: Sites, node: int) -> ConfigRecord:
    return sites.contexts[node].state.config_records["secagg"]


def _attack(threshold: int, colluders: tuple[int, ...], told_a_dropped: tuple[int, ...],
            folder: Path, unchanged: Callable[[Path], AbstractContextManager],
            ) -> np.ndarray | None:
    """One play of the attack; returns A's vector if the server rebuilt both secrets.
    Each honest site's answer to stage 5, refused or not, leaves its records beside its
    ledger in ``folder`` as they were (``unchanged``: ``unchanged_site_files``)."""
    folder.mkdir(parents=True)
    sites, masked = _masked_round(threshold, folder)
    alive, dead = list(NODES), [n for n in NODES if n != A]
    ctx = bytes(_state(sites, A)["ctx"])
    public = dict(zip(_state(sites, A)["peers"], _state(sites, A)["peer-pk1"], strict=True))
    honest = [n for n in NODES if n not in colluders]
    view = {n: dead if n in told_a_dropped else alive for n in honest}
    signatures: dict[tuple, dict[int, bytes]] = {tuple(alive): {}, tuple(dead): {}}
    for n in honest:
        signatures[tuple(view[n])][n] = bytes(sites.consistency(n, view[n])["signature"])
    for c in colluders:  # a colluder signs both sets with its own key
        st = _state(sites, c)
        for survivors in (alive, dead):
            signatures[tuple(survivors)][c] = sites.identities[c].sign(survivors_message(
                ctx, survivors, bytes(st["pk1"]), bytes(st["pk2"])))
    seed_shares, key_shares = [], []
    for c in colluders:  # a colluder hands over the shares of A it holds
        st = _state(sites, c)
        i = list(st["held-nodes"]).index(A)
        seed_shares.append(bytes(st["held-seed"][i]))
        key_shares.append(bytes(st["held-key"][i]))
    for n in honest:
        survivors = view[n]
        ledger = Path(sites.contexts[n].node_config["ledger-path"])
        with unchanged(ledger) as before:
            try:
                reply = sites.unmask(n, survivors, signatures[tuple(survivors)],
                                     active=[m for m in NODES if m in survivors],
                                     dead=[m for m in NODES if m not in survivors])
            except UpdateRejected:
                reply = None
        assert participation.record_path(ledger).name in before[ledger]  # what was compared
        if reply is None:
            assert sites.secrets_kept(n)  # refused: nothing revealed
            continue
        shares = dict(zip(reply["nodes"], reply["shares"], strict=True))
        if A in survivors:
            seed_shares.append(bytes(shares[A]))
        else:
            key_shares.append(bytes(shares[A]))
    if len(seed_shares) < threshold or len(key_shares) < threshold:
        return None
    seed, sk1 = combine_shares(seed_shares), combine_shares(key_shares)
    vector = masked[A] - expand(seed, SIZE)
    for peer, pk1 in public.items():
        if peer != A:  # A added each pairwise mask toward a higher id, subtracted the rest
            pairwise = expand(agree(sk1, bytes(pk1), MASK + ctx), SIZE)
            vector = vector - pairwise if A < peer else vector + pairwise
    return vector


@pytest.mark.parametrize(("threshold", "colluders"), [
    (3, ()), (3, (33,)), (4, (33, 55)), (4, (33, 44, 55)),
])
def test_colluding_sites_unmask_an_honest_site_only_from_the_documented_bound(
        threshold, colluders, tmp_path, unchanged_site_files):
    bound = 2 * threshold - len(NODES)  # docs/secagg.md: k ≥ 2·threshold − neighbours
    others = [n for n in NODES if n != A and n not in colluders]
    splits = [s for r in range(len(others) + 1) for s in itertools.combinations(others, r)]
    results = [_attack(threshold, colluders, split, tmp_path / str(i), unchanged_site_files)
               for i, split in enumerate(splits)]
    unmasked = [r for r in results if r is not None]
    if len(colluders) < bound:
        assert not unmasked
    else:  # at the bound the attack works, and yields A's vector exactly
        assert unmasked
        assert all(np.array_equal(r, np.arange(SIZE, dtype=np.uint32) * A) for r in unmasked)


def test_the_default_threshold_holds_against_one_colluder(tmp_path, unchanged_site_files):
    """The server's default threshold over five neighbours is 4 (one colluder assumed):
    every split of the attack with one colluder fails there, as it succeeds at 3."""
    threshold = SecAggParams.for_round(load_config("smoke", overrides=["secagg.mode=on"]),
                                       len(NODES)).threshold
    assert threshold == 4
    others = [n for n in NODES if n not in (A, 33)]
    splits = [s for r in range(len(others) + 1) for s in itertools.combinations(others, r)]
    assert all(_attack(threshold, (33,), split, tmp_path / str(i), unchanged_site_files) is None
               for i, split in enumerate(splits))
