"""The test tiers rely on pytest-xdist's ``--dist loadgroup`` (Makefile, tests/conftest.py):
the tests that share an expensive session fixture (the shared smoke simulations) must run
on one worker, which computes the fixture once. pytest 9.2 broke that silently
(pytest-dev/pytest-xdist#1386): every worker computed the shared runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CONFTEST = textwrap.dedent("""
    import os
    from pathlib import Path

    import pytest

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(items):  # as tests/conftest.py groups smoke_runs users
        for item in items:
            if "shared" in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group("shared"))

    @pytest.fixture(scope="session")
    def shared():
        with open(Path(__file__).parent / "computed.txt", "a") as log:
            log.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
""")
TESTS = textwrap.dedent("""
    import pytest

    @pytest.mark.parametrize("i", range(6))
    def test_reads_the_shared_fixture(shared, i):
        pass
""")


def test_loadgroup_computes_a_shared_fixture_on_one_worker(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_shared.py").write_text(TESTS)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-n", "2", "--dist", "loadgroup", str(tmp_path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    workers = (tmp_path / "computed.txt").read_text().split()
    assert len(workers) == 1, f"the shared fixture was computed on {workers}"
