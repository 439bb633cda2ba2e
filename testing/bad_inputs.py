"""A catalogue of bad inputs — data, configuration, client updates, ledgers, certificates
and a deployed site's settings, the CLI — and whether fedcpt answers each with a clear
error.

An input is *handled* only if it raised one of fedcpt's own errors
(:class:`~fedcpt.exceptions.FedcptError` and its subclasses: ConfigError, DataError,
UpdateRejected, LedgerError, SiteRefused, …) whose message names the problem (the case's
``expect`` pattern), or, at the command line, exited 2 with a single ``error:`` line. An
update counts as handled when the strategy rejected it — kept it out of the average and
recorded why — through the round loop's own collection
(:func:`fedcpt.server.round_loop.collect_train`) and :mod:`fedcpt.strategies.fedavg`.
Anything else (accepted, another exception, an unclear message) is unhandled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcpt.config import PrivacyConfig, load_config
from fedcpt.core.data import build_blocks
from fedcpt.core.model import byte_tokenizer
from fedcpt.exceptions import FedcptError, UpdateRejected
from fedcpt.privacy.ledger import PrivacyLedger, _checksum
from fedcpt.privacy.plan import plan_site
from fedcpt.server.round_loop import collect_train
from fedcpt.strategies.fedavg import AdapterFedAvg
from fedcpt.testing.bad_proposals import PROPOSALS
from fedcpt.testing.site_round import task_identity


@dataclass(frozen=True)
class BadInput:
    """One bad input: ``attempt(folder)`` feeds it to fedcpt in a fresh folder."""

    name: str
    kind: str  # data, config, update, ledger, certificate, proposal, cli
    attempt: Callable[[Path], object]
    expect: str  # regex the answer must match: it names the problem


@dataclass(frozen=True)
class Outcome:
    name: str
    kind: str
    handled: bool
    answer: str


def try_input(case: BadInput, folder: Path) -> Outcome:
    """Feed ``case`` to fedcpt and judge the answer (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = case.attempt(folder)
    except FedcptError as err:
        answer = f"{type(err).__name__}: {err}"
        return Outcome(case.name, case.kind, bool(re.search(case.expect, str(err))), answer)
    except Exception as err:  # noqa: BLE001 - any other exception is the finding
        return Outcome(case.name, case.kind, False, f"unhandled {type(err).__name__}: {err}")
    if isinstance(result, subprocess.CompletedProcess):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        clear = (result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:")
                 and bool(re.search(case.expect, lines[0])))
        return Outcome(case.name, case.kind, clear,
                       f"exit {result.returncode}: {result.stderr.strip()[-500:]}")
    return Outcome(case.name, case.kind, False, f"accepted ({result!r})"[:500])


# --- data --------------------------------------------------------------------------------
PROSE = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, again "
                    f"and again, for the {i}th time today." for i in range(200))


def _blocks(*sources: str | Path, text_field: str = "text") -> object:
    blocks = build_blocks([str(s) for s in sources], byte_tokenizer(), block_size=16,
                          heldout_fraction=0.1, text_field=text_field, what="site 'test'",
                          unit="passage")
    return f"{len(blocks.train)} train blocks"


def _file(name: str, content: bytes | str) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        path = folder / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return _blocks(path)
    return attempt


def _parquet(folder: Path) -> object:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["some text"] * 10}), folder / "notes.parquet")
    return _blocks(folder / "notes.parquet")


def _copies(folder: Path) -> object:
    """Three files holding the same note: one document once duplicates are dropped."""
    for i in range(3):
        (folder / f"copy-{i}.txt").write_text(PROSE[:1500], encoding="utf-8")
    return _blocks(*(folder / f"copy-{i}.txt" for i in range(3)))


def _empty_dir(folder: Path) -> object:
    (folder / "notes").mkdir()
    (folder / "notes" / "scan.pdf").write_bytes(b"%PDF-1.4")
    return _blocks(folder / "notes")


