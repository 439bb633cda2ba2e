"""In-process SecAgg federations for the tests: a CA, one signing identity per node, and
a grid that delivers each stage message to the real site functions the ClientApp calls
(:mod:`fedcpt.privacy.secagg.site`), each with its own Flower ``Context``."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcpt.client.app import app
from fedcpt.config import RunConfig
from fedcpt.core import protocol as p
from fedcpt.deploy.certs import make_ca, make_site_signing_cert, write_federation_certs
from fedcpt.privacy.heldout import HeldoutSplit, split_path
from fedcpt.privacy.secagg import participation, site
from fedcpt.privacy.secagg.context import RoundContext, adapter_digest, config_digest
from fedcpt.privacy.secagg.ddp import DistributedDP
from fedcpt.privacy.secagg.encoding import encode, vector_length
from fedcpt.privacy.secagg.identity import SiteIdentity
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.server import CONSISTENCY, MASKED, SETUP, SHARE_KEYS, STATE, UNMASK
from fedcpt.server.protocols.secagg import SecAggPlus
from fedcpt.server.run import FederatedRun, ServerModel
from fedcpt.strategies.secagg_fedavg import SecAggFedAvg


def make_identities(nodes, ca=None) -> dict[int, SiteIdentity]:
    """One identity per node (certificate name ``site-<node>``) under one new CA."""
    ca_key, ca_cert = ca or make_ca(days=1)
    identities = {}
    for node in nodes:
        key, cert = make_site_signing_cert(ca_key, ca_cert, f"site-{node}", days=1)
        identities[node] = SiteIdentity(key, cert.public_bytes(serialization.Encoding.DER),
                                        ca_cert)
    return identities


def new_context(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def keep_records(context: Context, ledger: Path, name: str) -> Path:
    """Give the site of ``context`` a ledger location (``ledger-path``) and records beside
    that ledger from an earlier run — its held-out split, a secure sum it joined — so that
    a refusal can be checked to leave them byte for byte (``unchanged_site_files``)."""
    context.node_config["ledger-path"] = str(ledger)
    HeldoutSplit.open(split_path(ledger), name, "passage")
    participation.claim(context, str(ledger), ["train/run/run-0/round/1"])
    return ledger


class SiteGrid:
    """Delivers stage messages to in-process sites; ``drop[stage]`` sites never answer."""

    def __init__(self, updates: dict[int, tuple[ArrayRecord, int]],
                 drop: dict[str, set[int]] | None = None, cfg: RunConfig | None = None) -> None:
        self.updates = updates
        self.drop = drop or {}
        self.cfg = cfg  # with site-level DP on, the sites noise their updates
        self.contexts = {n: new_context(n) for n in updates}
        self.identities = make_identities(updates)
        self.sent_masked: dict[int, np.ndarray] = {}
        self.encoded: dict[int, np.ndarray] = {}

    def get_node_ids(self):
        return list(self.updates)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            if node in self.drop.get(kind, ()):
                continue
            replies.append(self._answer(node, kind, msg))
        return replies

    def _answer(self, node: int, kind: str, msg: Message) -> Message:
        ctx, record = self.contexts[node], msg.content.config_records[STATE]
        me = self.identities[node]
        stages = {SETUP: lambda: site.setup(ctx, node, record, me),
                  SHARE_KEYS: lambda: site.share_keys(ctx, record, me),
                  CONSISTENCY: lambda: site.consistency(ctx, record, me),
                  UNMASK: lambda: site.unmask(ctx, record, me)}
        if kind in stages:
            return Message(RecordDict({STATE: stages[kind]()}), reply_to=msg)
        assert kind == MASKED
        site.receive_shares(ctx, record, msg.content[p.ARRAYS], msg.content[p.CONFIG])
        update, weight = self.updates[node]
        state = ctx.state.config_records[STATE]
        params = SecAggParams.from_record(state)
        ddp = None if self.cfg is None else DistributedDP.for_config(
            self.cfg, params.threshold, len(state["participants"]),
            vector_length(msg.content[p.ARRAYS]) - 1)
        self.encoded[node] = encode(update, msg.content[p.ARRAYS], weight, params, ddp)
        masked = site.mask(ctx, self.encoded[node])
        self.sent_masked[node] = masked
        return Message(RecordDict({
            p.MASKED: ArrayRecord({p.MASKED_VECTOR: Array(masked)}),
            p.METRICS: MetricRecord({p.NUM_EXAMPLES: weight, p.TRAIN_SECONDS: 1.0}),
            p.SITE: ConfigRecord({"name": f"site-{node}"})}), reply_to=msg)


class Sites:
    """Honest sites driven stage by stage by a test playing a (malicious) server: every
    call goes to the real site function with that site's own context and identity."""

    def __init__(self, nodes, params: SecAggParams, adapter: ArrayRecord,
                 config: ConfigRecord) -> None:
        self.nodes, self.params = sorted(nodes), params
        self.adapter, self.config = adapter, config
        self.contexts = {n: new_context(n) for n in self.nodes}
        self.ca = make_ca(days=1)  # (key, certificate) of the federation CA
        self.identities = make_identities(self.nodes, self.ca)

    def round_record(self, config: ConfigRecord | None = None, nodes=None) -> ConfigRecord:
        """The setup request an honest server would send (optionally for another config)."""
        context = RoundContext(run_id="run-1", server_round=1,
                               adapter=adapter_digest(self.adapter),
                               config=config_digest(config or self.config),
                               participants=tuple(sorted(nodes or self.nodes)))
        return ConfigRecord({**self.params.to_record(), **context.to_record()})

    def setup(self, node: int, request: ConfigRecord | None = None) -> ConfigRecord:
        return site.setup(self.contexts[node], node, request or self.round_record(),
                          self.identities[node])

    @staticmethod
    def key_list(keys: dict[int, ConfigRecord], peers) -> ConfigRecord:
        """A share_keys request listing ``keys[p]`` (a setup reply) for each peer."""
        peers = sorted(peers)
        return ConfigRecord({f: [keys[n][f] for n in peers]
                             for f in ("pk1", "pk2", "signature", "cert")} | {"nodes": peers})

    def share_keys(self, node: int, request: ConfigRecord) -> ConfigRecord:
        return site.share_keys(self.contexts[node], request, self.identities[node])

    def deliver(self, node: int, sealed: dict[int, ConfigRecord],
                config: ConfigRecord | None = None) -> None:
        """Stage 3's first half: the shares every other site sealed for ``node``."""
        src = sorted(s for s in sealed if node in list(sealed[s]["dst"]))
        boxes = [sealed[s]["sealed"][list(sealed[s]["dst"]).index(node)] for s in src]
        site.receive_shares(self.contexts[node], ConfigRecord({"src": src, "sealed": boxes}),
                            self.adapter, config or self.config)

    def mask(self, node: int, vector: np.ndarray) -> np.ndarray:
        return site.mask(self.contexts[node], vector)

    def consistency(self, node: int, survivors) -> ConfigRecord:
        return site.consistency(self.contexts[node],
                                ConfigRecord({"survivors": sorted(survivors)}),
                                self.identities[node])

    def unmask(self, node: int, survivors, signatures: dict[int, bytes], active,
               dead) -> ConfigRecord:
        signers = sorted(signatures)
        return site.unmask(self.contexts[node], ConfigRecord({
            "survivors": sorted(survivors), "signers": signers,
            "signatures": [signatures[s] for s in signers], "active": list(active),
            "dead": list(dead)}), self.identities[node])

    def honest_until_masked(self, vector_size: int = 16) -> dict[int, np.ndarray]:
        """Stages 1–3 run honestly for every site; returns the masked vectors."""
        keys = {n: self.setup(n) for n in self.nodes}
        request = self.key_list(keys, self.nodes)
        sealed = {n: self.share_keys(n, request) for n in self.nodes}
        masked = {}
        for n in self.nodes:
            self.deliver(n, sealed)
            masked[n] = self.mask(n, np.zeros(vector_size, dtype=np.uint32))
        return masked

    def secrets_kept(self, node: int) -> bool:
        """Whether the site still holds its round secrets (it has not answered stage 5)."""
        return site.STATE in self.contexts[node].state.config_records


