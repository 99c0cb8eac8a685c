"""The rows of a batch job and the results already written (what makes a killed job resumable).

Input: JSON Lines or Parquet (``pyarrow``), a path or any fsspec URL. A row is ``{"prompt": "..."}`` or
``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat template applied), with an optional ``id`` (or
``custom_id``; default ``row-N``, N counting from 0) and optional per-row generation options (``ROW_OPTIONS``).

Output: JSON Lines, one result per row in the order they finish. Each line is written whole and flushed, so a job
killed at any moment leaves complete lines and at most one partial last line; ``done_ids`` drops that partial line
(truncating the file to its last newline) and returns the ids finished, which a resumed job skips.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aigckit.data.urls import file_name, pyarrow_parquet
from aigckit.errors import AigcError, CorruptFileError

# generation options a row may set for itself (the command's flags are the defaults)
ROW_OPTIONS = ("max_new_tokens", "max_length", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
               "stop", "seed")


@dataclass(frozen=True)
class Row:
    id: str
    index: int  # position in the input (the default seed offset)
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "index": self.index, "prompt": self.prompt, "messages": self.messages,
                           "options": self.options})

    @classmethod
    def from_json(cls, s: str) -> Row:
        return cls(**json.loads(s))


def _row(obj: Any, i: int, where: str) -> Row:
    if not isinstance(obj, dict):
        raise AigcError(f"{where}: a row must be a JSON object, got {type(obj).__name__}", param="input")
    rid = obj.get("id", obj.get("custom_id"))
    rid = f"row-{i}" if rid is None else str(rid)
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise AigcError(f"{where} (id {rid}): give exactly one of prompt or messages", param="input")
    if prompt is not None and not isinstance(prompt, str):
        raise AigcError(f"{where} (id {rid}): prompt must be a string", param="input")
    options = {k: obj[k] for k in ROW_OPTIONS if obj.get(k) is not None}
    if isinstance(messages, str):  # Parquet files often hold the messages as a JSON string
        messages = json.loads(messages)
    if messages is not None:
        messages = [dict(m) for m in messages]
    return Row(rid, i, prompt, messages, options)


def read_rows(url: str) -> list[Row]:
    """All rows of ``url`` (.jsonl / .json lines, or .parquet); ids must be unique."""
    import fsspec

    lower = file_name(url)
    try:
        if lower.endswith(".parquet"):
            pq = pyarrow_parquet()
            with fsspec.open(url, "rb") as f:
                table = pq.read_table(f)
            rows = [_row(r, i, f"{url} row {i}") for i, r in enumerate(table.to_pylist())]
        elif lower.endswith((".jsonl", ".json", ".ndjson")):
            rows = []
            with fsspec.open(url, "rt", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise AigcError(f"{url} line {n}: not JSON ({e.msg})", param="input") from None
                    rows.append(_row(obj, len(rows), f"{url} line {n}"))
        else:
            raise AigcError(f"input must be .jsonl or .parquet, got {url!r}", param="input")
    except FileNotFoundError:
        raise AigcError(f"input not found: {url}", param="input") from None
    seen: set[str] = set()
    for r in rows:
        if r.id in seen:
            raise AigcError(f"{url}: id {r.id!r} appears twice; ids must be unique", param="input")
        seen.add(r.id)
    return rows


def done_ids(path: str | Path) -> set[str]:
    """Ids of the results in ``path`` (a missing file: none). A partial last line (the job was killed while writing
    it) is cut off so that appending goes on from a clean line."""
    p = Path(path)
    if not p.exists():
        return set()
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(p, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    ids = set()
    for n, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CorruptFileError(f"{p} line {n} is not a result line; is this the output of another tool?") \
                from None
    return ids