DATA = [
    BadInput("data-non-utf8", "data", _file("notes.txt", "café".encode("latin-1") * 50),
             r"not UTF-8 text"),
    BadInput("data-empty-file", "data", _file("notes.txt", b""), r"contains no text"),
    BadInput("data-whitespace-only", "data", _file("notes.txt", " \n\n\t\n "),
             r"contains no text"),
    BadInput("data-binary", "data", _file("notes.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256))),
             r"not UTF-8 text"),
    BadInput("data-huge-line", "data", _file("notes.txt", "word " * 200_000),
             r"single unit cannot be both trained on and held out"),
    BadInput("data-too-short", "data", _file("notes.txt", "Hello.\n\nBye."),
             r"too little text for one training and one held-out block"),
    BadInput("data-all-duplicates", "data", _copies, r"2 duplicate documents were dropped"),
    BadInput("data-jsonl-missing-field", "data",
             _file("notes.jsonl", '{"body": "a note"}\n'), r"notes.jsonl:1 has no string field"),
    BadInput("data-jsonl-bad-json", "data",
             _file("notes.jsonl", '{"text": "a note"}\n{"text": "cut off\n'),
             r"notes.jsonl:2 is not valid JSON"),
    BadInput("data-jsonl-not-object", "data", _file("notes.jsonl", "[1, 2, 3]\n"),
             r"notes.jsonl:1 has no string field 'text'"),
    BadInput("data-jsonl-text-not-string", "data", _file("notes.jsonl", '{"text": 42}\n'),
             r"notes.jsonl:1 has no string field 'text'"),
    BadInput("data-jsonl-empty-texts", "data", _file("notes.jsonl", '{"text": ""}\n' * 5),
             r"contains no text"),
    BadInput("data-missing-path", "data", lambda f: _blocks(f / "nowhere.txt"),
             r"data path not found"),
    BadInput("data-unsupported-extension", "data", _file("notes.pdf", b"%PDF-1.4 ..."),
             r"unsupported data file type '\.pdf'"),
    BadInput("data-dir-without-text-files", "data", _empty_dir, r"holds no .*txt"),
    BadInput("data-glob-matches-nothing", "data", lambda f: _blocks(f / "*.jsonl"),
             r"matches no"),
    BadInput("data-parquet-missing-column", "data", _parquet,
             r"cannot read text column 'text'"),
    BadInput("data-parquet-corrupt", "data", _file("notes.parquet", b"PAR1 not really"),
             r"cannot read text column"),
    BadInput("data-unknown-stdlib-source", "data", lambda f: _blocks("stdlib:poems"),
             r"unknown stdlib source 'poems'"),
]


# --- configuration -----------------------------------------------------------------------
def _override(*pairs: str) -> Callable[[Path], object]:
    return lambda folder: load_config("smoke", overrides=list(pairs))


def _config_file(text: str) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        (folder / "run.toml").write_text(text, encoding="utf-8")
        return load_config("smoke", config_file=folder / "run.toml")
    return attempt


CONFIG = [
    BadInput("config-unknown-key", "config", _override("train.lrr=0.1"),
             r"unknown config key `train.lrr`.*`train.lr`"),
    BadInput("config-unknown-section", "config", _override("trainer.lr=0.1"),
             r"unknown config key `trainer`"),
    BadInput("config-int-not-a-number", "config", _override("train.local_steps=ten"),
             r"`train.local_steps` must be an integer"),
    BadInput("config-float-for-int", "config", _override("train.local_steps=2.5"),
             r"`train.local_steps` must be an integer"),
    BadInput("config-bad-bool", "config", _override("privacy.enabled=maybe"),
             r"`privacy.enabled` must be true or false"),
    BadInput("config-negative-lr", "config", _override("train.lr=-0.1"), r"`train.lr` must be > 0"),
    BadInput("config-nan-lr", "config", _override("train.lr=nan"), r"`train.lr` must be"),
    BadInput("config-heldout-fraction-out-of-range", "config",
             _override("data.heldout_fraction=1.5"), r"`data.heldout_fraction` must be strictly"),
    BadInput("config-unknown-choice", "config", _override("model.precision=fp8"),
             r"`model.precision` must be one of"),
    BadInput("config-zero-rounds", "config", _override("federation.rounds=0"),
             r"`federation.rounds` must be"),
    BadInput("config-min-sites-above-sites", "config", _override("federation.min_sites=9"),
             r"`federation.min_sites` must be at most the number of sites"),
    BadInput("config-user-level-with-rehearsal", "config",
             _override("privacy.user_level=true", "strategy.rehearsal=mix"),
             r"user_level cannot be combined with strategy.rehearsal"),
    BadInput("config-anchor-overshoots", "config",
             _override("strategy.anchor=fedprox", "strategy.anchor_weight=1000"),
             r"`strategy.anchor_weight` must be small enough"),
    BadInput("config-embedding-adapter", "config", _override("lora.target_modules=embed_tokens"),
             r"`lora.target_modules` must be linear layers only"),
    BadInput("config-override-without-value", "config", _override("train.lr"),
             r"must look like section.key=value"),
    BadInput("config-sites-in-override", "config", _override("sites=[]"),
             r"`sites` cannot be overridden with --set"),
    BadInput("config-file-missing", "config",
             lambda f: load_config("smoke", config_file=f / "missing.toml"),
             r"config file not found"),
    BadInput("config-file-not-toml", "config", _config_file("[train\nlr = "),
             r"is not valid TOML"),
    BadInput("config-unknown-scenario", "config", lambda f: load_config("smok"),
             r"unknown scenario 'smok'"),
    BadInput("config-duplicate-site-names", "config", _config_file(
        '[[sites]]\nname = "a"\ndata = ["x.txt"]\n[[sites]]\nname = "a"\ndata = ["y.txt"]\n'),
        r"`sites.name` must be unique site names"),
    BadInput("config-site-without-data", "config",
             _config_file('[[sites]]\nname = "a"\ndata = []\n'),
             r"`sites\[a\].data` must be at least one data source"),
    BadInput("config-impossible-dp-budget", "config", lambda f: plan_site(
        PrivacyConfig(enabled=True, target_epsilon=1e-4), site="a", records=100, batch_size=50,
        steps=10_000), r"privacy budget ε=0.0001.* is too small"),
    BadInput("config-dp-budget-already-spent", "config", lambda f: plan_site(
        PrivacyConfig(enabled=True, target_epsilon=1.0), site="a", records=100, batch_size=10,
        steps=10, prior=[(0.5, 0.1, 1000)]), r"the budget ε=1.0 is already spent"),
]


# --- client updates ----------------------------------------------------------------------
SHAPES = {"layers.0.q_proj.lora_A.weight": (4, 8), "layers.0.q_proj.lora_B.weight": (8, 4)}
GOOD_EXAMPLES = 16


def _arrays(fill: float = 0.0, shapes: dict | None = None, dtype=np.float32) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, fill, dtype)) for k, s in (shapes or SHAPES).items()})


