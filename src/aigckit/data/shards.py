"""Tokenised text as memory-mapped shards: tokenise a large corpus once, then every rank reads only what it uses.

A shard folder holds ``index.json`` and, per shard, ``shard-NNNNN.bin`` (the token ids of its documents back to
back, little-endian ``uint16`` when the vocabulary fits, else ``uint32``) and ``shard-NNNNN.idx`` (``int64`` offsets
of the documents in the ``.bin``, one more than there are documents: Megatron's .bin/.idx pair, simplified). Shards
written for SFT (``aigc data tokenize --sft``) add ``shard-NNNNN.mask``: one ``uint8`` per token, 1 where the token
carries loss (the assistant turns of a chat, every token of a text row). ``index.json`` records the format version
(``VERSION``; folders of another version are refused with a message that says to tokenise again), the dtype, the
vocabulary size, the EOS id appended after each document, whether there is a mask, and each shard's token and
document counts and sha256. Shards are written to a temporary name and renamed; the index is written last, so a
folder with an index is complete.

``TokenShards(path)`` opens the files with ``numpy.memmap`` (nothing is read until used): ``len`` is the total token
count, ``doc(i)`` one document (``doc_mask(i)`` its loss mask), ``tokens`` / ``mask`` any range, ``window(i, block)`` the ``block + 1`` tokens of the i-th non-overlapping training
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
from typing import Any

import numpy as np

from aigckit.data.urls import file_name, pyarrow_parquet
from aigckit.errors import AigcError, CorruptFileError
from aigckit.store import sha256_file

INDEX = "index.json"
FORMAT = "aigckit-token-shards"
VERSION = 2  # 2: "version" field, optional .mask files (1: "format": "aigckit-token-shards/1", no masks)
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


def iter_records(url: str, param: str = "input") -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for every row of a .parquet file, or of a JSON Lines file (any other name), a path or an
    fsspec URL; ``where`` is ``url:line`` (JSONL) or ``url:row`` (Parquet), for errors that point at the row."""
    import fsspec

    if file_name(url).endswith(".parquet"):
        with fsspec.open(url, "rb") as f:
            n = 0
            for batch in pyarrow_parquet().ParquetFile(f).iter_batches():
                for row in batch.to_pylist():
                    n += 1
                    yield f"{url}:{n}", row
        return
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AigcError(f"{url}:{n}: not valid JSON ({e.msg})", param=param) from None
                if not isinstance(row, dict):
                    raise AigcError(f"{url}:{n}: a row must be a JSON object, got {type(row).__name__}",
                                    param=param)
                yield f"{url}:{n}", row


