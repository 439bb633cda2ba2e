"""Fault injection: kill the DP server and a DP site at chosen points, and feed fedcpt a
catalogue of bad inputs (data, configuration, client updates, ledgers, certificates and
site settings, the CLI).

- Server kills: ``fedcpt simulate smoke-dp`` (three sites, 4 rounds) SIGKILLed as a
  process tree after the sites paid for round 1, after round 2's checkpoint (its general
  evaluation still pending: ``evaluation_pending``), and after the sites paid for round 3,
  resumed with ``--resume`` each time, against the same run without kills
  (:func:`fedcpt.testing.kills.server_kills`).
- Client kills: one DP site as its own process (the ClientApp's train handler) SIGKILLed
  at each point of a round — training, the stored-update write, the ledger write, after
  the ledger write, after the reply — and restarted (:func:`~fedcpt.testing.kills.client_kills`).
- Bad inputs: :data:`fedcpt.testing.bad_inputs.CATALOGUE`, each judged handled only if
  answered with fedcpt's own error naming the problem (or exit 2 with one ``error:`` line).

Goals: ``bad_inputs_unhandled``, ``ledger_mismatches`` and ``lost_rounds`` are 0, and every
kill is survived. Exits 1 when a goal is missed (after writing the JSON).

    python benchmarks/faults.py --out benchmarks/results/faults.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import setup, write

from fedcpt.testing.bad_inputs import CATALOGUE, try_input
from fedcpt.testing.kills import client_kills, server_kills

log = logging.getLogger("faults")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    setup(threads=1)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        outcomes = [try_input(case, root / "bad" / case.name) for case in CATALOGUE]
        seconds["bad_inputs"] = time.perf_counter() - start
        log.info("bad inputs: %d tried, %d unhandled", len(outcomes),
                 sum(not o.handled for o in outcomes))
        start = time.perf_counter()
        client = client_kills(root / "client")
        seconds["client_kills"] = time.perf_counter() - start
        log.info("client kills: %d survived", client.survived)
        start = time.perf_counter()
        server = server_kills(root / "server")
        seconds["server_kills"] = time.perf_counter() - start
        log.info("server kills: %d survived", server.survived)
        bad_inputs = [dict(dataclasses.asdict(o), answer=o.answer.replace(tmp, "<tmp>"))
                      for o in outcomes]
    payload = {
        "benchmark": "faults",
        "server_kills_survived": server.survived,
        "client_kills_survived": client.survived,
        "bad_inputs_tried": len(outcomes),
        "bad_inputs_unhandled": sum(not o.handled for o in outcomes),
        "ledger_mismatches": server.ledger_mismatches + client.ledger_mismatches,
        "lost_rounds": server.lost_rounds + client.lost_rounds,
        "bad_inputs_by_kind": dict(Counter(o.kind for o in outcomes)),
        "server_kills": server.kills,
        "client_kills": client.kills,
        "problems": server.problems + client.problems,
        "seconds": seconds,
        "bad_inputs": bad_inputs,
    }
    write(args.out, payload)
    missed = (payload["bad_inputs_unhandled"] or payload["ledger_mismatches"]
              or payload["lost_rounds"] or payload["problems"]
              or server.survived < len(server.kills) or client.survived < len(client.kills))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
