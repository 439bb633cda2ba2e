"""Differential privacy at the data sites: DP-SGD, accounting, the per-site ledger, reports.

``server``, ``client`` and ``strategies`` import this package, never the reverse.
"""
