"""What a run reports about itself, built from the rows it recorded: the summary
(:mod:`~fedcpt.server.reports.summary`), ``report.md`` and ``report.html`` with their plots
(:mod:`~fedcpt.server.reports.report`), and the experiment trackers that mirror the run
folder (:mod:`~fedcpt.server.reports.tracking`). The recorder calls them; the round loop
does not."""
