"""Run inputs that select or shape a deployed site's data or model, chosen by a hostile
server outside the site's policy: each is fed to the site's real train handler and must be
refused by the site's own check (:func:`fedcpt.privacy.policy.check_inputs`) with a reason
naming the key, before any data is read or model opened, its ledger unchanged. Among them
the in-order token cap of issue 25 (attack 1: a key no site reads any more) and a minimum
query at a site holding fewer held-out units than its floor, in more blocks (attack 6c:
units are counted, not blocks)."""

from __future__ import annotations

from fedcpt.testing.bad_inputs.judge import BadInput
from fedcpt.testing.bad_inputs.proposals import _hostile

# a floor of 30 units where the site holds ~12 held-out users, in ~140 blocks
PLAIN_FLOOR_30 = {"eval-release": "plain", "eval-min-units": "30"}

SITE_INPUT = [  # what a hostile server sends; the site must refuse it
    BadInput("input-text-field-not-allowed", "proposal", _hostile(["data.text_field=user_id"]),
             r"refuses `data.text_field` = 'user_id': not a text column its policy allows",
             attack="6a"),
    BadInput("input-model-path-not-allowed", "proposal",
             _hostile(["model.name=/etc/ssl"]),
             r"refuses `model.name` = '/etc/ssl': not a model its policy allows", attack="6b"),
    BadInput("input-block-size-not-allowed", "proposal", _hostile(["data.block_size=48"]),
             r"refuses `data.block_size` = 48: not a block size its policy allows"),
    BadInput("input-cap-loosened", "proposal",
             _hostile(["data.train_share=1"], **{"train-share": "0.5"}),
             r"refuses `data.train_share` = 1: it would loosen the site's cap", attack="1"),
    BadInput("input-token-cap-in-order", "proposal",  # the cap of attack 1, sent as it was
             _hostile([], sent={"data.max_site_tokens": 4000}),
             r"unknown config key `data.max_site_tokens`", attack="1"),
    BadInput("input-minimum-query-fewer-units-than-blocks", "proposal",
             _hostile(["data.heldout_blocks=30"], "evaluate", **PLAIN_FLOOR_30),
             r"holds \d+ held-out units, fewer than its minimum of 30 per query", attack="6c"),
]
