"""A site's generated notes with one privacy unit per user, for the unit-count attacks."""

from __future__ import annotations

import json
from pathlib import Path


def user_notes(folder: Path, users: int) -> Path:
    """``users`` users of ~800 characters each, keyed by ``user_id``, as JSON lines."""
    path = folder / f"notes-{users}.jsonl"
    path.write_text("\n".join(json.dumps({"user_id": f"p{u}", "text": " ".join(
        f"Note {i} of patient {u}: slept well, walked a little, asked about lunch."
        for i in range(11))}) for u in range(users)), encoding="utf-8")
    return path
