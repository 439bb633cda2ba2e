"""Preflight for a data site: everything its SuperNode will need, checked before it starts.

Each check raises :class:`~fedcpt.exceptions.ConfigError` (or ``DataError``) with one
sentence that names the file, key or address at fault; each success returns one line for
the site's IT person. The data check loads the site's text with the ClientApp's own code
(:func:`fedcpt.client.site.resolve_site` and :func:`~fedcpt.client.site.site_blocks`), so a
site that passes here trains the same blocks when the federation starts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import click
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.common.config import parse_config_args

from fedcpt.client.node_keys import (
    BUDGET_KEY,
    DATA_PATH_KEY,
    LEDGER_PATH_KEY,
    REQUIRE_DP_KEY,
    REQUIRE_SECAGG_KEY,
    SITE_NAME_KEY,
)
from fedcpt.client.site import policy_for, resolve_site, site_blocks
from fedcpt.config import RunConfig, SiteConfig
from fedcpt.exceptions import ConfigError
from fedcpt.privacy.data_drift import DataDriftRecord, drift_path
from fedcpt.privacy.expected_utility import expected_share_line
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.privacy.policy import (
    NODE_KEYS,
    POLICY_FILE_KEY,
    SitePolicy,
    check_inputs,
    site_policy,
)
from fedcpt.privacy.secagg.identity import (
    CA_CERT_KEY,
    SIGNING_CERT_KEY,
    SIGNING_KEY_KEY,
    identity_for,
)

log = logging.getLogger(__name__)

KNOWN_KEYS = (SITE_NAME_KEY, DATA_PATH_KEY, REQUIRE_SECAGG_KEY, POLICY_FILE_KEY,
              *(k for k in NODE_KEYS if k not in (BUDGET_KEY, REQUIRE_DP_KEY, LEDGER_PATH_KEY)),
              LEDGER_PATH_KEY, BUDGET_KEY, REQUIRE_DP_KEY,
              CA_CERT_KEY, SIGNING_KEY_KEY, SIGNING_CERT_KEY)
# Curves Flower accepts for SuperNode authentication keys (NIST curves).
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
BOOLEAN = {"true": True, "1": True, "false": False, "0": False}


@dataclass(frozen=True)
class Endpoint:
    """A SuperLink address split into host and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_node_config(text: str) -> dict:
    """``--node-config`` text parsed exactly as ``flower-supernode`` parses it."""
    try:
        return dict(parse_config_args([text]))
    except click.ClickException as err:
        raise ConfigError(f"--node-config {text!r} is not valid: {err.message}") from None
    except (ValueError, OSError) as err:
        raise ConfigError(f"--node-config {text!r} is not valid: {err}") from None


