"""Keep the private SuperLink's whole process tree from outliving ``fedcpt simulate``.

``python -m fedcpt.simulations.reaper CMD...`` runs CMD (``flower-superlink``) with a pipe
from fedcpt as its own stdin. When that pipe reaches end of file (fedcpt closed it, or
fedcpt died in any way, SIGKILL included: the kernel closes a dead process's files) or
when CMD exits, it SIGKILLs every process descended from it and exits.

Why by hand: nothing in Flower stops a simulation when the process that started
``flwr run`` dies.
- ``flower-superlink`` starts its SuperExec detached, in a new session, and the SuperExec
  starts ``flwr-simulation``, which starts Ray's daemons and workers. Killing fedcpt's
  process group or session misses all of them, and a SIGKILLed fedcpt runs no cleanup.
- Flower's ``--parent-pid`` monitors only raise SIGINT. That ends ``flwr-simulation``'s
  main thread, but the ServerApp runs in a non-daemon thread, so a killed run went on to
  finish, and ``--resume`` then found nothing to resume.
psutil walks the tree, and on Linux this process is the children's subreaper
(``PR_SET_CHILD_SUBREAPER``): a process orphaned while the tree dies is re-parented here,
not to init, so it is still found and killed. SIGKILL, not a graceful stop: a graceful
stop lets the ServerApp thread run more rounds, and the run folder is written to survive a
kill (durable writes, a checkpoint per round), so ``--resume`` continues it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import subprocess
import sys
import threading
import time

import psutil

log = logging.getLogger("fedcpt.simulations.reaper")

PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>; Python's stdlib has no prctl


def become_subreaper() -> bool:
    """Adopt this process's orphaned descendants (Linux only); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def kill_descendants(timeout: float = 15.0) -> int:
    """SIGKILL and reap every descendant of this process until none is left (or the
    timeout passes); returns how many processes it killed."""
    me = psutil.Process()
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while (procs := me.children(recursive=True)) and time.monotonic() < deadline:
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
                killed.add(proc.pid)
        psutil.wait_procs(procs, timeout=1.0)  # also reaps the children re-parented here
    if procs := me.children(recursive=True):
        log.error("processes left running: %s", ", ".join(str(p.pid) for p in procs))
    return len(killed)


def _wait_for_eof(closed: threading.Event) -> None:
    """Set ``closed`` once stdin reaches end of file (data written to it is ignored)."""
    with contextlib.suppress(OSError):  # an unreadable stdin counts as closed
        while os.read(sys.stdin.fileno(), 4096):
            pass
    closed.set()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s reaper %(message)s")
    if not argv:
        log.error("usage: python -m fedcpt.simulations.reaper CMD [ARG...]")
        return 2
    become_subreaper()
    closed = threading.Event()
    threading.Thread(target=_wait_for_eof, args=(closed,), daemon=True).start()
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        while child.poll() is None and not closed.wait(timeout=0.5):
            pass
    finally:  # on an error here too: never leave the tree running
        why = "the SuperLink exited" if child.returncode is not None else "stdin closed"
        log.info("%s: stopped %d processes of the run", why, kill_descendants())
    return child.returncode if child.returncode is not None else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
