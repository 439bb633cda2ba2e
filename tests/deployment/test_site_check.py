"""``fedcpt site check``: each bad input a site can have gives one clear error."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from local_federation import free_port

from fedcpt.config import load_config
from fedcpt.deploy.certs import FederationFiles, write_federation_certs
from fedcpt.deploy.site_check import (
    TELEMETRY_ENV,
    WARNING,
    check_auth_key,
    check_data,
    check_ledger,
    check_node_config,
    check_root_certificates,
    check_run_inputs,
    check_superlink,
    check_telemetry,
    parse_endpoint,
    parse_node_config,
    run_site_check,
)
from fedcpt.exceptions import ConfigError, DataError
from fedcpt.privacy.data_drift import DataDriftError, DataDriftRecord, RunEntry
from fedcpt.privacy.ledger import LedgerError, PrivacyLedger
from fedcpt.privacy.policy import PolicyRefused


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> FederationFiles:
    return write_federation_certs(tmp_path_factory.mktemp("certs"), ["127.0.0.1"], ["clinic"])


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory) -> FederationFiles:
    """Another federation's files: a different CA."""
    return write_federation_certs(tmp_path_factory.mktemp("other"), ["127.0.0.1"], ["x"])


@pytest.fixture(scope="module")
def smoke(sites_config: Path):
    return load_config(scenario="smoke", config_file=sites_config)


