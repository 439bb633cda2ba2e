"""What an operator or an auditor runs on a run folder, apart from the ServerApp: withdraw a
site and certify the replay (:mod:`~fedcpt.tools.forget`), check the site attestations a
version records (:mod:`~fedcpt.tools.attestations`). The CLI calls them
(``cli_adapters.py``); they read the run folder's format (``runfolder``) and never import
the server, nor does the server import them."""
