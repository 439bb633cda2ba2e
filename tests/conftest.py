"""Shared fixtures: generated English-like text files, the byte tokenizer, fresh tiny models.

Nothing here downloads: the tests use the built-in ``tiny-llama`` model with the byte
tokenizer and text generated on the fly. Hugging Face Hub is switched to offline mode so a
test that names an unknown model fails at once instead of retrying the network.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist every worker (and each Flower/Ray process it starts, which inherits the
# environment) is one of several on a small machine: torch's default of one OpenMP thread
# per core oversubscribes it, and spinning threads then made a 3 s canary audit take 100 s.
# (Leaving the Flower processes on torch's default made the slow tier slower: > 32 min
# against 27 on the idle machine.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import logging  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import AbstractContextManager, contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fedcpt.config import RunConfig  # noqa: E402
from fedcpt.privacy.site_files import beside_ledger  # noqa: E402
from fedcpt.testing.site_round import task_identity  # noqa: E402

SUBJECTS = [
    "The old gardener", "A curious child", "The village baker", "My neighbour", "The captain",
    "A tired traveller", "The young teacher", "Her brother", "The quiet librarian",
    "A stray dog", "The river pilot", "The shopkeeper", "Our grandmother", "The farmer",
    "A clever student", "The night watchman", "The painter", "A stranger from the north",
    "The mayor", "The blacksmith",
]
VERBS = [
    "carried", "found", "repaired", "painted", "remembered", "described", "counted",
    "watched", "borrowed", "planted", "opened", "cleaned", "followed", "measured", "sold",
]
OBJECTS = [
    "the wooden gate", "a basket of apples", "the broken clock", "an old map", "the long letter",
    "a pair of boots", "the heavy lantern", "a bundle of letters", "the green boat",
    "a loaf of bread", "the silver key", "a jar of honey", "the dusty piano", "a wool blanket",
    "the narrow bridge", "a box of nails", "the tall ladder", "a bowl of soup", "the blue door",
    "a sack of flour",
]
TAILS = [
    "before the rain began", "after the market closed", "while the bells were ringing",
    "on a cold morning in winter", "near the edge of the forest", "without saying a word",
    "as the sun went down", "in the middle of the night", "because nobody else would",
    "with great care", "for the third time that week", "beside the harbour wall",
]


def english_text(n_chars: int, seed: int = 0) -> str:
    """Deterministic English-looking prose: paragraphs of 3-6 sentences, ``n_chars`` long."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    total = 0
    while total < n_chars:
        sentences = [
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
            f"{rng.choice(TAILS)}."
            for _ in range(rng.randint(3, 6))
        ]
        para = " ".join(sentences)
        paragraphs.append(para)
        total += len(para) + 2
    return "\n\n".join(paragraphs)


@pytest.fixture
def flower_task() -> Iterator[None]:
    """Act as a running Flower task (task 1, run 1, node 0: the SuperLink's), as Messages
    can only be built inside one; through Flower's public TaskIdentity setters."""
    with task_identity():
        yield


@pytest.fixture
def site_refusal(caplog) -> Callable[..., None]:
    """Check a site's refusal as the server and the site see it: the reply is one generic
    error sentence (no content), and the site's own log names the check that fired."""
    caplog.set_level(logging.WARNING, logger="fedcpt.client")

    def check(reply, pattern: str) -> None:
        assert reply.has_error() and not reply.has_content()
        assert "the reason is in the site's own log" in reply.error.reason, reply.error.reason
        assert any(re.search(pattern, m) for m in caplog.messages), caplog.messages
    return check


def site_files(ledger: Path) -> dict[str, bytes | None]:
    """Every file and folder a site keeps beside its ledger ``<name>.ledger.json``, each
    named after it (:func:`fedcpt.privacy.site_files.beside_ledger`: the ledger, its lock,
    the participation, site-level, split, attestation and drift records, the update cache
    ``<name>.ledger.updates/``): path relative to the ledger's folder → bytes (None for a
    folder)."""
    ledger = Path(ledger)
    folder, prefix = ledger.parent, beside_ledger(ledger, ".").name
    if not folder.is_dir():
        return {}
    found: dict[str, bytes | None] = {}
    for top in folder.iterdir():
        if top.name.startswith(prefix):
            for path in [top, *(sorted(top.rglob("*")) if top.is_dir() else ())]:
                found[str(path.relative_to(folder))] = (None if path.is_dir()
                                                        else path.read_bytes())
    return found


