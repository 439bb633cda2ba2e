"""A site's own count of its site-level releases under distributed DP.

Under site-level DP with SecAgg+ (:mod:`.ddp`) each site noises its clipped update itself,
and the site-level ε the run's summary states counts the rounds of that run only. A hostile
server can ask again: a round re-sent under another run id, or run after run, each releases
a freshly noised update of the same site. The site therefore records every masked
site-level release, durably and before it leaves, in ``<name>.site-level.json`` beside its
unit-level ledger, and its privacy report composes all of them (``fedcpt privacy report``).

Each release keeps its own RDP curve (:meth:`.ddp.DistributedDP.rdp`: the mechanism as that
round ran it) and the δ its run stated, at most :data:`MAX_DELTA`; the composed ε is given
at the smallest δ recorded, so it is never below the ε any run claimed. A site without a
ledger location keeps no record across runs, as it keeps no unit-level ledger.

A site that sets ``site-level-epsilon-budget`` also refuses, before it trains, a round
whose release would take that ε past its budget (:func:`check_budget`). The refusal is a
function of public values only: how many site-level updates this site has sent (the server
received each) and the mechanisms' parameters (the run configs).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon

from fedcpt.core.durable import write_json
from fedcpt.privacy.ledger import LedgerError
from fedcpt.privacy.policy import PolicyRefused, SitePolicy
from fedcpt.privacy.secagg.ddp import DistributedDP
from fedcpt.privacy.site_files import beside_ledger

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".site-level.json"
MAX_DELTA = 1e-5
"""The loosest site-level δ a release is recorded at (``privacy.user_delta``'s default): a
server may state a tighter δ for its run, never a looser one."""


@dataclass(frozen=True)
class SiteLevelRelease:
    """One masked update noised for site-level DP, as the site sent it."""

    run: str
    server_round: int
    noise_multiplier: float
    clip: float
    honest: int
    sites: int
    delta: float
    """The site-level δ the run stated."""
    rdp: tuple[float, ...]
    """RDP ε(α) of this release at ``DEFAULT_RDP_ORDERS``."""
    recorded_at: str


def record_path(ledger: Path) -> Path:
    """The site-level record beside the site's unit-level ledger."""
    return beside_ledger(ledger, RECORD_SUFFIX)


def load_releases(path: Path) -> list[SiteLevelRelease]:
    """The releases recorded at ``path`` (none when there is no record)."""
    if not path.exists():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))["releases"]
        return [SiteLevelRelease(**{**r, "rdp": tuple(float(x) for x in r["rdp"])})
                for r in raw]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise LedgerError(f"site-level record {path} is damaged ({err!r}); the site sends no "
                          "site-level release until it is restored") from None


def _release(run: str, server_round: int, ddp: DistributedDP,
             delta: float) -> SiteLevelRelease:
    return SiteLevelRelease(
        run=run, server_round=server_round, noise_multiplier=ddp.noise_multiplier,
        clip=ddp.clip, honest=ddp.honest, sites=ddp.sites, delta=min(delta, MAX_DELTA),
        rdp=tuple(float(x) for x in ddp.rdp()),
        recorded_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def check_budget(policy: SitePolicy, run: str, server_round: int, ddp: DistributedDP,
                 delta: float) -> None:
    """Refuse, before training, a release that would take the site's site-level ε past
    its ``site_level_epsilon_budget`` (0: no cap). A capped site needs a ledger location,
    where its record is kept."""
    budget = policy.site_level_epsilon_budget
    if not budget:
        return
    if not policy.ledger_path:
        raise PolicyRefused(
            f"site {policy.site!r} caps its site-level ε at {budget:g} "
            f"(site_level_epsilon_budget, {policy.who('site_level_epsilon_budget')}) but "
            "keeps no ledger location to count its releases in; set `ledger-path`")
    releases = load_releases(record_path(Path(policy.ledger_path).expanduser()))
    after, at_delta = site_level_epsilon([*releases, _release(run, server_round, ddp, delta)])
    if after > budget:
        raise PolicyRefused(
            f"site {policy.site!r} refuses site-level release {len(releases) + 1}: its "
            f"site-level ε would reach {after:.3f} at δ={at_delta:g}, over its budget "
            f"{budget:g} (site_level_epsilon_budget, "
            f"{policy.who('site_level_epsilon_budget')})")


def record_release(ledger_path: str, run: str, server_round: int, ddp: DistributedDP,
                   delta: float) -> None:
    """Append this release to the site's record, durably, before the update leaves (a
    site without a ledger location records nothing)."""
    if not ledger_path:
        return
    path = record_path(Path(ledger_path).expanduser())
    releases = load_releases(path)
    releases.append(_release(run, server_round, ddp, delta))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"releases": [asdict(r) for r in releases]})
    log.info("site-level release %d recorded (run %s, round %d): site-level ε now %.3f",
             len(releases), run, server_round, site_level_epsilon(releases)[0])


def site_level_epsilon(releases: list[SiteLevelRelease]) -> tuple[float, float]:
    """(ε, δ) of every recorded release composed, at the smallest δ a run stated."""
    if not releases:
        return 0.0, 0.0
    delta = min(r.delta for r in releases)
    total = [sum(r.rdp[i] for r in releases) for i in range(len(DEFAULT_RDP_ORDERS))]
    return float(compute_epsilon(DEFAULT_RDP_ORDERS, total, delta)[0]), delta
