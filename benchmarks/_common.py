"""Helpers shared by the benchmark scripts (not part of the installed package)."""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def setup(threads: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(threads)


def interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each function ``repeats`` times, alternating, so drift hits all alike.

    Each function returns the seconds of the work it timed."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def write(out: Path, payload: dict) -> None:
    payload = dict(payload, machine={
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
