"""The round mechanisms' flags are read once: ``server/protocols/__init__.py:round_protocol``
chooses the run's protocol from the config, and the loop, the summary, the report and the
strategies ask that object (:class:`~fedcpt.server.protocols.base.RoundProtocol`) instead
of branching on a flag. Scanned with ``ast`` over every library file (all but ``tests/``,
``docs/`` and ``benchmarks/``): a read of ``….user_level``, of ``….secagg.enabled`` (or the
summary's ``secagg["enabled"]``) or an ``isinstance(…, SecAggFedAvg)`` outside the modules
below fails, each allowed for the reason beside it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
NOT_LIBRARY = ("tests", "docs", "benchmarks")

ALLOWED = {
    # the one factory: reads both flags to choose (and build) the run's protocol once
    "server/protocols/__init__.py": {"user_level", "secagg.enabled"},
    # the config's cross-section checks, where it loads, before any protocol exists
    "config/rules.py": {"user_level"},
    # distributed DP's own module: it applies only to site-level DP under SecAgg+
    "privacy/secagg/ddp.py": {"user_level", "secagg.enabled"},
    # the site's own check of the request: a site never trusts the server's choice
    "privacy/policy.py": {"user_level"},
    # the simulation provisions SecAgg+ signing identities only for runs that use it
    "simulations/runner.py": {"secagg.enabled"},
}


def _is_secagg(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "secagg" or (
        isinstance(node, ast.Name) and node.id == "secagg")


def flag_reads(source: str) -> set[str]:
    """The mechanism flags ``source`` reads."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "user_level":
            found.add("user_level")
        if isinstance(node, ast.Attribute) and node.attr == "enabled" and _is_secagg(
                node.value):
            found.add("secagg.enabled")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                node.func.attr == "get" and _is_secagg(node.func.value) and node.args
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "enabled"):
            found.add("secagg.enabled")
        if isinstance(node, ast.Subscript) and _is_secagg(node.value) and isinstance(
                node.slice, ast.Constant) and node.slice.value == "enabled":
            found.add("secagg.enabled")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and (
                node.func.id == "isinstance" and len(node.args) == 2
                and "SecAggFedAvg" in ast.unparse(node.args[1])):
            found.add("isinstance SecAggFedAvg")
    return found


def reads_by_file() -> dict[str, set[str]]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(".") or rel.split("/", 1)[0] in NOT_LIBRARY:
            continue
        if reads := flag_reads(path.read_text(encoding="utf-8")):
            out[rel] = reads
    return out


def test_the_scan_sees_each_kind_of_flag_read():
    assert flag_reads("if cfg.privacy.user_level: pass") == {"user_level"}
    assert flag_reads("x = cfg.secagg.enabled") == {"secagg.enabled"}
    assert flag_reads("x = s.secagg.get('enabled')") == {"secagg.enabled"}
    assert flag_reads("x = summary.secagg['enabled']") == {"secagg.enabled"}
    assert flag_reads("isinstance(agg, SecAggFedAvg)") == {"isinstance SecAggFedAvg"}
    assert flag_reads("isinstance(a, (AdapterFedAvg, m.SecAggFedAvg))") == {
        "isinstance SecAggFedAvg"}
    # a module named after the mechanism, and a docstring naming the flag, read nothing
    assert flag_reads('"""privacy.user_level"""\nfrom fedcpt.privacy import user_level') == set()


def test_mechanism_flags_are_read_only_in_the_modules_that_own_them():
    reads = reads_by_file()
    assert set(reads) >= set(ALLOWED)  # each still reads them: the scan works, none is stale
    wrong = {file: found - ALLOWED.get(file, set()) for file, found in reads.items()}
    assert {f: r for f, r in wrong.items() if r} == {}, (
        "ask the run's RoundProtocol (server/protocols) instead of reading its flag")