def _reply(request: Message, site: str, content: RecordDict) -> Message:
    content = RecordDict({**dict(content.items()), "site": ConfigRecord({"name": site})})
    return Message(content=content, reply_to=request)


def _metrics(**overrides: float) -> MetricRecord:
    values = {"num-examples": GOOD_EXAMPLES, "train-seconds": 0.5}
    values.update(overrides)
    return MetricRecord({k: v for k, v in values.items() if v is not None})


def _update(build: Callable[[], RecordDict], max_update_norm: float = 0.0,
            ) -> Callable[[Path], object]:
    """Aggregate a good reply and the bad one; handled if the bad one was rejected (kept out
    of the average, with a reason) — raised here as that UpdateRejected."""
    def attempt(folder: Path) -> object:
        strategy = AdapterFedAvg(max_examples=32, max_update_norm=max_update_norm)
        reference = _arrays(0.0)
        with task_identity():
            requests = [Message(content=RecordDict(), dst_node_id=n, message_type="train")
                        for n in (1, 2)]
            good = _reply(requests[0], "good", RecordDict(
                {"arrays": _arrays(1.0), "metrics": _metrics()}))
            bad = _reply(requests[1], "bad", build())
            collected = collect_train(1, [good, bad], {1, 2}, strategy, reference)
        failures = collected.failures
        arrays = (strategy.aggregate(list(collected.accepted.values()), reference)
                  if collected.accepted else None)
        rejected = [f for f in failures if f.startswith("bad: update rejected: ")]
        averaged_good_only = arrays is not None and all(
            np.array_equal(arrays[k].numpy(), np.full(s, 1.0, np.float32))
            for k, s in SHAPES.items())
        if rejected and averaged_good_only:
            raise UpdateRejected(rejected[0].removeprefix("bad: update rejected: "))
        return f"aggregated; failures {failures}"
    return attempt


