"""The configuration reference (``docs/configuration.md``), generated from the fields'
``help`` metadata so that it cannot drift from the code::

    python -m fedcpt.config.reference > docs/configuration.md

``tests/test_config.py`` fails when the committed file differs from this output.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import typing
from typing import Any, Literal

from fedcpt.config.schema import RunConfig

HEADER = """\
<!-- Generated from the `help` metadata in config/schema.py by
     `python -m fedcpt.config.reference > docs/configuration.md`; do not edit by hand. -->
# Configuration reference

A run is one `RunConfig` (frozen dataclasses in [`config/schema.py`](../config/schema.py)).
Scenarios in [`simulations/`](../simulations) are TOML files of the same keys
(`extends = "other"` starts from another scenario); `--config FILE` is merged over the
scenario and `--set section.key=value` over both. Unknown keys are rejected with the
closest valid name; invalid values are rejected with the key, what it must be and what was
given, before any work starts.
"""


def type_name(tp: Any) -> str:
    """A field's type as a reader of TOML would write it."""
    if typing.get_origin(tp) is Literal:
        return " \\| ".join(f'`"{v}"`' for v in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return tp.__name__


def default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING:
        return "required"
    value = list(f.default) if isinstance(f.default, tuple) else f.default
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _table(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) or _table_list(hints[f.name]):
            continue  # a section of its own
        meaning = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {type_name(hints[f.name])} | {default_text(f)} "
                    f"| {meaning} |")
    return rows


def _table_list(tp: Any) -> type | None:
    """The dataclass of a ``[[table]]`` list field (``sites``, ``phases``), if it is one."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _section(title: str, cls: type, prefix: str) -> list[str]:
    return ["", f"## {title}", "", " ".join(inspect.cleandoc(cls.__doc__ or "").split()),
            "", *_table(cls, prefix)]


def reference_markdown() -> str:
    """The whole reference: top-level keys, then each section in RunConfig's order."""
    lines = [HEADER.rstrip("\n"), *_section("Run", RunConfig, "")]
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += _section(f"`[{f.name}]`", tp, f"{f.name}.")
            for sub in dataclasses.fields(tp):  # its [[tables]], e.g. [[data.general_eval]]
                if (item := _table_list(typing.get_type_hints(tp)[sub.name])) is not None:
                    lines += _section(f"`[[{f.name}.{sub.name}]]`", item, "")
        elif (item := _table_list(tp)) is not None:
            lines += _section(f"`[[{f.name}]]`", item, "")
            item_hints = typing.get_type_hints(item)
            for g in dataclasses.fields(item):  # a table inside each entry: [sites.policy]
                if dataclasses.is_dataclass(item_hints[g.name]):
                    lines += _section(f"`[{f.name}.{g.name}]`", item_hints[g.name],
                                      f"{g.name}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
