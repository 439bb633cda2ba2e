"""How much of the library one plain round runs: a round of FedAvg over a fake Grid, with
the real protocol, committer, recorder and run folder (the sites and the server's general
evaluation are fakes; the model is the tiny test Llama), traced with ``sys.setprofile``.
Every distinct fedcpt file a function of it runs from counts (tests/ and testing/ do not)."""

from __future__ import annotations

import math
import random
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcpt.config import load_config
from fedcpt.core import protocol as p
from fedcpt.core.evaluation import EvalResult
from fedcpt.core.retention import GeneralReport
from fedcpt.runfolder.paths import RunFolder
from fedcpt.server.protocols import round_protocol
from fedcpt.server.protocols.fedavg import PlainFedAvg
from fedcpt.server.recorder import RunRecorder
from fedcpt.server.round_loop import run_round
from fedcpt.server.run import FederatedRun, ServerModel

ROOT = Path(__file__).parents[2].resolve()
MAX_FILES = 20
NODES = {11: "comedies", 12: "histories", 13: "tragedies"}


class Grid:
    """Three sites, each adding 0.01 to the adapter it is sent."""

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, timeout=None):
        return [self._reply(m) for m in messages]

    @staticmethod
    def _reply(msg: Message) -> Message:
        site = ConfigRecord({"name": NODES[msg.metadata.dst_node_id]})
        if msg.metadata.message_type == "evaluate":
            return Message(RecordDict({p.METRICS: MetricRecord({
                p.NUM_EXAMPLES: 100, p.DOMAIN_LOSS: 2.0, p.DOMAIN_BASE_LOSS: 3.0,
                p.DOMAIN_ECE: 0.1}), p.SITE: site}), reply_to=msg)
        arrays = ArrayRecord({k: Array(v.numpy() + np.float32(0.01))
                              for k, v in msg.content[p.ARRAYS].items()})
        return Message(RecordDict({p.ARRAYS: arrays, p.METRICS: MetricRecord(
            {p.NUM_EXAMPLES: 16, p.TRAIN_SECONDS: 0.5}), p.SITE: site}), reply_to=msg)


class General:
    def evaluate(self, lm) -> GeneralReport:
        result = EvalResult(3.0, math.exp(3.0), 0.0, 128, [3.0])
        return GeneralReport({"prose": result}, result, None)


def library_files_of_one_round(tmp_path: Path, lm) -> set[str]:
    cfg = load_config("smoke", overrides=["federation.rounds=1"]
                      ).with_secagg_resolved(deployment=False)
    recorder = RunRecorder.start(RunFolder(tmp_path / "run"), cfg, lm)
    run = FederatedRun(Grid(), cfg, round_protocol(cfg), recorder, ServerModel(lm), General(),
                       ConfigRecord({p.RUN_CONFIG: cfg.to_json(), p.RUN_ID: recorder.run_id}),
                       random.Random(0))
    assert isinstance(run.protocol, PlainFedAvg)
    arrays = run.committer.commit(run, 0, lm.initial_adapter,
                                  run.committer.evaluate(run, lm.initial_adapter))
    run.model.settle()  # round 0 recorded: the trace holds round 1 only
    files: set[str] = set()

    def profile(frame, event, arg):
        if event == "call" and not frame.f_code.co_filename.startswith("<"):
            path = Path(frame.f_code.co_filename).resolve()
            if _is_library(path):
                files.add(path.relative_to(ROOT).as_posix())

    threading.setprofile(profile)  # the general evaluation runs in a thread
    sys.setprofile(profile)
    try:
        run_round(run, 1, arrays)
        run.model.settle()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    assert [r.round for r in recorder.rows] == [0, 1]
    return files


@pytest.mark.usefixtures("flower_task")
def test_one_plain_round_runs_few_library_files(tmp_path, fresh_lm):
    files = library_files_of_one_round(tmp_path, fresh_lm)
    assert "server/round_loop.py" in files and "server/protocols/fedavg.py" in files
    assert len(files) <= MAX_FILES, sorted(files)


def _is_library(path: Path) -> bool:
    """A fedcpt library file: a top-level module or one inside a package folder of the
    repository (not tests/ or testing/, and not a virtual environment inside the clone)."""
    if not path.is_relative_to(ROOT):
        return False
    parts = path.relative_to(ROOT).parts
    if len(parts) == 1:
        return True
    return parts[0] not in ("tests", "testing") and (ROOT / parts[0] / "__init__.py").is_file()
