"""Helpers of the tuner tests (tests/tune): small JSONL files."""

from __future__ import annotations

import json
from pathlib import Path


def words(rng, n: int, lo: int = 10, hi: int = 90) -> str:
    return " ".join(f"w{rng.randint(lo, hi)}" for _ in range(n))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
