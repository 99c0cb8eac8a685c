"""Token shards: written once from any fsspec URL, memory-mapped, read across shard boundaries."""

from __future__ import annotations

import json
import zipfile

import fsspec
import numpy as np
import pytest

from aigckit.data.shards import TokenShards, iter_texts, write_shards
from aigckit.errors import AigcError, CorruptFileError

DOCS = [f"document {i} " + "abcdefghij"[: i % 10 + 1] * (i % 4 + 1) for i in range(40)]


def _encode(text: str) -> list[int]:
    return [ord(c) % 90 + 1 for c in text]


def test_shards_round_trip_across_boundaries_from_memory_url(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/a.jsonl", "".join(json.dumps({"text": d, "other": 1}) + "\n" for d in DOCS).encode())
    index = write_shards(iter_texts("memory://corpus/a.jsonl"), _encode, tmp_path / "s", vocab_size=100, eos_id=0,
                         shard_tokens=97)  # several shards, documents of 12..52 tokens
    assert len(index["shards"]) > 3 and index["dtype"] == "uint16" and index["docs"] == 40
    ts = TokenShards(tmp_path / "s", verify=True)
    flat = np.concatenate([np.asarray(_encode(d) + [0]) for d in DOCS])
    assert len(ts) == flat.size and ts.num_docs == 40
    for i in (0, 17, 39):
        assert ts.doc(i).tolist() == _encode(DOCS[i]) + [0]
    block = 13
    assert ts.num_windows(block) == (flat.size - 1) // block
    for w in range(ts.num_windows(block)):  # windows that cross shard boundaries included
        assert ts.window(w, block).tolist() == flat[w * block: w * block + block + 1].tolist()
    assert isinstance(ts._bins[0], np.memmap)
    with pytest.raises(AigcError, match="already holds shards"):
        write_shards(DOCS, _encode, tmp_path / "s", vocab_size=100, eos_id=0)


def test_zip_and_remote_folders_and_damage(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as z:
        z.writestr("docs.txt", "\n".join(DOCS[:5]) + "\n\n")
    assert list(iter_texts(f"zip://docs.txt::{tmp_path}/c.zip")) == DOCS[:5]
    write_shards(iter_texts(f"zip://docs.txt::{tmp_path}/c.zip"), _encode, tmp_path / "z", vocab_size=100,
                 eos_id=None, shard_tokens=40)
    # a shard folder on "remote" storage is copied to the local cache once, then memory-mapped
    fs = fsspec.filesystem("memory")
    for f in (tmp_path / "z").iterdir():
        fs.pipe(f"/remote/z/{f.name}", f.read_bytes())
    remote = TokenShards("memory://remote/z")
    assert [remote.doc(i).tolist() for i in range(5)] == [_encode(d) for d in DOCS[:5]]
    bin0 = tmp_path / "z" / "shard-00000.bin"
    data = bytearray(bin0.read_bytes())
    data[0] ^= 1
    bin0.write_bytes(bytes(data))
    TokenShards(tmp_path / "z")  # same size: only --verify reads it
    with pytest.raises(CorruptFileError, match="sha256"):
        TokenShards(tmp_path / "z", verify=True)
    bin0.write_bytes(bytes(data[:-2]))
    with pytest.raises(CorruptFileError, match="wrong size"):
        TokenShards(tmp_path / "z")
    with pytest.raises(AigcError, match="not a shard folder"):
        TokenShards(tmp_path)
    with pytest.raises(AigcError, match="outside the vocabulary"):
        write_shards(["x"], lambda t: [500], tmp_path / "v", vocab_size=100, eos_id=None)


def test_cli_tokenize_and_info(tmp_path, tiny_llama_dir, capsys):
    from aigckit.cli import main

    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"body": f"w{i} w{i + 1} w3"}) + "\n" for i in range(5, 18)))  # no w2x: "w2" is the EOS token
    assert main(["data", "tokenize", f"file://{tmp_path}/t.jsonl", "--field", "body", "--out", str(tmp_path / "o"),
                 "--model", str(tiny_llama_dir), "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    ts = TokenShards(tmp_path / "o")
    assert out["docs"] == 13 and out["tokens"] == 13 * 4, [ts.doc(i).tolist() for i in range(3)]  # 3 words + EOS
    assert main(["data", "info", str(tmp_path / "o"), "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True
    ts = TokenShards(tmp_path / "o")
    assert ts.doc(0).tolist() == [5, 6, 3, 2]  # the word-level tokenizer: wN -> N, then EOS (2)
    assert main(["data", "tokenize", str(tmp_path / "t.jsonl"), "--field", "nope", "--out", str(tmp_path / "p"),
                 "--model", str(tiny_llama_dir), "--quiet"]) == 2
