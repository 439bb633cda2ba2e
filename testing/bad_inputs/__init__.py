"""A catalogue of bad inputs — data, configuration, client updates, ledgers, certificates
and a deployed site's settings, a hostile server's privacy proposals and its choice of
a site's data and model inputs, the CLI — and
whether fedcpt answers each with a clear error (the verdict: :mod:`.judge`).

One module per kind of input; :data:`CATALOGUE` is all of them, in the order below.
"""

from __future__ import annotations

from fedcpt.testing.bad_inputs.certificates import CERTIFICATE
from fedcpt.testing.bad_inputs.commands import CLI
from fedcpt.testing.bad_inputs.configs import CONFIG
from fedcpt.testing.bad_inputs.data import DATA
from fedcpt.testing.bad_inputs.judge import BadInput, Outcome, try_input
from fedcpt.testing.bad_inputs.ledgers import LEDGER
from fedcpt.testing.bad_inputs.proposals import PROPOSAL
from fedcpt.testing.bad_inputs.site_inputs import SITE_INPUT
from fedcpt.testing.bad_inputs.updates import UPDATE

CATALOGUE: list[BadInput] = (DATA + CONFIG + UPDATE + LEDGER + CERTIFICATE + PROPOSAL
                             + SITE_INPUT + CLI)

__all__ = ["CATALOGUE", "BadInput", "Outcome", "try_input"]
