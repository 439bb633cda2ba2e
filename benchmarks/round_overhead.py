"""A fedcpt round against a plain Flower + peft FedAvg round, side by side in one run.

Both run one round through the same private simulation SuperLink and ``flwr run`` path
(:mod:`fedcpt.simulations.superlink`), with the same model, sites, local steps, batch and
Ray resources. The plain app (written to a temporary folder) is what a Flower user would
write: Flower's FedAvg, a ClientApp that loads SmolLM2 + peft once per process and runs
AdamW steps on its site's blocks, and no evaluation. fedcpt runs with evaluation on, then
with DP-SGD + SecAgg+. Goals: ≤ 1.1× with evaluation, ≤ 1.2× with DP + SecAgg.

    python benchmarks/round_overhead.py --out results/round_overhead.json [--rounds 1]
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
import time
from pathlib import Path

from _common import cpu_class, load_average, write

from fedcpt.config import load_config
from fedcpt.simulations.runner import federation_config, simulate
from fedcpt.simulations.superlink import LocalSuperLink

PLAIN_APP = '''
"""A plain Flower + peft FedAvg app: the reference round."""
import functools, torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from fedcpt.client.site import site_blocks
from fedcpt.config import load_config
from fedcpt.core import assets

CFG = load_config("{scenario}", overrides={overrides!r})


@functools.lru_cache(maxsize=1)
def model():
    base = AutoModelForCausalLM.from_pretrained(assets.smollm2_model_dir(), dtype=torch.float32)
    lora = LoraConfig(r=CFG.lora.r, lora_alpha=CFG.lora.alpha, lora_dropout=0.0,
                      target_modules=list(CFG.lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def arrays(m):
    return ArrayRecord({{k: v.detach().numpy() for k, v in get_peft_model_state_dict(m).items()}})


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    m = model()
    set_peft_model_state_dict(m, {{k: torch.from_numpy(v.numpy()) for k, v in
                                   msg.content["arrays"].items()}})
    site = CFG.sites[int(context.node_config["partition-id"])]
    blocks = site_blocks(site, CFG.model, CFG.data).train
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=CFG.train.lr)
    g = torch.Generator().manual_seed(0)
    m.train()
    for _ in range(CFG.train.local_steps):
        batch = blocks[torch.randint(len(blocks), (CFG.train.batch_size,), generator=g)]
        m(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    n = CFG.train.local_steps * CFG.train.batch_size
    reply = RecordDict({{"arrays": arrays(m), "metrics": MetricRecord({{"num-examples": n}})}})
    return Message(reply, reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    FedAvg(fraction_evaluate=0.0).start(grid=grid, initial_arrays=arrays(model()),
                                        num_rounds=CFG.federation.rounds)
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


def run_plain(scenario: str, overrides: list[str], root: Path) -> float:
    app = root / "plainfed"
    app.mkdir()
    (app / "plain_app.py").write_text(textwrap.dedent(PLAIN_APP).format(
        scenario=scenario, overrides=overrides))
    (app / "pyproject.toml").write_text(PYPROJECT)
    cfg = load_config(scenario, overrides=overrides)
    lines: list[str] = []
    with LocalSuperLink(root / "plain-home") as superlink:
        start = time.perf_counter()
        status = superlink.run({}, federation_config(cfg), lines.append, app_dir=app)
        seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit("the plain Flower app failed:\n" + "\n".join(lines[-40:]))
    return seconds


def run_fedcpt(scenario: str, overrides: list[str], root: Path, name: str) -> float:
    start = time.perf_counter()
    simulate(load_config(scenario, overrides=overrides), root / name)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenario", default="shakespeare")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    common = [f"federation.rounds={args.rounds}"]
    private = common + ["privacy.enabled=true", "secagg.mode=on"]
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="fedcpt-rounds-") as tmp:
        root = Path(tmp)
        plain = run_plain(args.scenario, common, root)
        fedcpt = run_fedcpt(args.scenario, common, root, "fedcpt")
        fedcpt_dp = run_fedcpt(args.scenario, private, root, "fedcpt-dp-secagg")
    write(args.out, {
        "benchmark": "round_overhead",
        "scenario": args.scenario,
        "rounds": args.rounds,
        "cpu_class": cpu_class(),
        "wall_s": {"plain_flower_peft": plain, "fedcpt_eval": fedcpt,
                   "fedcpt_dp_secagg": fedcpt_dp},
        "ratio_eval": fedcpt / plain,
        "ratio_dp_secagg": fedcpt_dp / plain,
        "note": "whole-run wall time including start-up and model loads on both sides",
        "load_average": [load_before, load_average()],
    })


if __name__ == "__main__":
    main()
