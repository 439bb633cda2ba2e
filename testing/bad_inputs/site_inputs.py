"""Run inputs that select or shape a deployed site's data or model, chosen by a hostile
server outside the site's policy: each is fed to the site's real train handler and must be
refused by the site's own check (:func:`fedcpt.privacy.policy.check_inputs`) with a reason
naming the key, before any data is read or model opened, its ledger unchanged."""

from __future__ import annotations

from fedcpt.testing.bad_inputs.judge import BadInput
from fedcpt.testing.bad_inputs.proposals import _hostile

SITE_INPUT = [  # what a hostile server sends; the site must refuse it
    BadInput("input-text-field-not-allowed", "proposal", _hostile(["data.text_field=user_id"]),
             r"refuses `data.text_field` = 'user_id': not a text column its policy allows"),
    BadInput("input-model-path-not-allowed", "proposal",
             _hostile(["model.name=/etc/ssl"]),
             r"refuses `model.name` = '/etc/ssl': not a model its policy allows"),
    BadInput("input-block-size-not-allowed", "proposal", _hostile(["data.block_size=48"]),
             r"refuses `data.block_size` = 48: not a block size its policy allows"),
    BadInput("input-cap-loosened", "proposal",
             _hostile(["data.train_share=1"], **{"train-share": "0.5"}),
             r"refuses `data.train_share` = 1: it would loosen the site's cap"),
]
