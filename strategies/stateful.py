"""Server steps whose state must survive ``--resume`` (e.g. a server optimiser's moments)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class StatefulStep(Protocol):
    """A server step that saves its state beside each adapter version and restores it."""

    def save_state(self, folder: Path) -> None:
        """Write the state after this round into ``folder`` (the round's version)."""
        ...

    def load_state(self, folder: Path) -> None:
        """Restore the state saved in ``folder``."""
        ...
