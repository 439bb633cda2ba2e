"""The node_config keys a deployed SuperNode sets with ``--node-config`` (the privacy
policy's own keys are :data:`fedcpt.privacy.policy.NODE_KEYS`). A module of its own, with no
imports, so the release gate can name the site without loading the site's data code."""

SITE_NAME_KEY = "site-name"
DATA_PATH_KEY = "data-path"
LEDGER_PATH_KEY = "ledger-path"
BUDGET_KEY = "epsilon-budget"
REQUIRE_DP_KEY = "require-dp"
REQUIRE_SECAGG_KEY = "require-secagg"
