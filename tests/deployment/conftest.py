"""Fixtures for tests that start real Flower processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from local_federation import LocalFederation


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Callable[[list[str]], LocalFederation]]:
    """Factory of :class:`LocalFederation` objects, all stopped at teardown."""
    started: list[LocalFederation] = []

    def _make(sites: list[str]) -> LocalFederation:
        fed = LocalFederation(tmp_path / f"federation-{len(started)}", sites)
        fed.root.mkdir(parents=True, exist_ok=True)
        started.append(fed)
        return fed

    yield _make
    for fed in started:
        fed.stop_all()
