"""A run folder's format, read by the server that writes it and by the sites and tools that
read a run's versions: its paths (:mod:`~fedcpt.runfolder.paths`), its typed rows
(``metrics.jsonl``, ``summary.json``: :mod:`~fedcpt.runfolder.records`), its manifest and
each version's provenance (:mod:`~fedcpt.runfolder.provenance`) and its adapter versions
(:mod:`~fedcpt.runfolder.versions`). It imports ``config`` and ``core`` only, so a site's own
tools (``client``) can read a run without importing the server.
"""