def _with(arrays: ArrayRecord | None = None, **metrics: float | None) -> Callable[[], RecordDict]:
    def build() -> RecordDict:
        content = RecordDict({"metrics": _metrics(**metrics)})
        if arrays is not None:
            content["arrays"] = arrays
        return content
    return build


def _poisoned(value: float) -> ArrayRecord:
    arrays = {k: np.full(s, 1.0, np.float32) for k, s in SHAPES.items()}
    next(iter(arrays.values()))[0, 0] = value
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


UPDATE = [
    BadInput("update-nan", "update", _update(_with(_poisoned(float("nan")))),
             r"contains NaN or Inf"),
    BadInput("update-inf", "update", _update(_with(_poisoned(float("inf")))),
             r"contains NaN or Inf"),
    BadInput("update-missing-tensor", "update", _update(_with(_arrays(
        1.0, dict(list(SHAPES.items())[:1])))), r"adapter keys differ \(missing"),
    BadInput("update-extra-tensor", "update", _update(_with(_arrays(
        1.0, {**SHAPES, "layers.0.k_proj.lora_A.weight": (4, 8)}))),
        r"unexpected \['layers.0.k_proj"),
    BadInput("update-wrong-shape", "update", _update(_with(_arrays(
        1.0, {k: (s[1], s[0]) for k, s in SHAPES.items()}))), r"expected float32\[4, 8\]"),
    BadInput("update-wrong-dtype", "update", _update(_with(_arrays(1.0, dtype=np.float64))),
             r"expected float32.*got float64"),
    BadInput("update-huge-norm", "update", _update(_with(_arrays(1e6)), max_update_norm=10.0),
             r"update norm .* exceeds the bound 10"),
    BadInput("update-extra-array-record", "update", _update(lambda: RecordDict({
        "arrays": _arrays(1.0), "more": _arrays(1.0), "metrics": _metrics()})),
        r"exactly one 'arrays' record"),
    BadInput("update-no-arrays", "update", _update(_with(None)), r"exactly one 'arrays' record"),
    BadInput("update-no-metrics", "update", _update(lambda: RecordDict({"arrays": _arrays(1.0)})),
             r"no 'metrics' record"),
    BadInput("update-missing-num-examples", "update",
             _update(_with(_arrays(1.0), **{"num-examples": None})),
             r"lack finite \['num-examples'\]"),
    BadInput("update-nan-metric", "update",
             _update(_with(_arrays(1.0), **{"train-seconds": float("nan")})),
             r"lack finite \['train-seconds'\]"),
    BadInput("update-num-examples-too-big", "update",
             _update(_with(_arrays(1.0), **{"num-examples": 10**9})),
             r"num-examples 1e\+09 outside \(0, 32\]"),
    BadInput("update-num-examples-zero", "update",
             _update(_with(_arrays(1.0), **{"num-examples": 0})), r"num-examples 0 outside"),
    BadInput("update-num-examples-negative", "update",
             _update(_with(_arrays(1.0), **{"num-examples": -16})), r"num-examples -16 outside"),
]


# --- ledgers and stored updates ----------------------------------------------------------
def _ledger(folder: Path, site: str = "clinic", target: float = 8.0) -> PrivacyLedger:
    return PrivacyLedger.open(folder / "clinic.ledger.json", site, delta=1e-3,
                              target_epsilon=target)


def _recorded(folder: Path) -> Path:
    _ledger(folder).record("run", 1, 1.0, 0.01, 10)
    return folder / "clinic.ledger.json"


def _edit(change: Callable[[dict], None], recompute_checksum: bool = False,
          ) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        path = _recorded(folder)
        payload = json.loads(path.read_text())
        change(payload)
        if recompute_checksum:
            payload["checksum"] = _checksum({k: v for k, v in payload.items() if k != "checksum"})
        path.write_text(json.dumps(payload))
        return _ledger(folder)
    return attempt


def _write_ledger(text: str) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        (folder / "clinic.ledger.json").write_text(text)
        return _ledger(folder)
    return attempt


def _truncated(folder: Path) -> object:
    path = _recorded(folder)
    path.write_text(path.read_text()[:-40])
    return _ledger(folder)


