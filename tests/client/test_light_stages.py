"""A deployed SuperNode starts a ClientApp process for every message (Flower's process
isolation), so what the app imports is paid per message, per site. The SecAgg+
key-exchange stages (four of the five messages of each session) must start and answer
without torch, transformers, peft or Opacus (their import took about 17 CPU-s here)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

HEAVY = ("torch", "transformers", "peft", "opacus", "dp_accounting", "opendp")

# Stages 1 and 2 of a training session for three simulated sites, each message through the
# real ClientApp (its mods included), then the heavy modules that process had loaded.
KEY_EXCHANGE = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fedcpt.client.app import app
    from fedcpt.config import load_config
    from fedcpt.deploy.certs import provision_simulated_identities
    from fedcpt.privacy.secagg.context import RoundContext, adapter_digest, config_digest
    from fedcpt.privacy.secagg.identity import SIMULATION_IDENTITIES_ENV
    from fedcpt.privacy.secagg.params import SecAggParams
    from fedcpt.privacy.secagg.server import SETUP, SHARE_KEYS, STATE
    from fedcpt.testing.site_round import task_identity

    folder, heavy = Path(sys.argv[1]), sys.argv[2].split(",")
    nodes = [1, 2, 3]
    provision_simulated_identities(folder, ["a", "b", "c"])
    os.environ[SIMULATION_IDENTITIES_ENV] = str(folder)
    cfg = load_config("smoke", overrides=["secagg.mode=on"])
    params = SecAggParams.for_round(cfg, len(nodes))
    adapter = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    context = RoundContext(run_id="run-1", server_round=1, adapter=adapter_digest(adapter),
                           config=config_digest(ConfigRecord({"x": 1})),
                           participants=tuple(nodes))
    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i},
                           state=RecordDict(), run_config={}) for i, n in enumerate(nodes)}

    def ask(node, kind, record):
        with task_identity():
            msg = Message(RecordDict({STATE: record}), dst_node_id=node, message_type=kind)
            reply = app(msg, contexts[node])
        assert not reply.has_error(), reply.error.reason
        return reply.content.config_records[STATE]

    setup = ConfigRecord({**params.to_record(), **context.to_record()})
    keys = {n: ask(n, SETUP, setup) for n in nodes}
    listing = ConfigRecord({f: [keys[n][f] for n in nodes]
                            for f in ("pk1", "pk2", "signature", "cert")} | {"nodes": nodes})
    shares = {n: ask(n, SHARE_KEYS, listing) for n in nodes}
    assert all(len(list(shares[n]["sealed"])) == 2 for n in nodes)
    print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
""")


def _heavy_after(script: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", script, *args, ",".join(HEAVY)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_client_app_imports_no_model_code() -> None:
    script = ("import json, sys; import fedcpt.client.app; "
              "print(json.dumps(sorted(m for m in sys.argv[1].split(',') if m in sys.modules)))")
    assert _heavy_after(script) == []


def test_key_exchange_stages_answer_without_loading_the_model(tmp_path: Path) -> None:
    assert _heavy_after(KEY_EXCHANGE, str(tmp_path / "identities")) == []


def test_a_training_message_loads_the_model_code() -> None:
    """The check above can fail: the same probe sees the modules a training handler needs."""
    script = ("import json, sys; from fedcpt.client import model_handlers; "
              "print(json.dumps(sorted(m for m in sys.argv[1].split(',') if m in sys.modules)))")
    assert {"torch", "peft", "opacus"} <= set(_heavy_after(script))
