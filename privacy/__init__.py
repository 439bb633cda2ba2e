"""Differential privacy at the data sites: DP-SGD, accounting, the per-site ledger, reports.

``server``, ``client`` and ``strategies`` import this package, never the reverse.
"""

import logging


def _import_opacus_keeping_the_root_logger() -> None:
    """Import Opacus once, undoing the ``logging.basicConfig`` it calls on import
    (``opacus/utils/module_utils.py``): that root handler printed every propagated line,
    fedcpt's and Flower's, a second time in its own format (``run.log`` held each twice).
    Every module of this package that uses Opacus is imported after this one."""
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus  # noqa: F401  # the import whose side effect is undone

    root.handlers[:] = before


_import_opacus_keeping_the_root_logger()