def _exhausted(folder: Path) -> object:
    ledger = _ledger(folder, target=1.0)
    ledger.record("run", 1, 1.0, 0.05, 100)
    return ledger.check_budget(0.5, 0.05, 100)


def _twice(folder: Path) -> object:
    ledger = _ledger(folder)
    ledger.record("run", 1, 1.0, 0.01, 10)
    return ledger.record("run", 1, 1.0, 0.01, 10)


def _paid_without_update(folder: Path) -> object:
    from fedcpt.client.update_cache import UpdateCache, reusable_update

    ledger = _ledger(folder)
    ledger.record("run", 1, 1.0, 0.01, 10)
    return reusable_update(ledger, UpdateCache.beside(ledger.path), "run", 1, "request")


def _paid_with_corrupt_update(folder: Path) -> object:
    from fedcpt.client.update_cache import UpdateCache, reusable_update

    ledger = _ledger(folder)
    ledger.record("run", 1, 1.0, 0.01, 10)
    cache = UpdateCache.beside(ledger.path)
    cache.path("run", 1).parent.mkdir(parents=True, exist_ok=True)
    cache.path("run", 1).write_bytes(b"\x08\0\0\0\0\0\0\0{}garbage")
    return reusable_update(ledger, cache, "run", 1, "request")


def _entries(payload: dict) -> list:
    return payload["entries"]


LEDGER = [
    BadInput("ledger-tampered", "ledger", _edit(lambda p: _entries(p)[0].update(steps=1)),
             r"checksum mismatch"),
    BadInput("ledger-checksum-removed", "ledger", _edit(lambda p: p.pop("checksum")),
             r"not a valid privacy ledger"),
    BadInput("ledger-truncated", "ledger", _truncated, r"not a valid privacy ledger"),
    BadInput("ledger-not-json", "ledger", _write_ledger("{not json"),
             r"not a valid privacy ledger"),
    BadInput("ledger-not-an-object", "ledger", _write_ledger("[]"), r"not a JSON object"),
    BadInput("ledger-unknown-version", "ledger", _edit(lambda p: p.update(version=99), True),
             r"unsupported ledger version 99"),
    BadInput("ledger-entry-unknown-field", "ledger",
             _edit(lambda p: _entries(p)[0].update(spent="none"), True),
             r"not a valid privacy ledger"),
    BadInput("ledger-of-another-site", "ledger",
             lambda f: (_recorded(f), _ledger(f, site="newsroom")),
             r"ledger of site 'clinic', not 'newsroom'"),
    BadInput("ledger-missing-file", "ledger",
             lambda f: PrivacyLedger.load(f / "clinic.ledger.json"), r"ledger not found"),
    BadInput("ledger-budget-exhausted", "ledger", _exhausted, r"refuses to train"),
    BadInput("ledger-round-recorded-twice", "ledger", _twice, r"already recorded round 1"),
    BadInput("ledger-paid-round-without-stored-update", "ledger", _paid_without_update,
             r"already paid for round 1 .* no stored update"),
    BadInput("ledger-paid-round-with-corrupt-stored-update", "ledger",
             _paid_with_corrupt_update, r"cannot resend it .*unreadable"),
]


# --- the command line --------------------------------------------------------------------
def _cli(*args: str) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        return subprocess.run([sys.executable, "-m", "fedcpt.cli", *args], env=env,
                              capture_output=True, text=True, timeout=300, cwd=folder)
    return attempt


def _cli_tampered_report(folder: Path) -> object:
    path = _recorded(folder)
    payload = json.loads(path.read_text())
    payload["entries"][0]["steps"] = 1
    path.write_text(json.dumps(payload))
    return _cli("privacy", "report", str(path))(folder)


def _cli_forget(site: str) -> Callable[[Path], object]:
    """``adapters forget`` on a run folder that has a manifest and no adapter versions."""
    def attempt(folder: Path) -> object:
        run = folder / "run"
        (run / "adapters").mkdir(parents=True)
        (run / "manifest.json").write_text(json.dumps(
            {"run_id": "r", "config": load_config("smoke").to_dict()}))
        return _cli("adapters", "forget", str(run), site)(folder)
    return attempt


