"""Secure aggregation (SecAgg+, Bell et al. 2020, https://eprint.iacr.org/2020/704) as
Flower Message-API rounds: the server learns only the weighted sum of the sites' updates.

Flower 1.42 offers SecAgg+ only through its legacy workflow (``LegacyContext`` +
``SecAggPlusWorkflow`` + ``secaggplus_mod`` on a ``client_fn`` app), which would need a
second, legacy copy of fedcpt's strategy and round loop. This package runs the same
protocol as four Message-API exchanges driven by
:class:`~fedcpt.strategies.secagg_fedavg.SecAggFedAvg`, on Flower's Shamir secret sharing
and the ``cryptography`` library:

- :mod:`.params` — the protocol parameters every party agrees on;
- :mod:`.encoding` — weighted update ↔ quantised uint32 vector (sums wrap mod 2^32);
- :mod:`.masking` — key agreement, share encryption, and mask expansion;
- :mod:`.site` — one site's stages (keys, shares, masked update, unmasking shares);
- :mod:`.server` — the server's stages, dropout recovery, and the unmasked sum.
"""
