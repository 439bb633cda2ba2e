"""Every third-party package the shipped code imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(project: dict) -> set[str]:
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_canonical(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in requirements}


def _shipped_files(packages: list[str]) -> list[Path]:
    """The .py files of the packages pyproject ships (``fedcpt`` is the root's own)."""
    files: list[Path] = []
    for package in packages:
        folder = ROOT.joinpath(*package.split(".")[1:])
        files += sorted(folder.glob("*.py"))
    return files


def _imports(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return {t for t in tops if t not in sys.stdlib_module_names and t != "fedcpt"}


def test_every_imported_package_is_declared():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = _declared(pyproject["project"])
    distributions = importlib.metadata.packages_distributions()
    files = _shipped_files(pyproject["tool"]["setuptools"]["packages"])
    assert len(files) > 20  # the scan found the package
    undeclared = {}
    for path in files:
        for module in _imports(path):
            names = {_canonical(d) for d in distributions.get(module, [module])}
            if not names & declared:
                undeclared.setdefault(module, str(path.relative_to(ROOT)))
    assert undeclared == {}


def test_every_package_folder_is_shipped():
    # a folder missing from the list is absent from a built wheel, and its imports fail there
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = set(pyproject["tool"]["setuptools"]["packages"])
    folders = {".".join(("fedcpt", *p.parent.relative_to(ROOT).parts))
               for p in ROOT.rglob("__init__.py")
               if not {"tests", ".venv", "runs"} & set(p.relative_to(ROOT).parts)}
    assert sorted(folders - shipped) == []