CLI = [
    BadInput("cli-forget-unknown-site", "cli", _cli_forget("comedy"),
             r"^error: site 'comedy' is not in run .*did you mean 'comedies'"),
    BadInput("cli-forget-run-without-versions", "cli", _cli_forget("comedies"),
             r"^error: .* has no stored adapter versions"),
    BadInput("cli-simulate-unknown-key", "cli", _cli("simulate", "smoke", "--set", "train.lrr=1"),
             r"^error: unknown config key `train.lrr`"),
    BadInput("cli-privacy-report-tampered-ledger", "cli", _cli_tampered_report,
             r"^error: .*checksum mismatch"),
]

# --- certificates and a deployed site's settings (fedcpt certs, fedcpt site check) -------
def _certs(folder: Path):
    from fedcpt.deploy.certs import write_federation_certs

    return write_federation_certs(folder / "certs", ["127.0.0.1"], ["clinic"], days=30)


def _root_check(pick: Callable[[Path], Path], years_ahead: int = 0,
                ) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        import datetime as dt

        from fedcpt.deploy.site_check import check_root_certificates

        _certs(folder)
        now = dt.datetime.now(dt.UTC) + dt.timedelta(days=365 * years_ahead)
        return check_root_certificates(pick(folder / "certs"), now=now)
    return attempt


def _not_pem(certs: Path) -> Path:
    (certs / "garbage.crt").write_text("this is not a certificate")
    return certs / "garbage.crt"


def _auth_key(folder: Path) -> object:
    from fedcpt.deploy.site_check import check_auth_key

    _certs(folder)
    return check_auth_key(folder / "certs" / "ca.key")  # a PEM key, not an OpenSSH one


def _site_names(text: str) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        from fedcpt.deploy.certs import site_names

        return site_names(text)
    return attempt


def _write_certs(addresses: list[str], days: int = 30, twice: bool = False,
                 ) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        from fedcpt.deploy.certs import write_federation_certs

        for _ in range(2 if twice else 1):
            files = write_federation_certs(folder / "certs", addresses, ["clinic"], days=days)
        return files
    return attempt


def _node_config(node_config: dict) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        from fedcpt.deploy.site_check import check_node_config

        return check_node_config(node_config)
    return attempt


CERTIFICATE = [
    BadInput("cert-site-count-out-of-range", "certificate", _site_names("0"),
             r"--sites must be between 1 and 1000"),
    BadInput("cert-bad-site-name", "certificate", _site_names("north,../etc"),
             r"site names may use letters"),
    BadInput("cert-duplicate-site-names", "certificate", _site_names("north,north"),
             r"site names must be unique"),
    BadInput("cert-bad-superlink-address", "certificate", _write_certs(["not a host!"]),
             r"'not a host!' is neither an IP address nor a DNS name"),
    BadInput("cert-zero-days", "certificate", _write_certs(["127.0.0.1"], days=0),
             r"--days must be at least 1"),
    BadInput("cert-overwrite", "certificate", _write_certs(["127.0.0.1"], twice=True),
             r"refusing to overwrite .* \(use --force\)"),
    BadInput("cert-root-not-pem", "certificate", _root_check(_not_pem),
             r"is not a PEM certificate"),
    BadInput("cert-root-is-server-cert", "certificate",
             _root_check(lambda certs: certs / "superlink.crt"), r"is not a CA certificate"),
    BadInput("cert-root-expired", "certificate",
             _root_check(lambda certs: certs / "ca.crt", years_ahead=2), r"expired on"),
    BadInput("cert-auth-key-not-openssh", "certificate", _auth_key,
             r"is not an unencrypted OpenSSH private key.*PEM key"),
    BadInput("site-node-config-unknown-key", "certificate",
             _node_config({"site-nam": "clinic", "data-path": "/data"}),
             r"unknown node-config key\(s\) \['site-nam'\] \(did you mean `site-name`\?\)"),
    BadInput("site-node-config-bad-budget", "certificate",
             _node_config({"site-name": "clinic", "data-path": "/data", "epsilon-budget": -1}),
             r"`epsilon-budget` must be a positive number"),
]

PROPOSAL = [BadInput(name, "proposal", attempt, expect) for name, attempt, expect in PROPOSALS]

CATALOGUE: list[BadInput] = DATA + CONFIG + UPDATE + LEDGER + CERTIFICATE + PROPOSAL + CLI