@contextmanager
def tls_server(cert: Path, key: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """A TLS listener on ``host`` presenting ``cert``; yields its address."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server((host, 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client rejected our certificate: what the test provokes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"{host}:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


# --- node config ----------------------------------------------------------------------

def test_node_config_parsed_as_flower_does() -> None:
    config = parse_node_config('site-name="clinic" data-path="/d" epsilon-budget=8.0 '
                               "require-dp=true require-secagg=false")
    assert config == {"site-name": "clinic", "data-path": "/d", "epsilon-budget": 8.0,
                      "require-dp": True, "require-secagg": False}
    lines = check_node_config(config)
    assert lines[:4] == ["site name: clinic", "privacy budget: ε ≤ 8", "require DP-SGD: yes",
                         "require secure aggregation: no"]
    # the policy in force, and who set each value
    assert "policy epsilon_budget: 8.0 [site node config]" in lines
    assert "policy unit: document [site default]" in lines
    assert "policy eval_release: nothing [site default (require-dp: nothing un-noised)]" in lines


def test_site_check_prints_what_the_site_reads_and_opens_and_who_chose_it() -> None:
    config = parse_node_config('site-name="clinic" data-path="/d" text-fields="body,text" '
                               'allowed-models="tiny-llama,/models/x" train-share=0.5')
    lines = check_node_config(config)
    assert "policy text_fields: body, text [site node config]" in lines
    assert "policy models: tiny-llama, /models/x [site node config]" in lines
    assert "policy block_sizes: 64, 128, 256, 512 [site default]" in lines
    assert "policy train_share: 0.5 [site node config]" in lines
    run = check_run_inputs(load_config("smoke", overrides=["data.train_share=0.25",
                                                           "data.text_field=body"]), config)
    assert run == ["run data.text_field: body [server, among the site's text_fields]",
                   "run data.block_size: 64 [server, among the site's block_sizes]",
                   "run model: tiny-llama [server, among the site's models]",
                   "run train_share: 0.25 [server, tightened]"]
    assert check_run_inputs(load_config("smoke"), config)[-1] == (
        "run train_share: 0.5 [site node config]")
    with pytest.raises(PolicyRefused, match=r"refuses `model.name` = 'smollm2-135m-instruct'"):
        check_run_inputs(load_config("shakespeare"), config)


def test_require_dp_without_a_ledger_path_is_refused() -> None:
    with pytest.raises(ConfigError, match="`require-dp=true` but no `ledger-path`"):
        check_ledger({"site-name": "clinic", "data-path": "/d", "require-dp": True})


@pytest.mark.parametrize(("text", "match"), [
    ('site-name="a" data-path="/d" data-pth="/e"',
     r"unknown node-config key\(s\) \['data-pth'\] \(did you mean `data-path`\?\)"),
    ('site-name="a"', "needs `data-path`"),
    ('data-path="/d"', "needs `site-name`"),
    ('site-name="a" data-path="/d" epsilon-budget=-1', "positive number"),
    ('site-name="a" data-path="/d" epsilon-budget="lots"', "positive number"),
    ('site-name="a" data-path="/d" require-dp="maybe"', "`require-dp` must be true or false"),
    ('site-name="a" data-path="/d" require-secagg=2', "`require-secagg` must be true or"),
])
def test_bad_node_config(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_node_config(parse_node_config(text))


def test_unparseable_node_config() -> None:
    with pytest.raises(ConfigError, match="is not valid"):
        parse_node_config('site-name="unterminated data-path=x=y')


# --- data and ledger ------------------------------------------------------------------

def test_data_counted_with_the_client_code(smoke, write_text) -> None:
    path = write_text("clinic/notes.txt", 40_000)
    line, utility = check_data(smoke, {"site-name": "clinic", "data-path": str(path.parent),
                                       "privacy-unit": "passage", "epsilon-budget": 4.0})
    assert line.startswith("data: ") and "training" in line and "held-out" in line
    units = int(re.search(r"in (\d+) training \+ \d+ held-out privacy units", line)[1])
    assert utility.startswith(f"DP utility: expected share of DP-off adaptation at ε=4 for "
                              f"N={units:,} units: outside the measured range (N ")


def test_public_units_checked_against_the_data_at_every_allowed_block_size(
        smoke, write_text) -> None:
    path = write_text("clinic/notes.txt", 40_000)
    site = {"site-name": "clinic", "data-path": str(path.parent), "privacy-unit": "passage",
            "block-sizes": "64,512"}
    line, utility = check_data(smoke, {**site, "public-units": 2})
    assert "public-units 2 ≤ N at every allowed block size (fewest: 21 units at" in line
    # σ is planned as for a site of 2 units, so that is the N its expected utility is for
    assert "for N=2 units" in utility and "(σ planned at public-units 2)" in utility
    with pytest.raises(ConfigError, match="fewer than its public-units 100000"):
        check_data(smoke, {**site, "public-units": 100_000})


def test_missing_data_path(smoke, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"data path not found: {tmp_path / 'gone.txt'}"):
        check_data(smoke, {"site-name": "clinic", "data-path": str(tmp_path / "gone.txt")})


def test_too_little_data(smoke, write_text) -> None:
    path = write_text("tiny.txt", 600)
    with pytest.raises(DataError, match="site 'clinic': too little text"):
        check_data(smoke, {"site-name": "clinic", "data-path": str(path)})


def test_ledger_checks(tmp_path: Path) -> None:
    new = {"site-name": "clinic", "ledger-path": str(tmp_path / "clinic.ledger.json")}
    assert "new; created at the first DP round" in check_ledger(new)
    with pytest.raises(ConfigError, match="folder .*missing does not exist"):
        check_ledger({"site-name": "clinic",
                      "ledger-path": str(tmp_path / "missing" / "l.json")})
    ledger = PrivacyLedger.open(tmp_path / "lab.ledger.json", "lab", delta=1e-5,
                                target_epsilon=8.0, accountant="prv", site_sets_budget=True)
    ledger.save()
    with pytest.raises(ConfigError, match="ledger of site 'lab', not 'clinic'"):
        check_ledger({"site-name": "clinic", "ledger-path": str(ledger.path)})
    assert "ε spent 0.000" in check_ledger({"site-name": "lab",
                                            "ledger-path": str(ledger.path)})
    ledger.path.write_text(ledger.path.read_text().replace("lab", "lbb"))
    with pytest.raises(LedgerError, match="checksum mismatch|not a valid"):
        check_ledger({"site-name": "lab", "ledger-path": str(ledger.path)})


def test_a_sites_data_drift_record_is_checked(tmp_path: Path) -> None:
    config = {"site-name": "clinic", "ledger-path": str(tmp_path / "clinic.ledger.json")}
    record = DataDriftRecord(tmp_path / "clinic.data-drift.json", "clinic")
    record.record_run(RunEntry("run-1", "model", "plain 8x64", "data", 5.5, 504))
    assert "data-drift record: " in check_ledger(config) and "(1 run)" in check_ledger(config)
    record.path.write_text(record.path.read_text()[:40])
    with pytest.raises(DataDriftError, match="clinic.data-drift.json is not a valid"):
        check_ledger(config)


# --- certificates and keys ------------------------------------------------------------

def test_root_certificate_ok(certs) -> None:
    assert check_root_certificates(certs.ca_cert).startswith(f"root certificate: "
                                                             f"{certs.ca_cert} (1 CA")


def test_root_certificate_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"root certificate {tmp_path / 'ca.crt'} not found"):
        check_root_certificates(tmp_path / "ca.crt")


def test_root_certificate_garbage(tmp_path: Path) -> None:
    path = tmp_path / "ca.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="is not a PEM certificate"):
        check_root_certificates(path)


def test_root_certificate_expired(certs) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    with pytest.raises(ConfigError, match="expired on .* ask the federation operator"):
        check_root_certificates(certs.ca_cert, now=later)


def test_server_certificate_given_as_root(certs) -> None:
    with pytest.raises(ConfigError, match="is not a CA certificate"):
        check_root_certificates(certs.server_cert)


def test_auth_key_ok(certs) -> None:
    assert check_auth_key(certs.site_keys["clinic"][0]).endswith("(EC secp384r1)")


def test_auth_key_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="authentication key .* not found"):
        check_auth_key(tmp_path / "clinic.key")


def test_auth_key_garbage(tmp_path: Path) -> None:
    path = tmp_path / "clinic.key"
    path.write_text("hello")
    with pytest.raises(ConfigError, match="is not an unencrypted OpenSSH private key"):
        check_auth_key(path)


def test_auth_key_in_pem_format(tmp_path: Path) -> None:
    path = tmp_path / "clinic.key"
    path.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="it is a PEM key; SuperNodes need the OpenSSH"):
        check_auth_key(path)


@pytest.mark.parametrize(("key", "kind"), [
    (ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
    (rsa.generate_private_key(65537, 2048), "RSA"),
])
def test_auth_key_of_wrong_type(tmp_path: Path, key, kind: str) -> None:
    path = tmp_path / "clinic.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    with pytest.raises(ConfigError, match=f"is of type {kind}; Flower needs an EC key"):
        check_auth_key(path)


def test_a_certificate_is_not_an_auth_key(certs) -> None:
    with pytest.raises(ConfigError, match="not an unencrypted OpenSSH private key"):
        check_auth_key(certs.ca_cert)


# --- SuperLink address ----------------------------------------------------------------

@pytest.mark.parametrize("address", ["superlink", "superlink:port", "host:70000", ":9092"])
def test_bad_address(address: str) -> None:
    with pytest.raises(ConfigError, match="must be host:port"):
        parse_endpoint(address)


def test_unreachable_superlink(certs) -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=f"SuperLink {address} does not answer"):
        check_superlink(address, certs.ca_cert, timeout=2)


def test_superlink_certificate_verified(certs) -> None:
    with tls_server(certs.server_cert, certs.server_key) as address:
        assert "TLS certificate verified" in check_superlink(address, certs.ca_cert)


def test_superlink_certificate_not_signed_by_the_ca(certs, other_certs) -> None:
    with tls_server(other_certs.server_cert, other_certs.server_key) as address, \
            pytest.raises(ConfigError, match=f"SuperLink {address} presents a certificate "
                                             f"that .*ca.crt does not accept"):
        check_superlink(address, certs.ca_cert)


def test_superlink_certificate_for_another_name(certs) -> None:
    # The certificate names 127.0.0.1 and localhost; this SuperLink answers on 127.0.0.2.
    with tls_server(certs.server_cert, certs.server_key, host="127.0.0.2") as address, \
            pytest.raises(ConfigError, match="does not accept: IP address mismatch"):
        check_superlink(address, certs.ca_cert)


# --- everything, as the CLI runs it ---------------------------------------------------

def test_run_site_check_stops_at_the_first_problem(smoke, sites_config, certs) -> None:
    data = str(sites_config.parent / "north.txt")
    lines = run_site_check(smoke, f'site-name="north" data-path="{data}" '
                           'privacy-unit="passage"', root_certificates=certs.ca_cert,
                           auth_key=certs.site_keys["clinic"][0])
    assert [line.removeprefix(WARNING).split(":")[0] for line in lines
            if not line.startswith("policy ")] == [
        "site name", "run data.text_field", "run data.block_size", "run model",
        "run train_share", "data", "DP utility", "privacy ledger", "Flower telemetry",
        "root certificate", "authentication key"]
    assert "policy unit: passage [site node config]" in lines
    with pytest.raises(ConfigError, match="does not answer"):
        run_site_check(smoke, f'site-name="north" data-path="{data}" privacy-unit="passage"',
                       superlink=f"127.0.0.1:{free_port()}", timeout=1)


def test_cli_error_line(sites_config: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedcpt.cli", "site", "check", "--scenario", "smoke",
         "--config", str(sites_config),
         "--node-config", f'site-name="north" data-path="{tmp_path / "nothing"}"'],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: data path not found: {tmp_path / 'nothing'}")


# What Flower's telemetry would post, made as Flower makes it, with the network call replaced
# by an exit: status 3 means a post would have left the machine.
TELEMETRY_PROBE = ("import sys, urllib.request\n"
                   "urllib.request.urlopen = lambda *a, **k: sys.exit(3)\n"
                   "from flwr.supercore import telemetry\n"
                   "telemetry.create_event(telemetry.EventType.RUN_SUPERNODE_ENTER, {})\n")


@pytest.mark.parametrize("value", [None, "1", "0", "false"])
def test_the_telemetry_line_says_whether_flower_would_post(value: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != TELEMETRY_ENV}
    if value is not None:
        env[TELEMETRY_ENV] = value
    line = check_telemetry(env)
    probe = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE], env=env,
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode in (0, 3), probe.stderr
    assert line.startswith(f"{WARNING}Flower telemetry: on") == (probe.returncode == 3), line
    if probe.returncode == 3:
        assert f"set {TELEMETRY_ENV}=0 where flower-supernode runs" in line
