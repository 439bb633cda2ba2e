"""Moved to :mod:`fedcpt.core.durable` (one durable writer for every layer); this name stays
until its importers outside the server side (ledger, update cache, test harness) move."""

from fedcpt.core.durable import write_durably

__all__ = ["write_durably"]
