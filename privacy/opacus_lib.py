"""Opacus, as every fedcpt module takes it: imported without the root log handler that
``opacus/utils/module_utils.py`` installs on import (``logging.basicConfig``). That handler
printed every propagated line, fedcpt's and Flower's, a second time in its own format
(``run.log`` held each twice).

Only the modules that use Opacus import this one, so a process that never trains or
accounts (a site answering a key-exchange stage of secure aggregation) never loads Opacus
and torch."""

import logging

_root = logging.getLogger()
_handlers = list(_root.handlers)
from opacus import PrivacyEngine  # noqa: E402  # the imports whose side effect is undone
from opacus.accountants import create_accountant  # noqa: E402
from opacus.utils.batch_memory_manager import BatchMemoryManager  # noqa: E402

_root.handlers[:] = _handlers

__all__ = ["BatchMemoryManager", "PrivacyEngine", "create_accountant"]
