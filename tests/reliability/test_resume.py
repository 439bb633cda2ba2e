"""Resuming a run folder: what cannot be resumed is a clear error. A run killed with SIGKILL
resuming from its last finished round and ending where an uninterrupted run ends is tested
on a phased run with a server optimiser, the case with the most state to restore
(tests/server/test_phases.py::test_phased_run_trains_phase_sites_and_resumes_across_phases)."""

from __future__ import annotations

import pytest

from fedcpt.exceptions import ConfigError
from fedcpt.runfolder.versions import resumable_config


def test_nothing_to_resume_is_a_clear_error(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already finished"):
        resumable_config(tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint.json"):
        resumable_config(tmp_path / "elsewhere")
