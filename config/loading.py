"""Loading a run's configuration: built-in scenarios (``extends`` chains), ``--config``
TOML files and ``--set section.key=value`` overrides, merged in that order."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from fedcpt.config.build import build
from fedcpt.config.schema import RunConfig
from fedcpt.exceptions import ConfigError

SCENARIO_DIR = Path(__file__).parent.parent / "simulations"


def scenario_names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`])")


def scenario_summary(name: str) -> str:
    """The first sentence of a built-in scenario's opening comment (whole, however many
    lines it spans)."""
    comment = []
    for line in (SCENARIO_DIR / f"{name}.toml").read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    return _SENTENCE_END.split(" ".join(comment), maxsplit=1)[0]


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def read_scenario(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A scenario's settings; ``extends = "other"`` starts from another scenario."""
    path = SCENARIO_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown scenario {name!r}; available: {', '.join(scenario_names())}")
    if name in seen:
        raise ConfigError(f"scenario {name!r} extends itself ({' -> '.join(seen + (name,))})")
    raw = read_toml(path)
    parent = raw.pop("extends", None)
    return _merge(read_scenario(parent, seen + (name,)), raw) if parent else raw


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=0.002", "federation.rounds=2"]`` into a nested dict of strings."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} must look like section.key=value")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} conflicts with another override")
        node[parts[-1]] = value.strip()
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    scenario: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Resolve a scenario name and/or config file plus overrides into a validated RunConfig."""
    raw: dict[str, Any] = read_scenario(scenario) if scenario else {}
    if config_file:
        raw = _merge(raw, read_toml(Path(config_file)))
    if overrides:
        extra = parse_overrides(overrides)
        for key in ("sites", "phases"):
            if key in extra:
                raise ConfigError(f"`{key}` cannot be overridden with --set; use a config file")
        raw = _merge(raw, extra)
    for key in ("sites", "phases"):
        if key in raw and not isinstance(raw[key], list):
            raise ConfigError(f"`{key}` must be a list of [[{key}]] tables")
    return build(RunConfig, _rounds_from_phases(raw), prefix="")


def _rounds_from_phases(raw: dict[str, Any]) -> dict[str, Any]:
    """With [[phases]] and no ``federation.rounds``, the run has the phases' rounds."""
    phases = raw.get("phases")
    federation = raw.get("federation", {})
    if not phases or not isinstance(federation, dict) or "rounds" in federation:
        return raw
    rounds = [ph.get("rounds") for ph in phases if isinstance(ph, dict)]
    if len(rounds) != len(phases) or not all(isinstance(r, int) for r in rounds):
        return raw  # build() reports the malformed phase
    return _merge(raw, {"federation": {"rounds": sum(rounds)}})
