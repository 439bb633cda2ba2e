"""Planned noise multipliers kept on disk, so that processes planning the same spend share one
bisection; a stored σ is a hint that the planner verifies, never a value it trusts.

Planning σ is a bisection of 20-30 PRV accountant calls (about 3 s of CPU for a smoke site).
A simulation plans each site's σ in the CLI's preflight and again in every Ray worker that
serves the site, and the tests plan the same spends in many processes. The store keeps σ
under a digest of every input of the plan, in fedcpt's cache folder
(:func:`fedcpt.core.assets.cache_dir`, ``noise-plans/``), on the machine that plans.

Why by hand: the disk caches on PyPI (joblib.Memory, diskcache) pickle their values and
return what they read; this folder may be writable by others, so it holds JSON numbers only,
and :func:`fedcpt.privacy.accounting.plan_noise` uses a stored σ only after its own
accountant has shown that σ meets the budget and is as tight as its bisection would make it.
A stale, corrupt or forged entry can cost a re-plan, never privacy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path

from fedcpt.core.assets import cache_dir

log = logging.getLogger(__name__)

FORMAT = 1
"""Bumped when what a stored σ means changes (the planner's search or its inputs)."""


def store_dir() -> Path:
    """Where plans are kept: ``noise-plans/`` in fedcpt's cache folder."""
    return cache_dir() / "noise-plans"


def _path(inputs: list) -> Path:
    digest = hashlib.sha256(json.dumps([FORMAT, inputs]).encode()).hexdigest()
    return store_dir() / f"{digest}.json"


def load(inputs: list) -> float | None:
    """The σ stored for ``inputs`` (a JSON-able list of the plan's inputs), or None when
    there is none or it is unreadable (then it is logged and planned again)."""
    path = _path(inputs)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("ignoring the unreadable stored noise plan %s: %s", path, err)
        return None
    sigma = entry.get("sigma") if isinstance(entry, dict) else None
    if (entry.get("inputs") if isinstance(entry, dict) else None) != inputs \
            or not isinstance(sigma, float) or not math.isfinite(sigma) or sigma <= 0:
        log.warning("ignoring the stored noise plan %s: not a plan for these inputs", path)
        return None
    return sigma


def save(inputs: list, sigma: float) -> None:
    """Keep ``sigma`` for ``inputs`` (atomically: a reader sees the old file or the new one).
    A folder that cannot be written is logged, and planning goes on without the store."""
    path = _path(inputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp",
                                         delete=False, encoding="utf-8") as out:
            json.dump({"inputs": inputs, "sigma": float(sigma)}, out)
        os.replace(out.name, path)
    except OSError as err:
        log.warning("could not keep the noise plan in %s: %s", path.parent, err)
