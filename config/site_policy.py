"""A simulated site's privacy policy (``[sites.policy]``, and ``[site_policy]`` for all).

A deployed site never reads these tables: it sets the same values in its own
``--node-config`` or policy file (:mod:`fedcpt.privacy.policy`). Empty / 0 means the
site-side default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedcpt.config.rules import require

EVAL_RELEASES = ("nothing", "plain", "noised", "secagg")


def _opt(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class SitePolicySettings:
    """A simulated site's privacy policy; empty / 0: the site default."""

    unit: str = _opt("", "Privacy unit: `document`, `passage`, `file`, `directory` or "
                     "`field:<name>` (default `document`).")
    delta: float = _opt(0.0, "δ (default min(1e-5, 1/(10·N)); δ ≥ 1/N is refused).")
    epsilon_budget: float = _opt(0.0, "Total ε budget of the site (default 8).")
    ledger_path: str = _opt("", "Ledger file (default: `<privacy.ledger_dir>/<site>.ledger."
                            "json`, simulation only).")
    heldout_fraction: float = _opt(0.0, "Held-out share of units, by salted hash "
                                   "(default 0.1).")
    eval_release: str = _opt("", "What evaluation releases: `nothing`, `plain` (not covered "
                             "by ε), `noised`, or `secagg` (only as a sum with the other "
                             "sites' under secure aggregation; not covered by ε) (default "
                             "`plain`; `nothing` under require_dp).")
    eval_min_units: int = _opt(0, "Held-out units a query must cover (default 8).")
    eval_noise_multiplier: float = _opt(0.0, "σ of a noised evaluation release, relative to "
                                        "its clipping bound (default 4).")
    eval_loss_bound: float = _opt(0.0, "Per-unit loss clip of a noised release, in nats "
                                  "(default 10).")
    require_dp: bool = _opt(False, "Refuse rounds without DP-SGD.")
    min_user_noise_multiplier: float = _opt(
        0.0, "Floor on the site-level noise z the site adds under secure aggregation: "
        "rounds with a smaller `privacy.user_noise_multiplier`, without site-level DP, or "
        "without secure aggregation are refused (default 0: not required).")
    min_dishonest_fraction: float = _opt(
        0.0, "Floor on `secagg.dishonest_fraction`, the share of sampled sites assumed to "
        "collude with the server when the site calibrates its site-level noise "
        "(default 0).")
    site_level_epsilon_budget: float = _opt(
        0.0, "Cap on the site's site-level ε over every site-level release it has recorded, "
        "across runs: a round whose release would pass it is refused before training "
        "(default 0: counted, not capped).")
    max_lora_rank: int = _opt(
        0, "Highest LoRA rank the site trains: with a lower cap than `lora.r` it trains "
        "the first components of the global adapter at its own rank (HetLoRA zero-padding, "
        "docs/strategies.md) (default 0: `lora.r`).")
    public_units: int = _opt(
        0, "A unit count the site declares public, at most its N: σ and budget refusals are "
        "planned at batch / public_units, so neither depends on N (default 0: none, and "
        "both do).")
    secagg_colluders: int = _opt(
        -1, "Other sites assumed to collude with the server: rounds whose secure-aggregation "
        "threshold t over the site's n neighbours does not satisfy 2t > n + k are refused "
        "before anything is masked (-1: the site default, 1; 0 trusts every other site).")

    text_fields: tuple[str, ...] = _opt(
        (), "Text columns the run's `data.text_field` may name (default: the scenario's "
        "`data.text_field`; at a deployed site `text`).")
    block_sizes: tuple[int, ...] = _opt(
        (), "Block sizes the run's `data.block_size` may be (default: the scenario's; at a "
        "deployed site 64, 128, 256 or 512).")
    models: tuple[str, ...] = _opt(
        (), "Models the site will open: `model.name`, or `name/gguf_file` (default: the "
        "scenario's model; at a deployed site the built-in aliases only).")
    train_share: float = _opt(
        0.0, "Cap on the trained set: the share of training units trained on, each kept or "
        "not by the site's salted hash; a server proposal may only lower it (default 1).")

    def __post_init__(self) -> None:
        require(self.delta >= 0, "policy.delta", self.delta, ">= 0 (0: site default)")
        require(self.epsilon_budget >= 0, "policy.epsilon_budget", self.epsilon_budget, ">= 0")
        require(0 <= self.heldout_fraction < 1, "policy.heldout_fraction",
                self.heldout_fraction, "in [0, 1) (0: site default)")
        require(self.eval_release in ("", *EVAL_RELEASES), "policy.eval_release",
                self.eval_release, f"one of {list(EVAL_RELEASES)}")
        require(self.eval_min_units >= 0, "policy.eval_min_units", self.eval_min_units, ">= 0")
        require(self.eval_noise_multiplier >= 0, "policy.eval_noise_multiplier",
                self.eval_noise_multiplier, ">= 0")
        require(self.eval_loss_bound >= 0, "policy.eval_loss_bound", self.eval_loss_bound,
                ">= 0")
        require(self.min_user_noise_multiplier >= 0, "policy.min_user_noise_multiplier",
                self.min_user_noise_multiplier, ">= 0 (0: site-level DP not required)")
        require(0 <= self.min_dishonest_fraction < 1, "policy.min_dishonest_fraction",
                self.min_dishonest_fraction, "in [0, 1)")
        require(self.secagg_colluders >= -1, "policy.secagg_colluders",
                self.secagg_colluders, ">= 0 (-1: the site default)")
        require(self.site_level_epsilon_budget >= 0, "policy.site_level_epsilon_budget",
                self.site_level_epsilon_budget, ">= 0 (0: not capped)")
        require(self.max_lora_rank >= 0, "policy.max_lora_rank", self.max_lora_rank,
                ">= 0 (0: the run's lora.r)")
        require(self.public_units >= 0, "policy.public_units", self.public_units,
                ">= 0 (0: none)")
        require(0 <= self.train_share <= 1, "policy.train_share", self.train_share,
                "in [0, 1] (0: site default)")
        require(all(b >= 8 for b in self.block_sizes), "policy.block_sizes", self.block_sizes,
                "sizes of at least 8")