def write_shards(texts: Iterable, encode: Callable[[Any], list[int]], out: str | Path, *, vocab_size: int,
                 eos_id: int | None, shard_tokens: int = SHARD_TOKENS, progress: bool = False,
                 source: str = "", masked: bool = False, meta: dict | None = None) -> dict:
    """Tokenise ``texts`` with ``encode`` into shards in ``out``; returns the index. ``eos_id`` (when not None) is
    appended after every document. ``masked``: ``encode`` returns ``(ids, mask)`` (mask: 1 = loss on this token),
    written to ``.mask`` files (an appended EOS carries loss). ``meta`` is stored in the index as it is."""
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
    mbuf: list[np.ndarray] = []
    offsets = [0]

    def flush() -> None:
        if len(offsets) == 1:
            return
        name = f"shard-{len(shards):05d}"
        tokens = np.concatenate(buf) if buf else np.zeros(0, dtype)
        files = [(".bin", tokens), (".idx", np.asarray(offsets, dtype="<i8"))]
        if masked:
            files.append((".mask", np.concatenate(mbuf) if mbuf else np.zeros(0, np.uint8)))
        for ext, arr in files:
            tmp = out / f".{name}{ext}.tmp"
            with open(tmp, "wb") as f:
                f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out / f"{name}{ext}")
        shards.append({"name": name, "tokens": int(tokens.size), "docs": len(offsets) - 1,
                       "sha256": {ext: sha256_file(out / f"{name}{ext}") for ext, _ in files}})
        buf.clear()
        mbuf.clear()
        offsets[:] = [0]

    n_docs = 0
    for text in tqdm(texts, desc="tokenise", unit="doc", disable=not progress):
        enc = encode(text)
        ids, mask = (list(enc[0]), list(enc[1])) if masked else (list(enc), None)
        if mask is not None and len(mask) != len(ids):
            raise AigcError(f"encode gave {len(ids)} ids but a mask of {len(mask)}")
        if eos_id is not None:
            ids.append(eos_id)
            mask = None if mask is None else mask + [1]
        if not ids:
            continue
        arr = np.asarray(ids, dtype=np.int64)
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise AigcError(f"token id {int(arr.max())} is outside the vocabulary of {vocab_size}")
        buf.append(arr.astype(dtype))
        if mask is not None:
            mbuf.append(np.asarray(mask, dtype=bool).astype(np.uint8))
        offsets.append(offsets[-1] + arr.size)
        n_docs += 1
        if offsets[-1] >= shard_tokens:
            flush()
    flush()
    if not shards:
        raise AigcError("no documents to tokenise (the input is empty)", param="input")
    index = {"format": FORMAT, "version": VERSION, "mask": masked, **(meta or {}), "dtype": np.dtype(dtype).name, "vocab_size": vocab_size,
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
        fmt, version = self.index.get("format"), self.index.get("version")
        if fmt == "aigckit-token-shards/1":
            raise AigcError(f"{path} holds token shards of format 1 (written by an older aigckit, without a version "
                            f"field or loss masks); this aigckit reads version {VERSION}: tokenise the corpus again "
                            f"with aigc data tokenize", param="data")
        if fmt != FORMAT or version != VERSION:
            raise CorruptFileError(f"{path}/{INDEX}: unknown format {fmt!r} version {version!r} "
                                   f"(this aigckit reads {FORMAT} version {VERSION})")
        self.root = root
        self.has_mask = bool(self.index.get("mask"))
        dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self._bins, self._idx, self._masks = [], [], []
        exts = (".bin", ".idx", ".mask") if self.has_mask else (".bin", ".idx")
        for s in self.index["shards"]:
            for ext in exts:
                f = root / f"{s['name']}{ext}"
                want = {".bin": s["tokens"] * dtype.itemsize, ".idx": (s["docs"] + 1) * 8, ".mask": s["tokens"]}[ext]
                if not f.exists() or f.stat().st_size != want:
                    raise CorruptFileError(f"{f}: missing or of the wrong size (want {want} bytes)")
                if verify and sha256_file(f) != s["sha256"][ext]:
                    raise CorruptFileError(f"{f}: sha256 does not match {INDEX}")
            self._bins.append(np.memmap(root / f"{s['name']}.bin", dtype=dtype, mode="r") if s["tokens"] else
                              np.zeros(0, dtype))
            self._idx.append(np.memmap(root / f"{s['name']}.idx", dtype="<i8", mode="r"))
            if self.has_mask:
                self._masks.append(np.memmap(root / f"{s['name']}.mask", dtype=np.uint8, mode="r") if s["tokens"]
                                   else np.zeros(0, np.uint8))
        self._starts = np.cumsum([0] + [s["tokens"] for s in self.index["shards"]])
        self._doc_starts = np.cumsum([0] + [s["docs"] for s in self.index["shards"]])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_docs(self) -> int:
        return int(self._doc_starts[-1])

    def doc_span(self, i: int) -> tuple[int, int]:
        """Where document ``i`` lies in the whole corpus: tokens [start, stop)."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} of {self.num_docs}")
        s = int(np.searchsorted(self._doc_starts, i, side="right") - 1)
        j = i - int(self._doc_starts[s])
        base = int(self._starts[s])
        return base + int(self._idx[s][j]), base + int(self._idx[s][j + 1])

    def doc(self, i: int) -> np.ndarray:
        return self.tokens(*self.doc_span(i))

    def doc_mask(self, i: int) -> np.ndarray:
        return self.mask(*self.doc_span(i))

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole corpus, across shard boundaries (only those pages are read)."""
        return self._read(self._bins, start, stop).astype(np.int64)

    def mask(self, start: int, stop: int) -> np.ndarray:
        """The loss mask (bool) of tokens [start, stop); all True for shards written without one."""
        if not self.has_mask:
            self._check(start, stop)
            return np.ones(stop - start, bool)
        return self._read(self._masks, start, stop).astype(bool)

    def _check(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"tokens [{start}, {stop}) of {len(self)}")

    def _read(self, maps: list, start: int, stop: int) -> np.ndarray:
        self._check(start, stop)
        parts, pos = [], start
        while pos < stop:
            s = int(np.searchsorted(self._starts, pos, side="right") - 1)
            end = min(stop, int(self._starts[s + 1]))
            parts.append(maps[s][pos - self._starts[s]:end - self._starts[s]])
            pos = end
        return np.concatenate(parts) if parts else np.zeros(0, maps[0].dtype if maps else np.int64)

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
        for ext in s["sha256"]:
            dst = cache / f"{s['name']}{ext}"
            if not dst.exists() or sha256_file(dst) != s["sha256"][ext]:
                tmp = cache / f".{s['name']}{ext}.tmp"
                fs.get_file(f"{root.rstrip('/')}/{s['name']}{ext}", str(tmp))
                os.replace(tmp, dst)
    (cache / INDEX).write_text(json.dumps(index))
    return cache
