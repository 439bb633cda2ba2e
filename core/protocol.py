"""The message vocabulary between the ServerApp and the ClientApps, in one place."""

# RecordDict keys
ARRAYS = "arrays"          # ArrayRecord: the LoRA adapter tensors
METRICS = "metrics"        # MetricRecord: numbers a reply reports
CONFIG = "config"          # ConfigRecord: what the server asks for
SITE = "site"              # ConfigRecord {"name": …}: which site replied (training
                           # replies add "unit": the kind of privacy unit its ε is per)
ATTESTATION = "attestation"  # ConfigRecord {"statement", "signature", "certificate"}: a
                           # training reply's signed statement of what the site trained on
                           # (privacy.attestation); absent when the site has no identity
FISHER = "fisher"          # ArrayRecord: EWC's diagonal Fisher, sent with training (EWC only)
ANCHOR = "anchor"          # ArrayRecord: the adapter the phase began from (anchor = "phase" only)
MASKED = "masked"          # ArrayRecord: a masked update under secure aggregation …
MASKED_VECTOR = "vector"   # … its one uint32 array (privacy.secagg.encoding's layout)

# Message types of the SecAgg+ stages: ClientApp train actions, sent as "train.<action>"
# (stage 3, masked, is the round's training message itself), and evaluate actions of the
# round's evaluation session, "evaluate.<action>" (stage 3: the masked evaluation)
SECAGG_SETUP = "secagg_setup"            # 1: public keys
SECAGG_SHARE_KEYS = "secagg_share_keys"  # 2: encrypted shares of each site's secrets
SECAGG_MASKED = "secagg_masked"          # 3: train (evaluate), reply masked
SECAGG_CONSISTENCY = "secagg_consistency"  # 4: each survivor signs the survivor set
SECAGG_UNMASK = "secagg_unmask"          # 5: the shares that unmask the sum

# ConfigRecord keys sent by the server
RUN_CONFIG = "run-config"  # the RunConfig as JSON
RUN_ID = "run-id"          # unique per run; ledgers tell runs apart by it
SERVER_ROUND = "server-round"

# MetricRecord keys of a training reply
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"  # omitted under DP: it is computed on the protected records
TRAIN_SECONDS = "train-seconds"
# The site's cumulative privacy accounting: never sent (it depends on the number of training
# units); listed so the release gate names these keys as not sent
PRIVACY_METRICS = ("epsilon", "epsilon-rdp", "delta", "noise-multiplier", "sample-rate",
                   "dp-steps")

# MetricRecord keys of an evaluation reply
DOMAIN_LOSS = "domain-loss"
DOMAIN_BASE_LOSS = "domain-base-loss"
DOMAIN_ECE = "domain-ece"
DATA_DRIFT = "data-drift"  # the base loss minus the site's previous runs' mean (optional)

# Error codes of a reply from a site that refused to train
BUDGET_EXHAUSTED = 100     # its privacy budget, or a DP / secure aggregation requirement
UPDATE_REFUSED = 101       # its own update or a secure aggregation message failed a check
SITE_ERROR = 102           # it could not take part: its data, ledger or node config
