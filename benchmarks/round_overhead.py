"""A fedcpt round against a plain Flower + peft FedAvg round, side by side in one run.

All run through the same private simulation SuperLink and ``flwr run`` path
(:mod:`fedcpt.simulations.superlink`), with the same model, sites, local steps, batch and
Ray resources. The plain app (written to a temporary folder) is what a Flower user would
write: Flower's FedAvg, a ClientApp that loads SmolLM2 + peft once per process and runs
AdamW steps on its site's blocks, and the same evaluation as fedcpt's every round (each
site's held-out loss, the server's general kinds with KL to the base and the base model's
answers), with fedcpt's model loader and evaluation functions, so at the same precision
(bf16 autocast where the CPU has native bf16, else fp32). fedcpt runs with evaluation on
(its general evaluation overlapping the next round, as shipped, then waited for), then
with DP-SGD + SecAgg+.

A round is the steady-state one: from round 2's start to round 3's, read from the
streamed log lines as they arrive (Flower's ``[ROUND r/N]``, fedcpt's round progress
line), so model loading, the base model's one-off evaluations and the report are left
out. Whole-run wall times are kept beside. Goal (#28): ≤ 1.05× the plain app, with and
without DP + SecAgg.

    python benchmarks/round_overhead.py --out results/round_overhead.json
"""

from __future__ import annotations

import argparse
import re
import tempfile
import textwrap
import time
from pathlib import Path

from _common import cpu_class, load_average, precision, write

from fedcpt.config import load_config
from fedcpt.simulations.runner import federation_config, simulate
from fedcpt.simulations.superlink import LocalSuperLink

PLAIN_APP = '''
"""A plain Flower + peft FedAvg app that trains and evaluates as fedcpt does: the reference
round. Flower's FedAvg runs the rounds; each site trains AdamW steps on its blocks and
evaluates the global adapter on its held-out blocks (its base loss once); the server
evaluates each round's global adapter on the general kinds, with KL to the base and the
base model's own answers, in Flower's ``evaluate_fn``. The model and the evaluation are
fedcpt's own functions, so both apps do the same work at the same precision."""
import functools, torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedcpt.client.site import site_blocks
from fedcpt.config import load_config
from fedcpt.core.adapters import adapter_state, load_adapter, to_arrays
from fedcpt.core.data import blocks_across_units
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.model import load_adapted_model
from fedcpt.core.retention import GeneralEvaluation
from fedcpt.server.app import general_data

CFG = load_config("{scenario}", overrides={overrides!r})
BASE_LOSS = {{}}


@functools.lru_cache(maxsize=1)
def model():
    return load_adapted_model(CFG.model, CFG.lora, CFG.seed)  # fedcpt's model and precision


@functools.lru_cache(maxsize=4)
def blocks(partition):
    return site_blocks(CFG.sites[partition], CFG.model, CFG.data)


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    lm = model()
    load_adapter(lm.model, msg.content["arrays"])
    train_blocks = blocks(int(context.node_config["partition-id"])).train
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=CFG.train.lr)
    g = torch.Generator().manual_seed(0)
    lm.model.train()
    for _ in range(CFG.train.local_steps):
        batch = train_blocks[torch.randint(len(train_blocks), (CFG.train.batch_size,),
                                           generator=g)]
        with lm.autocast():
            loss = lm.model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    n = CFG.train.local_steps * CFG.train.batch_size
    reply = RecordDict({{"arrays": to_arrays(adapter_state(lm.model)),
                        "metrics": MetricRecord({{"num-examples": n}})}})
    return Message(reply, reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    lm = model()
    partition = int(context.node_config["partition-id"])
    site = blocks(partition)
    heldout = blocks_across_units(site.heldout, site.heldout_units, CFG.data.heldout_blocks)
    if partition not in BASE_LOSS:
        with lm.model.disable_adapter():
            BASE_LOSS[partition] = evaluate_blocks(lm, heldout,
                                                   CFG.train.eval_batch_size).loss
    load_adapter(lm.model, msg.content["arrays"])
    loss = evaluate_blocks(lm, heldout, CFG.train.eval_batch_size).loss
    return Message(RecordDict({{"metrics": MetricRecord({{
        "num-examples": len(heldout), "domain-loss": loss,
        "adaptation": BASE_LOSS[partition] - loss}})}}), reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    lm = model()
    data = general_data(CFG)
    general = GeneralEvaluation.prepare(lm, data.kinds, data.in_pool, CFG.data,
                                        CFG.train.eval_batch_size)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_adapter(lm.model, arrays)
        report = general.evaluate(lm)
        return MetricRecord({{"general-loss": report.overall.loss,
                             "kl-to-base": report.overall.kl_to_base}})

    FedAvg(fraction_evaluate=1.0).start(
        grid=grid, initial_arrays=to_arrays(adapter_state(lm.model)),
        num_rounds=CFG.federation.rounds, evaluate_fn=evaluate_fn)
'''

