"""Helpers of the tuner tests (tests/tune): small JSONL files."""

from __future__ import annotations

import json
from pathlib import Path


def words(rng, n: int, lo: int = 10, hi: int = 90) -> str:
    return " ".join(f"w{rng.randint(lo, hi)}" for _ in range(n))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def low_ids_reward(prompts, completions, **kwargs):
    """A dense test reward with TRL's signature: the share of completion words w0..w29."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[0]["content"]
        ws = text.split()
        out.append(sum(1 for w in ws if w[1:].isdigit() and int(w[1:]) < 30) / len(ws) if ws else 0.0)
    return out


def none_reward(prompts, completions, **kwargs):
    return [None] * len(completions)