def check_node_config(node_config: dict) -> list[str]:
    """Keys and values of a site's node config (not its data): names, budget, DP policy."""
    unknown = sorted(set(node_config) - set(KNOWN_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], KNOWN_KEYS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise ConfigError(f"unknown node-config key(s) {unknown}{hint}; a site sets "
                          f"{list(KNOWN_KEYS)}")
    for key in (SITE_NAME_KEY, DATA_PATH_KEY):
        if not str(node_config.get(key, "")).strip():
            raise ConfigError(f"node-config needs `{key}`")
    lines = [f"site name: {node_config[SITE_NAME_KEY]}"]
    if BUDGET_KEY in node_config:
        budget = node_config[BUDGET_KEY]
        if isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0:
            raise ConfigError(f"node-config `{BUDGET_KEY}` must be a positive number "
                              f"(e.g. {BUDGET_KEY}=8.0); got {budget!r}")
        lines.append(f"privacy budget: ε ≤ {float(budget):g}")
    for key, what in ((REQUIRE_DP_KEY, "require DP-SGD"),
                      (REQUIRE_SECAGG_KEY, "require secure aggregation")):
        if key in node_config:
            flag = str(node_config[key]).lower()
            if flag not in BOOLEAN:
                raise ConfigError(f"node-config `{key}` must be true or false; got "
                                  f"{node_config[key]!r}")
            lines.append(f"{what}: {'yes' if BOOLEAN[flag] else 'no'}")
    if any(k in node_config for k in (CA_CERT_KEY, SIGNING_KEY_KEY, SIGNING_CERT_KEY)):
        lines.append(f"secure aggregation identity: {identity_for(node_config).name}")
    return lines + node_policy(node_config).lines()


def node_policy(node_config: dict) -> SitePolicy:
    """The privacy policy a deployed site's node config (and policy file) puts in force."""
    site = SiteConfig(name=str(node_config.get(SITE_NAME_KEY, "site")),
                      data=(str(node_config.get(DATA_PATH_KEY, "-")),))
    return site_policy(None, site, node_config, deployed=True)


def check_run_inputs(cfg: RunConfig, node_config: dict) -> list[str]:
    """The scenario's data and model inputs against the site's policy (the refusal a
    federation running it would get), and who set each: the server, among the values the
    site allows, or tightened below the site's cap."""
    return check_inputs(node_policy(node_config), cfg.data, cfg.model).lines()


def check_data(cfg: RunConfig, node_config: dict) -> list[str]:
    """Load and count the site's blocks with the ClientApp's own code; then the share of
    DP-off adaptation the site can expect at its unit count and ε budget (the run's, when
    it proposes a smaller one), from the measured table of
    :mod:`fedcpt.privacy.expected_utility`."""
    site = resolve_site(cfg, node_config)
    policy = policy_for(cfg, site, node_config)
    blocks = site_blocks(site, cfg.model, cfg.data, policy)
    delta = policy.delta_for(blocks.units)  # refuses δ ≥ 1/N, and N below public-units
    line = (f"data: {len(blocks.train)} training + {len(blocks.heldout)} held-out blocks of "
            f"{cfg.data.block_size} tokens from {blocks.documents} documents, in "
            f"{blocks.units} training + {blocks.heldout_unit_count} held-out privacy units "
            f"({blocks.unit}); δ = {delta:.3g}")
    if policy.public_units:
        line += "; " + check_public_units(cfg, site, policy)
    if policy.eval_release != "nothing" and blocks.heldout_unit_count < policy.eval_min_units:
        log.warning("site %s will refuse every evaluation: %d held-out units, fewer than "
                    "its eval-min-units %d", site.name, blocks.heldout_unit_count,
                    policy.eval_min_units)
        line += (f"; evaluation will be refused ({blocks.heldout_unit_count} held-out units "
                 f"< eval-min-units {policy.eval_min_units})")
    budget = (min(policy.epsilon_budget, cfg.privacy.target_epsilon) if cfg.privacy.enabled
              else policy.epsilon_budget)
    # under public-units σ is planned as for a site of public-units units: that is the N
    # whose noise, and so whose utility, the site gets
    planned = policy.public_units or blocks.units
    return [line, "DP utility: " + expected_share_line(planned, budget)
            + (f" (σ planned at public-units {planned:,})" if policy.public_units else "")]


def check_public_units(cfg: RunConfig, site: SiteConfig, policy: SitePolicy) -> str:
    """``public-units`` against the site's data: at most its N at every block size the
    server may choose (each changes N), for the scenario's text field; else a site would
    refuse some rounds and not others, and which ones would tell the server about N."""
    counts = {}
    for size in policy.block_sizes:
        data = dataclasses.replace(cfg.data, block_size=size)
        counts[size] = site_blocks(site, cfg.model, data, policy).units
        policy.delta_for(counts[size])  # N ≥ public-units, and the public δ no looser
    fewest = min(counts, key=counts.__getitem__)
    return (f"public-units {policy.public_units} ≤ N at every allowed block size (fewest: "
            f"{counts[fewest]} units at {fewest} tokens, text field "
            f"{cfg.data.text_field!r}): σ and budget refusals are planned from public values")


def check_ledger(node_config: dict) -> str:
    """An existing ledger must be this site's and intact; a new one must be creatable; an
    existing data-drift record beside it must be this site's and intact."""
    policy = node_policy(node_config)
    line = _check_ledger(policy)
    if policy.ledger_path:
        path = drift_path(Path(policy.ledger_path).expanduser())
        if path.exists():
            runs = DataDriftRecord.open(path, policy.site).runs
            line += f"; data-drift record: {path} ({len(runs)} run{'s' * (len(runs) != 1)})"
    return line


def _check_ledger(policy: SitePolicy) -> str:
    if not policy.ledger_path:
        if policy.require_dp:
            raise ConfigError(f"node-config sets `{REQUIRE_DP_KEY}=true` but no "
                              f"`{LEDGER_PATH_KEY}`: a DP site keeps its own ledger (one the "
                              "server placed could be reset by the server)")
        return "privacy ledger: none set (needed only when the run uses DP-SGD)"
    path = Path(policy.ledger_path).expanduser()
    site = policy.site
    if path.exists():
        ledger = PrivacyLedger.load(path)
        if ledger.site != site:
            raise ConfigError(f"{path} is the ledger of site {ledger.site!r}, not {site!r}")
        if ledger.unit != policy.unit:
            raise ConfigError(f"{path} holds a history for privacy unit {ledger.unit!r}, but "
                              f"the site's unit is {policy.unit!r}: give it its own "
                              f"`{LEDGER_PATH_KEY}`")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"privacy ledger {path} is not writable")
        return f"privacy ledger: {path} (ε spent {ledger.epsilon():.3f}, {ledger.steps} steps)"
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"privacy ledger folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"privacy ledger folder {parent} is not writable")
    return f"privacy ledger: {path} (new; created at the first DP round)"