PYPROJECT = '''
[project]
name = "plainfed"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "plain_app:server"
clientapp = "plain_app:client"

[tool.flwr.app.config]
'''


ROUNDS = 3  # the timed round is the second: round 1 pays the sites' one-off base losses


class RoundClock:
    """Arrival times of the streamed log lines that start each round."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)
        self.starts: dict[int, float] = {}
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if (match := self.pattern.search(line)) is not None:
            self.starts.setdefault(int(match.group(1)), time.perf_counter())

    def round_s(self) -> float:
        """Seconds from round 2's start to round 3's."""
        if not {2, 3} <= set(self.starts):
            raise SystemExit("no round 2 and 3 starts in the log:\n" +
                             "\n".join(self.lines[-40:]))
        return self.starts[3] - self.starts[2]


def run_plain(scenario: str, overrides: list[str], root: Path) -> tuple[float, float]:
    """The plain app's (whole run, steady-state round) seconds."""
    app = root / "plainfed"
    app.mkdir()
    (app / "plain_app.py").write_text(textwrap.dedent(PLAIN_APP).format(
        scenario=scenario, overrides=overrides))
    (app / "pyproject.toml").write_text(PYPROJECT)
    cfg = load_config(scenario, overrides=overrides)
    clock = RoundClock(r"\[ROUND (\d+)/\d+\]")
    with LocalSuperLink(root / "plain-home") as superlink:
        start = time.perf_counter()
        status = superlink.run({}, federation_config(cfg), clock, app_dir=app)
        seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit("the plain Flower app failed:\n" + "\n".join(clock.lines[-40:]))
    return seconds, clock.round_s()


def run_fedcpt(scenario: str, overrides: list[str], root: Path,
               name: str) -> tuple[float, float]:
    """fedcpt's (whole run, steady-state round) seconds."""
    clock = RoundClock(r"progress round round=(\d+) state=\"training\"")
    start = time.perf_counter()
    simulate(load_config(scenario, overrides=overrides), root / name, on_line=clock)
    return time.perf_counter() - start, clock.round_s()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenario", default="shakespeare-fedavg")
    args = parser.parse_args()
    common = [f"federation.rounds={ROUNDS}"]
    runs = {"fedcpt_eval": common,
            "fedcpt_eval_waited": common + ["federation.overlap_general_eval=false"],
            "fedcpt_dp_secagg": common + ["privacy.enabled=true", "secagg.mode=on"]}
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="fedcpt-rounds-") as tmp:
        root = Path(tmp)
        wall, round_s = {}, {}
        wall["plain_flower_peft"], round_s["plain_flower_peft"] = run_plain(
            args.scenario, common, root)
        for name, overrides in runs.items():
            wall[name], round_s[name] = run_fedcpt(args.scenario, overrides, root, name)
    plain = round_s["plain_flower_peft"]
    write(args.out, {
        "benchmark": "round_overhead",
        "scenario": args.scenario,
        "rounds": ROUNDS,
        "cpu_class": cpu_class(),
        "precision": precision(load_config(args.scenario).model),
        "round_s": round_s,
        "wall_s": wall,
        "ratio_eval": round_s["fedcpt_eval"] / plain,
        "ratio_eval_waited": round_s["fedcpt_eval_waited"] / plain,
        "ratio_dp_secagg": round_s["fedcpt_dp_secagg"] / plain,
        "note": "round_s: round 2's start to round 3's (steady state, log arrival times); "
                "wall_s: whole runs, start-up, model loads and fedcpt's report included. "
                "Sites and server share this machine's cores in the simulation.",
        "load_average": [load_before, load_average()],
    })


if __name__ == "__main__":
    main()
