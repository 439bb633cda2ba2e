"""A catalogue of bad inputs — data, configuration, client updates, ledgers, certificates
and a deployed site's settings, a hostile server's privacy proposals, its choice of a
site's data and model inputs, the releases it asks for and its secure sums, the CLI — and
whether fedcpt refuses each with a clear error or, where the site must answer, accounts
for the answer in the site's ledger (the verdict: :mod:`.judge`).

One module per kind of input; :data:`CATALOGUE` is all of them, in the order below. The
attacks of issue 25 are entries too (``BadInput.attack``); :mod:`.attack_tests` names the
test that runs each one whole, where more than one site or release is needed.
"""

from __future__ import annotations

from fedcpt.testing.bad_inputs.attack_tests import ATTACK_TESTS, WHY, AttackTest
from fedcpt.testing.bad_inputs.certificates import CERTIFICATE
from fedcpt.testing.bad_inputs.commands import CLI
from fedcpt.testing.bad_inputs.configs import CONFIG
from fedcpt.testing.bad_inputs.data import DATA
from fedcpt.testing.bad_inputs.judge import BadInput, Outcome, Spent, try_input
from fedcpt.testing.bad_inputs.ledgers import LEDGER
from fedcpt.testing.bad_inputs.proposals import PROPOSAL
from fedcpt.testing.bad_inputs.releases import RELEASE
from fedcpt.testing.bad_inputs.secure_sums import SECURE_SUM
from fedcpt.testing.bad_inputs.site_inputs import SITE_INPUT
from fedcpt.testing.bad_inputs.updates import UPDATE

CATALOGUE: list[BadInput] = (DATA + CONFIG + UPDATE + LEDGER + CERTIFICATE + PROPOSAL
                             + SITE_INPUT + RELEASE + SECURE_SUM + CLI)

__all__ = ["ATTACK_TESTS", "CATALOGUE", "WHY", "AttackTest", "BadInput", "Outcome", "Spent",
           "try_input"]