def _read(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found")
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from None


def check_root_certificates(path: Path, now: dt.datetime | None = None) -> str:
    """The federation's CA certificate(s): PEM, currently valid, and a CA."""
    data = _read(path, "root certificate")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"root certificate {path} is not a PEM certificate "
                          f"(expected '-----BEGIN CERTIFICATE-----')") from None
    now = now or dt.datetime.now(dt.UTC)
    for cert in certs:
        subject = cert.subject.rfc4514_string()
        if now < cert.not_valid_before_utc:
            raise ConfigError(f"root certificate {path} ({subject}) is not valid before "
                              f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if now > cert.not_valid_after_utc:
            raise ConfigError(f"root certificate {path} ({subject}) expired on "
                              f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; ask the "
                              f"federation operator for a new one")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ConfigError(f"{path} ({subject}) is not a CA certificate: "
                              f"--root-certificates takes the federation's ca.crt, not the "
                              f"SuperLink's own certificate")
    expiry = min(c.not_valid_after_utc for c in certs)
    return f"root certificate: {path} ({len(certs)} CA, valid until {expiry:%Y-%m-%d})"


def check_auth_key(path: Path) -> str:
    """The SuperNode's authentication key: an unencrypted OpenSSH EC key on a NIST curve,
    as ``flower-supernode --auth-supernode-private-key`` loads it."""
    data = _read(path, "authentication key")
    mode = path.stat().st_mode & 0o077
    if mode:
        log.warning("authentication key %s is readable by other users (mode %o); "
                    "chmod 600 it", path, path.stat().st_mode & 0o777)
    try:
        key = load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        hint = (" (it is a PEM key; SuperNodes need the OpenSSH format that `fedcpt certs` "
                "writes)" if b"-----BEGIN" in data and b"OPENSSH" not in data else "")
        raise ConfigError(f"authentication key {path} is not an unencrypted OpenSSH private "
                          f"key: {err}{hint}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve,
                                                                       NIST_CURVES):
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePrivateKey) else \
            type(key).__name__.removeprefix("_").replace("PrivateKey", "")
        raise ConfigError(f"authentication key {path} is of type {kind}; Flower needs an EC "
                          f"key on a NIST curve (P-256, P-384 or P-521)")
    return f"authentication key: {path} (EC {key.curve.name})"


