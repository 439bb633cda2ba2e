"""The ServerApp's process prints each log line once: its stderr is streamed into run.log."""

from __future__ import annotations

import subprocess
import sys

# What the ServerApp's process does before a round: import fedcpt's server (and with it
# Opacus), send fedcpt's lines to stderr, then log through fedcpt and through Flower.
SERVER_PROCESS = """
import logging
from flwr.common.logger import log as flower_log
import fedcpt.server.app
from fedcpt.core.progress import stream_plain_lines
stream_plain_lines()
logging.getLogger("fedcpt.server.recorder").info("fedcpt-line")
flower_log(logging.INFO, "flower-line")
"""


def test_every_line_reaches_the_streamed_log_once():
    out = subprocess.run([sys.executable, "-c", SERVER_PROCESS], capture_output=True,
                         text=True, timeout=300, check=True)
    lines = out.stderr.splitlines()
    assert [line for line in lines if "fedcpt-line" in line] == [
        "INFO fedcpt.server.recorder: fedcpt-line"]
    assert len([line for line in lines if "flower-line" in line]) == 1
