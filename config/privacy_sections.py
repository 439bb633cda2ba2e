"""The privacy sections of a run's settings: DP-SGD and site-level DP (``[privacy]``),
and secure aggregation (``[secagg]``). What a site's guarantee rests on is the site's own
policy (:mod:`fedcpt.config.site_policy`); these are the server's proposal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedcpt.config.fields import opt as _opt
from fedcpt.config.rules import MIN_SECAGG_SITES, require
from fedcpt.exceptions import ConfigError


@dataclass(frozen=True)
class PrivacyConfig:
    """Unit-level DP-SGD at every site (the unit is the site policy's: a person or a
    document)."""

    enabled: bool = _opt(False, "Unit-level DP-SGD at every site.")
    target_epsilon: float = _opt(8.0, "Budget per site over the whole run (all rounds).")
    target_delta: float = _opt(0.0, "Proposed δ per site; a site accepts only a value at "
                               "most its own (0: the site's δ).")
    noise_multiplier: float = _opt(0.0, "σ; 0 plans it from target_epsilon before training.")
    max_grad_norm: float = _opt(1.0, "Per-unit clipping norm (one block per sampled unit).")
    accountant: Literal["prv", "rdp"] = _opt(
        "prv", "Accountant that reports ε; RDP is always shown beside it.")
    grad_sample_mode: Literal["hooks", "functorch"] = _opt(
        "hooks", "How Opacus computes per-sample gradients.")
    user_level: bool = _opt(
        False, "Also add site-level DP (DP-FedAvg: each site's update clipped at the site, "
        "Gaussian noise on the average); reported separately.")
    user_noise_multiplier: float = _opt(
        1.0, "σ of the site-level noise (std σ·C/n on the average of n sites).")
    user_clipping_norm: float = _opt(
        1.0, "L2 bound C on each site's adapter update per round.")
    user_delta: float = _opt(1e-5, "δ of the site-level guarantee.")
    ledger_dir: str = _opt(
        "", "Where simulated sites keep their ledgers (a deployed site sets `ledger-path` in "
        "`--node-config`). Empty: `<run folder>/ledgers`; set a fixed folder to accumulate "
        "spend across runs.")
    ffa_lora: bool = _opt(
        False, "Train only LoRA B under DP-SGD, A frozen at its shared initialisation "
        "(FFA-LoRA, Sun et al. 2024).")
    optimizer: Literal["adamw", "sgd"] = _opt(
        "adamw", "The sites' optimizer on the noised gradient. adamw: AdamW, fresh each "
        "round; from a few noised steps its second moment is mostly noise, and its first "
        "step is a sign step. sgd: SGD whose step is train.lr divided by the noise's "
        "standard deviation on each coordinate of the noised mean gradient (σ·C / the "
        "expected batch): the scale of Adam's step once noise dominates its second moment, "
        "with that moment known rather than estimated. Needs train.weight_decay = 0.")

    def __post_init__(self) -> None:
        require(self.target_epsilon > 0, "privacy.target_epsilon", self.target_epsilon, "> 0")
        require(0 <= self.target_delta < 1, "privacy.target_delta", self.target_delta,
                "in [0, 1) (0: 1/N per site)")
        require(self.noise_multiplier >= 0, "privacy.noise_multiplier",
                self.noise_multiplier, ">= 0")
        require(self.max_grad_norm > 0, "privacy.max_grad_norm", self.max_grad_norm, "> 0")
        require(self.user_noise_multiplier > 0, "privacy.user_noise_multiplier",
                self.user_noise_multiplier, "> 0")
        require(self.user_clipping_norm > 0, "privacy.user_clipping_norm",
                self.user_clipping_norm, "> 0")
        require(0 < self.user_delta < 1, "privacy.user_delta", self.user_delta, "in (0, 1)")


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (SecAgg+, Bell et al. 2020): the server learns only the weighted
    sum of the sites' adapter updates."""

    mode: Literal["auto", "on", "off"] = _opt(
        "auto", f"auto: on for deployments (`flwr run`), off in `fedcpt simulate`. Needs "
        f"`federation.max_update_norm` and >= {MIN_SECAGG_SITES} sites per round.")
    num_shares: int = _opt(
        0, "Neighbours each site shares its secrets with, itself included (0: every sampled "
        "site). Below the number of sampled sites it must be odd.")
    reconstruction_threshold: int = _opt(
        0, "Shares needed to rebuild a secret (0: ⌊(num_shares + 1)/2⌋ + 1, the smallest "
        "that one colluding site cannot beat, which sites assume by default). A round "
        "survives num_shares − threshold dropouts.")
    clipping_range: float = _opt(
        0.0, "Coordinates of each weighted update are clipped to ±this before quantisation "
        "(0: federation.max_update_norm, which bounds every coordinate, so nothing is "
        "clipped).")
    quantization_range: int = _opt(
        2**22, "Quantisation levels over [−clip, +clip]; sums are taken modulo 2^32, so "
        "sites × this must stay below 2^32.")
    dishonest_fraction: float = _opt(
        0.0, "With privacy.user_level: fraction of the sampled sites that may collude with "
        "the server; the other sites' noise alone must meet the site-level guarantee.")

    def __post_init__(self) -> None:
        require(self.num_shares == 0 or self.num_shares >= MIN_SECAGG_SITES,
                "secagg.num_shares", self.num_shares,
                f"0 (all sampled sites) or >= {MIN_SECAGG_SITES}")
        require(self.reconstruction_threshold >= 0, "secagg.reconstruction_threshold",
                self.reconstruction_threshold, ">= 0 (0: proof against one colluder)")
        require(self.clipping_range >= 0, "secagg.clipping_range", self.clipping_range,
                ">= 0 (0: federation.max_update_norm)")
        require(2 <= self.quantization_range < 2**31, "secagg.quantization_range",
                self.quantization_range, "in [2, 2^31)")
        require(0 <= self.dishonest_fraction < 1, "secagg.dishonest_fraction",
                self.dishonest_fraction, "in [0, 1)")

    @property
    def enabled(self) -> bool:
        """True when on; ``auto`` must be resolved (:meth:`RunConfig.with_secagg_resolved`)."""
        if self.mode == "auto":
            raise ConfigError("secagg.mode 'auto' was not resolved to on or off")
        return self.mode == "on"
