"""A hostile server's secure sums (SecAgg+), against the checks a site runs before it masks
anything (stage 3, :func:`fedcpt.client.model_handlers.secagg_masked`, and the masked
evaluation, :func:`fedcpt.client.eval_step.site_evaluation`), fed what those handlers
build from the round: its questions, its participants, its threshold. Each must be refused
with a reason naming the problem, and the site's record of the sums it joined unchanged.

The attacks of issue 25 these replay: a round re-sent without one site and secure
evaluations of one adapter over different groups (5b, 5a: two sums that differ by one site
give its value by subtraction), fake participant ids that coarsen the noise grid (7d), and
a threshold one colluding site beats (7e). The whole attack, with every site and the
server's unmasking, is run by the tests that :mod:`.attack_tests` names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord

from fedcpt.config import SiteConfig, load_config
from fedcpt.privacy.policy import check_reconstruction_threshold, check_site_level_dp, site_policy
from fedcpt.privacy.secagg import participation
from fedcpt.privacy.secagg.context import adapter_digest
from fedcpt.privacy.secagg.ddp import DistributedDP
from fedcpt.privacy.secagg.encoding import vector_length
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.testing.bad_inputs.judge import BadInput
from fedcpt.testing.bad_inputs.proposals import RUN
from fedcpt.testing.site_round import site_context

SITE_LEVEL = ["privacy.user_level=true", "privacy.user_noise_multiplier=1.0",
              "secagg.mode=on", "secagg.dishonest_fraction=0",
              "secagg.quantization_range=2"]  # an honest site-level DP round (z = 1)
NEIGHBOURS = 5


@functools.cache
def _adapter() -> ArrayRecord:
    """The adapter the server sends (the smoke scenario's)."""
    from fedcpt.core.model import load_adapted_model

    cfg = load_config("smoke")
    return load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter


def _policy(**node: str):
    """A deployed site's policy, from its node config only."""
    return site_policy(None, SiteConfig(name="clinic", data=("/data",)),
                       {"site-name": "clinic", "data-path": "/data", **node}, deployed=True)


def _sums(*questions: Callable[[str], list[str]]) -> Callable[[Path], object]:
    """The site joins one secure sum per entry of ``questions`` (each a function of the
    adapter's digest, as the handler builds them); the last is the attack."""
    def attempt(folder: Path) -> object:
        ledger = folder / "clinic.ledger.json"
        context = site_context("/data", ledger, name="clinic")
        digest = adapter_digest(_adapter())
        *honest, attack = questions
        for asked in honest:
            participation.claim(context, str(ledger), asked(digest))
        record = participation.record_path(ledger)
        before = record.read_bytes()
        participation.claim(context, str(ledger), attack(digest))
        changed = "" if record.read_bytes() == before else ", and recorded it"
        return f"joined a second sum of one question{changed}"
    return attempt


def _train_round(run: str, fresh_noise: bool = False) -> Callable[[str], list[str]]:
    return lambda digest: participation.training_questions(run, 1, digest, fresh_noise)


def _fake_participants(folder: Path) -> object:
    """The honest round's noise grid passes the site's floor; 10⁸ participant ids (fakes
    beside the five real sites) with the same z coarsen it."""
    policy = _policy(**{"min-user-noise-multiplier": "1.0"})
    cfg = load_config("smoke", overrides=SITE_LEVEL)
    dimension = vector_length(_adapter()) - 1
    check_site_level_dp(policy, cfg, DistributedDP.for_config(cfg, 3, NEIGHBOURS, dimension))
    return check_site_level_dp(policy, cfg, DistributedDP.for_config(cfg, 3, 10**8, dimension))


def _colluder_threshold(folder: Path) -> object:
    """A site that set nothing (one colluder assumed) takes the server's default threshold
    over five neighbours; a majority, 3, one colluder beats."""
    policy = _policy()
    cfg = load_config("smoke", overrides=["secagg.mode=on"])
    check_reconstruction_threshold(policy, SecAggParams.for_round(cfg, NEIGHBOURS).threshold,
                                   NEIGHBOURS)
    return check_reconstruction_threshold(policy, 3, NEIGHBOURS)


SECURE_SUM = [
    BadInput("secagg-round-resent-without-one-site", "secagg",
             _sums(_train_round(RUN), _train_round(RUN)),
             rf"already joined a secure sum answering train/run/{RUN}/round/1", attack="5b"),
    BadInput("secagg-round-resent-under-a-new-run-id", "secagg",
             _sums(_train_round(RUN), _train_round(RUN + "-again")),
             r"already joined a secure sum answering train/adapter/[0-9a-f]{64}", attack="5b"),
    BadInput("secagg-evaluation-over-another-group", "secagg",
             _sums(participation.evaluation_questions, participation.evaluation_questions),
             r"already joined a secure sum answering evaluate/adapter/[0-9a-f]{64}",
             attack="5a"),
    BadInput("secagg-fake-participants-coarsen-the-grid", "secagg", _fake_participants,
             r"refuses the round's noise grid: 100000000 participants leave", attack="7d"),
    BadInput("secagg-threshold-one-colluder-beats", "secagg",
             _colluder_threshold,
             r"refuses `secagg.reconstruction_threshold` = 3 over 5 neighbours: the server "
             r"with 1 colluding site\(s\) \(secagg_colluders, site default\)", attack="7e"),
]
