"""A run folder's format, read by the server that writes it and by the sites and tools that
read a run's versions: its paths (:mod:`~fedcpt.runfolder.paths`) and its adapter versions
(:mod:`~fedcpt.runfolder.versions`). It imports ``config`` and ``core`` only, so a site's own
tools (``client``) can read a run without importing the server.
"""
