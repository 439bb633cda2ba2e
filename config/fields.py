"""The one way a settings field is declared: a default plus the help text that
``docs/configuration.md`` prints (:mod:`fedcpt.config.reference`)."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, help_text: str) -> Any:
    """A field with a default and the help text the configuration reference prints."""
    return field(default=default, metadata={"help": help_text})