def parse_endpoint(address: str) -> Endpoint:
    """``host:port`` or ``[v6]:port``."""
    text = address.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"SuperLink address {address!r} must be host:port "
                          f"(e.g. superlink.example.org:9092)")
    return Endpoint(host, int(port))


def check_superlink(address: str, root_certificates: Path | None,
                    timeout: float = 5.0) -> str:
    """Connect to the SuperLink; with the CA, also complete a TLS handshake that verifies
    its certificate (issuer, validity and the address's name) as the SuperNode will."""
    endpoint = parse_endpoint(address)
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ConfigError(f"SuperLink {endpoint} does not answer ({reason}); check the "
                          f"address, the SuperLink, and firewalls between them") from None
    with sock:
        if root_certificates is None:
            return f"SuperLink: {endpoint} answers (TLS not checked: no root certificate)"
        try:
            context = ssl.create_default_context(cafile=str(root_certificates))
            with context.wrap_socket(sock, server_hostname=endpoint.host) as tls:
                version = tls.version()
        except ssl.SSLCertVerificationError as err:
            raise ConfigError(f"SuperLink {endpoint} presents a certificate that "
                              f"{root_certificates} does not accept: {err.verify_message}; "
                              f"ask the operator for the federation's ca.crt or a "
                              f"certificate issued for {endpoint.host}") from None
        except (ssl.SSLError, OSError) as err:
            raise ConfigError(f"TLS handshake with SuperLink {endpoint} failed: "
                              f"{getattr(err, 'reason', None) or err}") from None
    return f"SuperLink: {endpoint} answers, TLS certificate verified ({version})"


WARNING = "warning: "
"""Starts a line that does not stop the site but needs its admin's attention."""
TELEMETRY_ENV = "FLWR_TELEMETRY_ENABLED"


def check_telemetry(environ: dict[str, str] | None = None) -> str:
    """Whether Flower's processes here would post to telemetry.flower.ai: each SuperNode,
    SuperExec and ClientApp process sends this machine's platform (OS, release, Python,
    CPU count) and its run events unless ``FLWR_TELEMETRY_ENABLED`` is set to anything but
    ``1`` (``flwr/supercore/telemetry.py``). Not the site's data, but a message leaving the
    site that its board did not sign for: the line says how to turn it off."""
    value = (os.environ if environ is None else environ).get(TELEMETRY_ENV, "1")
    if value != "1":
        return f"Flower telemetry: off ({TELEMETRY_ENV}={value})"
    return (f"{WARNING}Flower telemetry: on: Flower's processes would post this machine's "
            f"platform and their run events to telemetry.flower.ai; set {TELEMETRY_ENV}=0 "
            "where flower-supernode runs")


def run_site_check(cfg: RunConfig, node_config_text: str, *, superlink: str | None = None,
                   root_certificates: Path | None = None, auth_key: Path | None = None,
                   timeout: float = 5.0) -> list[str]:
    """Every check a site can run before starting its SuperNode, in the order a problem
    is easiest to fix; raises at the first problem, else returns one line per check."""
    node_config = parse_node_config(node_config_text)
    lines = check_node_config(node_config)
    lines.extend(check_run_inputs(cfg, node_config))
    lines.extend(check_data(cfg, node_config))
    lines.append(check_ledger(node_config))
    lines.append(check_telemetry())
    if root_certificates is not None:
        lines.append(check_root_certificates(root_certificates))
    if auth_key is not None:
        lines.append(check_auth_key(auth_key))
    if superlink is not None:
        lines.append(check_superlink(superlink, root_certificates, timeout))
    return lines
