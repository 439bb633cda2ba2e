"""The import layering docs/architecture.md shows ("## Layers") holds in the code: a package
imports only packages of lower layers, never one beside it or above it (so ``client`` never
imports ``server``). Every import counts, a function's lazy one and a type checker's too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
NOT_PACKAGES = {"tests", "docs"}


def _unit(path: str) -> str:
    """The layer unit of a repository path: its top folder, or a top-level module's name
    (the ``cli*.py`` modules are one unit, the command line)."""
    top = path.split("/", 1)[0].removesuffix(".py")
    return "cli" if top == "cli" or top.startswith("cli_") else top


def documented_layers() -> dict[str, int]:
    """Unit → layer number, from the table under "## Layers" in docs/architecture.md."""
    section = DOC.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for name in re.findall(r"`([\w/.]+)`", cells[1]):
                layers[_unit(name)] = int(cells[0])
    return layers


LAYERS = documented_layers()


def allowed(importer: str, imported: str) -> bool:
    return importer == imported or LAYERS[imported] < LAYERS[importer]


def package_imports() -> list[tuple[str, str, str]]:
    """(file, importing unit, imported unit) for every import of another fedcpt unit."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(".") or _unit(rel) in NOT_PACKAGES or rel == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{rel}: relative import; spell fedcpt.… in full")
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "fedcpt" and len(parts) > 1:
                    found.append((rel, _unit(rel), _unit(parts[1])))
    return found


def test_every_package_has_a_documented_layer():
    units = {_unit(p.relative_to(ROOT).as_posix()) for p in ROOT.glob("*")
             if not p.name.startswith(".") and p.name != "__init__.py"
             and ((p.is_dir() and any(p.glob("*.py"))) or p.suffix == ".py")}
    assert units - NOT_PACKAGES - set(LAYERS) == set(), "add them to docs/architecture.md"
    assert set(LAYERS) - units == set(), "the layer table names what no longer exists"


def test_the_rule_forbids_what_the_layers_forbid():
    assert not allowed("client", "server")  # a site's code never imports the server's
    assert not allowed("client", "strategies") and not allowed("strategies", "client")
    assert not allowed("core", "privacy") and allowed("privacy", "core")
    assert allowed("server", "runfolder") and allowed("client", "runfolder")
    assert not allowed("server", "tools") and not allowed("tools", "server")  # apart
    assert allowed("cli", "tools")


def test_imports_go_down_the_layers_only():
    imports = package_imports()
    assert len({(a, b) for _, a, b in imports if a != b}) > 20  # the scan sees the graph
    wrong = [f"{file} ({importer}, layer {LAYERS[importer]}) imports {imported} (layer "
             f"{LAYERS[imported]})" for file, importer, imported in imports
             if not allowed(importer, imported)]
    assert wrong == [], "move what both need to a lower layer:\n" + "\n".join(wrong)
