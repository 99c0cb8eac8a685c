"""Tokenised text as memory-mapped shards: tokenise a large corpus once, then every rank reads only what it uses.

A shard folder holds ``index.json`` and, per shard, ``shard-NNNNN.bin`` (the token ids of its documents back to
back, little-endian ``uint16`` when the vocabulary fits, else ``uint32``) and ``shard-NNNNN.idx`` (``int64`` offsets
of the documents in the ``.bin``, one more than there are documents: Megatron's .bin/.idx pair, simplified).
``index.json`` records the dtype, the vocabulary size, the EOS id appended after each document, and each shard's
token and document counts and sha256. Shards are written to a temporary name and renamed; the index is written last,
so a folder with an index is complete.

``TokenShards(path)`` opens the files with ``numpy.memmap`` (nothing is read until used): ``len`` is the total token
count, ``doc(i)`` one document, ``window(i, block)`` the ``block + 1`` tokens of the i-th non-overlapping training
window (inputs and shifted targets) across shard boundaries. Windows are what a trainer shards over ranks
(``train.distributed.ShardedSampler`` over ``num_windows(block)``). A remote folder (any fsspec URL) is copied to a
local cache first (``simplecache::``), since a memory map needs a local file.

The text input (``iter_texts``) is JSON Lines (a field, default ``text``), Parquet (a column) or plain text (one
document per line), from a path or any fsspec URL.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from aigckit.data.urls import file_name, pyarrow_parquet
from aigckit.errors import AigcError, CorruptFileError
from aigckit.store import sha256_file

INDEX = "index.json"
SHARD_TOKENS = 1 << 26  # ~64M tokens (128 MiB of uint16) per shard


def iter_texts(url: str, field: str = "text") -> Iterator[str]:
    """Documents of a .jsonl / .parquet / .txt file (a path or an fsspec URL)."""
    import fsspec

    lower = file_name(url)
    if lower.endswith(".parquet"):
        with fsspec.open(url, "rb") as f:
            pq = pyarrow_parquet()
            pf = pq.ParquetFile(f)
            if field not in pf.schema_arrow.names:
                raise AigcError(f"{url} has no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})",
                                param="field")
            for batch in pf.iter_batches(columns=[field]):
                yield from (t for t in batch.column(0).to_pylist() if t)
    elif lower.endswith((".jsonl", ".ndjson")):
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        text = json.loads(line)[field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise AigcError(f"{url} line {n}: not a JSON object with a {field!r} string",
                                        param="input") from None
                    if text:
                        yield text
    elif lower.endswith(".txt"):
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
    else:
        raise AigcError(f"text input must be .jsonl, .parquet or .txt, got {url!r}", param="input")


def write_shards(texts: Iterable[str], encode: Callable[[str], list[int]], out: str | Path, *, vocab_size: int,
                 eos_id: int | None, shard_tokens: int = SHARD_TOKENS, progress: bool = False,
                 source: str = "") -> dict:
    """Tokenise ``texts`` with ``encode`` into shards in ``out``; returns the index. ``eos_id`` (when not None) is
    appended after every document."""
    from tqdm import tqdm

    out = Path(out)
    if (out / INDEX).exists():
        raise AigcError(f"{out} already holds shards; choose another folder", param="out")
    if shard_tokens < 1:
        raise AigcError(f"shard_tokens must be >= 1, got {shard_tokens}", param="shard_tokens")
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    shards: list[dict] = []
    buf: list[np.ndarray] = []
    offsets = [0]

    def flush() -> None:
        if len(offsets) == 1:
            return
        name = f"shard-{len(shards):05d}"
        tokens = np.concatenate(buf) if buf else np.zeros(0, dtype)
        for ext, arr in ((".bin", tokens), (".idx", np.asarray(offsets, dtype="<i8"))):
            tmp = out / f".{name}{ext}.tmp"
            with open(tmp, "wb") as f:
                f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out / f"{name}{ext}")
        shards.append({"name": name, "tokens": int(tokens.size), "docs": len(offsets) - 1,
                       "sha256": {ext: sha256_file(out / f"{name}{ext}") for ext in (".bin", ".idx")}})
        buf.clear()
        offsets[:] = [0]

    n_docs = 0
    for text in tqdm(texts, desc="tokenise", unit="doc", disable=not progress):
        ids = list(encode(text)) + ([eos_id] if eos_id is not None else [])
        if not ids:
            continue
        arr = np.asarray(ids, dtype=np.int64)
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise AigcError(f"token id {int(arr.max())} is outside the vocabulary of {vocab_size}")
        buf.append(arr.astype(dtype))
        offsets.append(offsets[-1] + arr.size)
        n_docs += 1
        if offsets[-1] >= shard_tokens:
            flush()
    flush()
    if not shards:
        raise AigcError("no documents to tokenise (the input is empty)", param="input")
    index = {"format": "aigckit-token-shards/1", "dtype": np.dtype(dtype).name, "vocab_size": vocab_size,
             "eos_id": eos_id, "tokens": sum(s["tokens"] for s in shards), "docs": n_docs, "source": source,
             "shards": shards}
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, out / INDEX)  # last: a folder with an index is complete
    return index


class TokenShards:
    """Read-only, memory-mapped view of a shard folder (see the module docstring)."""

    def __init__(self, path: str | Path, *, verify: bool = False) -> None:
        root = _local(str(path))
        try:
            self.index = json.loads((root / INDEX).read_text())
        except FileNotFoundError:
            raise AigcError(f"no {INDEX} in {path}: not a shard folder (or its writing did not finish)",
                            param="data") from None
        if self.index.get("format") != "aigckit-token-shards/1":
            raise CorruptFileError(f"{path}/{INDEX}: unknown format {self.index.get('format')!r}")
        self.root = root
        dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self._bins, self._idx = [], []
        for s in self.index["shards"]:
            for ext in (".bin", ".idx"):
                f = root / f"{s['name']}{ext}"
                want = s["tokens"] * dtype.itemsize if ext == ".bin" else (s["docs"] + 1) * 8
                if not f.exists() or f.stat().st_size != want:
                    raise CorruptFileError(f"{f}: missing or of the wrong size (want {want} bytes)")
                if verify and sha256_file(f) != s["sha256"][ext]:
                    raise CorruptFileError(f"{f}: sha256 does not match {INDEX}")
            self._bins.append(np.memmap(root / f"{s['name']}.bin", dtype=dtype, mode="r") if s["tokens"] else
                              np.zeros(0, dtype))
            self._idx.append(np.memmap(root / f"{s['name']}.idx", dtype="<i8", mode="r"))
        self._starts = np.cumsum([0] + [s["tokens"] for s in self.index["shards"]])
        self._doc_starts = np.cumsum([0] + [s["docs"] for s in self.index["shards"]])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_docs(self) -> int:
        return int(self._doc_starts[-1])

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} of {self.num_docs}")
        s = int(np.searchsorted(self._doc_starts, i, side="right") - 1)
        j = i - int(self._doc_starts[s])
        return np.asarray(self._bins[s][self._idx[s][j]:self._idx[s][j + 1]])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole corpus, across shard boundaries (only those pages are read)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"tokens [{start}, {stop}) of {len(self)}")
        parts, pos = [], start
        while pos < stop:
            s = int(np.searchsorted(self._starts, pos, side="right") - 1)
            end = min(stop, int(self._starts[s + 1]))
            parts.append(self._bins[s][pos - self._starts[s]:end - self._starts[s]])
            pos = end
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def num_windows(self, block: int) -> int:
        """Non-overlapping training windows of ``block`` inputs (each needs one more token for its targets)."""
        if block < 1:
            raise AigcError(f"block must be >= 1, got {block}", param="block")
        return max(0, (len(self) - 1) // block)

    def window(self, i: int, block: int) -> np.ndarray:
        """The ``block + 1`` tokens of window ``i``: inputs ``w[:-1]``, targets ``w[1:]``."""
        if not 0 <= i < self.num_windows(block):
            raise IndexError(f"window {i} of {self.num_windows(block)}")
        return self.tokens(i * block, i * block + block + 1)


def _local(url: str) -> Path:
    """A local folder for ``url``: a path as it is, a remote fsspec URL copied once into fsspec's simplecache."""
    if "://" not in url or url.startswith("file://"):
        return Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()
    import fsspec

    from aigckit import store

    cache = store.cache_dir("shards") / hashlib.sha256(url.encode()).hexdigest()[:24]
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(f"{root.rstrip('/')}/{INDEX}"):
        raise AigcError(f"no {INDEX} in {url}: not a shard folder", param="data")
    cache.mkdir(parents=True, exist_ok=True)
    index = json.loads(fs.cat_file(f"{root.rstrip('/')}/{INDEX}"))
    for s in index["shards"]:
        for ext in (".bin", ".idx"):
            dst = cache / f"{s['name']}{ext}"
            if not dst.exists() or sha256_file(dst) != s["sha256"][ext]:
                tmp = cache / f".{s['name']}{ext}.tmp"
                fs.get_file(f"{root.rstrip('/')}/{s['name']}{ext}", str(tmp))
                os.replace(tmp, dst)
    (cache / INDEX).write_text(json.dumps(index))
    return cache