@contextmanager
def files_unchanged(*ledgers: Path) -> Iterator[dict[Path, dict[str, bytes | None]]]:
    """Around a request each site refuses: every file the site keeps beside its ledger
    (:func:`site_files`) is byte for byte what it was, and none appeared or went away.
    Yields the snapshot taken before (to check it is not empty where it should not be)."""
    before = {Path(ledger): site_files(ledger) for ledger in ledgers}
    yield before
    for ledger, was in before.items():
        now = site_files(ledger)
        changed = sorted(name for name in was.keys() | now.keys()
                         if name not in was or name not in now or was[name] != now[name])
        assert not changed, (f"a refused request changed the site's files beside {ledger}: "
                             f"{changed}")


@pytest.fixture
def unchanged_site_files() -> Callable[..., AbstractContextManager]:
    """``with unchanged_site_files(ledger, ...):`` around a request the sites refuse (issue
    25: a refusal counts only if the site's own check fired — :func:`site_refusal` — and
    its ledger and the records beside it are byte for byte unchanged)."""
    return files_unchanged


@pytest.fixture(scope="session")
def make_text() -> Callable[..., str]:
    """``english_text`` as a fixture, for module- and session-scoped fixtures."""
    return english_text


@pytest.fixture
def write_text(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing generated UTF-8 prose to ``tmp_path/<name>``; returns the path."""

    def _write(name: str, n_chars: int = 20_000, seed: int = 0) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(english_text(n_chars, seed), encoding="utf-8")
        return path

    return _write


@pytest.fixture(scope="session")
def byte_tok():
    from fedcpt.core.model import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture
def fresh_lm(byte_tok):
    """A new (uncached) tiny Llama with LoRA r=4 on q/v, fp32 on CPU.

    Tests that change adapter weights use this, never the per-process cached model from
    ``load_adapted_model`` (the in-process simulation server reuses that one).
    """
    from fedcpt.config import LoraSettings
    from fedcpt.core.model import AdaptedModel, attach_lora, tiny_llama

    model = attach_lora(tiny_llama(len(byte_tok)), LoraSettings(r=4, alpha=8), seed=0)
    return AdaptedModel(model, byte_tok, torch.device("cpu"), None)


@pytest.fixture
def text_blocks(byte_tok) -> torch.Tensor:
    """Sixteen 64-token blocks of generated prose (byte tokens)."""
    from fedcpt.core.data import pack

    ids = byte_tok([english_text(4000, seed=7)], add_special_tokens=False)["input_ids"]
    blocks = pack(ids, byte_tok.eos_token_id, 64)
    return blocks[:16]


SITE_NAMES = ("north", "south", "east")


@pytest.fixture(scope="session")
def sites_config(tmp_path_factory, make_text) -> Path:
    """A TOML with three local sites (north, south, east) of ~40k characters each, for
    real simulations of the smoke scenario: ``load_config("smoke", config_file=...)``."""
    root = tmp_path_factory.mktemp("sites")
    lines = []
    for i, name in enumerate(SITE_NAMES):
        path = root / f"{name}.txt"
        path.write_text(english_text(40_000, seed=100 + i), encoding="utf-8")
        lines += ["[[sites]]", f'name = "{name}"', f'data = ["{path.as_posix()}"]', ""]
    config = root / "sites.toml"
    config.write_text("\n".join(lines), encoding="utf-8")
    return config


# The slow tier's read-only smoke simulations of the three sites of ``sites_config``: a test
# names the runs it reads with ``@pytest.mark.smoke_run(name, ...)`` and gets them from the
# ``smoke_runs`` fixture. Every run the selected tests name is simulated once per session,
# all on one engine start (simulations/runner.py:simulate_many): each costs its work only.
SMOKE_RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dp": ("smoke-dp", ()),
    "plain": ("smoke", ()),
    "plain-again": ("smoke", ()),  # the same seed on the same engine: reproducibility
    "fedavgm": ("smoke", ("strategy.server_optimizer=fedavgm", "strategy.server_lr=0.02")),
    "fedadam": ("smoke", ("strategy.server_optimizer=fedadam", "strategy.server_lr=0.02")),
    "fedyogi": ("smoke", ("strategy.server_optimizer=fedyogi", "strategy.server_lr=0.02")),
    "ewc": ("smoke", ("strategy.anchor=ewc", "strategy.anchor_weight=50")),
    "regression-guard": ("smoke", ("strategy.regression_guard=5.0",)),
    "user-level": ("smoke", ("privacy.user_level=true", "privacy.user_clipping_norm=0.01",
                             "privacy.user_noise_multiplier=0.5")),
    "user-level-secagg": ("smoke", ("secagg.mode=on", "federation.max_update_norm=5",
                                    "privacy.user_level=true", "privacy.user_clipping_norm=0.01",
                                    "privacy.user_noise_multiplier=0.5")),
    "tracked": ("smoke-dp", ("tracking.backends=mlflow,tensorboard",)),
    "four-bit": ("smoke", ("model.quantization=4bit",)),
}
"""name: (scenario, overrides) of each shared smoke run."""

_SMOKE_RUNS_NEEDED = pytest.StashKey[list[str]]()


@dataclass(frozen=True)
class SmokeRun:
    """A finished shared smoke run: its config as loaded, run folder and summary."""

    cfg: RunConfig
    run_dir: Path
    summary: dict


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "smoke_run(*names): the shared smoke runs (SMOKE_RUNS) "
                                       "the test reads through the smoke_runs fixture")


def pytest_collection_finish(session: pytest.Session) -> None:
    """The shared smoke runs the selected tests name, in :data:`SMOKE_RUNS` order."""
    named = {n for item in session.items for mark in item.iter_markers("smoke_run")
             for n in mark.args}
    unknown = named - set(SMOKE_RUNS)
    if unknown:
        raise pytest.UsageError(f"smoke_run marks name unknown runs {sorted(unknown)}; "
                                f"known: {sorted(SMOKE_RUNS)}")
    session.config.stash[_SMOKE_RUNS_NEEDED] = [n for n in SMOKE_RUNS if n in named]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``pytest -n N --dist loadgroup`` (the slow tier), keep on one worker the tests
    that share an expensive fixture: all users of ``smoke_runs``, and each module whose
    tests use a module- or class-scoped fixture; every other test is scheduled alone."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        if "smoke_runs" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("smoke-runs"))
            continue
        # pytest has no public API for an item's fixture definitions
        definitions = getattr(item, "_fixtureinfo", None)
        scopes = {d[-1].scope for d in definitions.name2fixturedefs.values()} \
            if definitions is not None else set()
        if scopes & {"module", "class", "package"}:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def smoke_runs(request, tmp_path_factory, sites_config) -> dict[str, SmokeRun]:
    """Every shared smoke run the session's selected tests name (``smoke_run`` marks)."""
    from fedcpt.config import load_config
    from fedcpt.simulations.runner import prepare, simulate_many

    names = request.config.stash.get(_SMOKE_RUNS_NEEDED, [])
    if not names:
        raise pytest.UsageError("a test uses smoke_runs without a smoke_run mark naming runs")
    root = tmp_path_factory.mktemp("smoke-runs")
    configs = [load_config(SMOKE_RUNS[n][0], config_file=sites_config,
                           overrides=list(SMOKE_RUNS[n][1])) for n in names]
    jobs = [prepare(cfg, root / name) for name, cfg in zip(names, configs, strict=True)]
    summaries = simulate_many(jobs)
    return {name: SmokeRun(cfg, job.run_dir, summary)
            for name, cfg, job, summary in zip(names, configs, jobs, summaries, strict=True)}


@pytest.fixture
def smoke_dp_run(smoke_runs):
    """The shared DP smoke simulation (mark the test ``smoke_run("dp")``):
    ``(config, run_dir, summary)``."""
    if "dp" not in smoke_runs:
        pytest.fail("a test using smoke_dp_run needs the mark smoke_run(\"dp\")")
    run = smoke_runs["dp"]
    return run.cfg, run.run_dir, run.summary