class AppGrid:
    """The server's Grid over in-process ClientApps: every message goes through the real
    app (:data:`fedcpt.client.app.app`: its mods and the handler its type names) with the
    node's own Context, as a SuperNode would hand it over; ``replies`` keeps what came
    back, i.e. everything the server learned."""

    def __init__(self, node_configs: dict[int, dict]) -> None:
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=c, state=RecordDict(),
                                    run_config={}) for n, c in node_configs.items()}
        self.replies: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        out = [app(msg, self.contexts[msg.metadata.dst_node_id]) for msg in messages]
        self.replies += out
        return out

    def send(self, node: int, message_type: str, content: RecordDict) -> Message:
        """One message as the (possibly malicious) server builds it; the site's reply."""
        [reply] = self.send_and_receive([Message(content, dst_node_id=node,
                                                 message_type=message_type)])
        return reply


def simulated_sites(folder, names) -> dict[int, dict]:
    """Node id → node config of simulated sites ``partition-id`` 0…, each with its own
    SecAgg signing identity under one CA (as ``fedcpt certs`` writes them)."""
    files = write_federation_certs(folder, ["127.0.0.1"], list(names), days=2)
    return {100 + i: {"partition-id": i, "ca-cert": str(files.ca_cert),
                      "secagg-key": str(files.signing[name][0]),
                      "secagg-cert": str(files.signing[name][1])}
            for i, name in enumerate(names)}


def secagg_federation(grid, cfg: RunConfig) -> FederatedRun:
    """The run for ``site_evaluations`` / ``train_attempt`` over ``grid`` under SecAgg (no
    recorder, model or general text: the loop's other steps)."""
    return FederatedRun(grid=grid, cfg=cfg, protocol=SecAggPlus(SecAggFedAvg(cfg=cfg)),
                        recorder=None, model=ServerModel(None), general=None,
                        rng=random.Random(0),
                        config=ConfigRecord({p.RUN_CONFIG: cfg.to_json(), p.RUN_ID: "run-e"}))
