"""`aigc embed` on a tiny random BERT: JSON shape, stdin, exit codes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from embedutil import make_tiny_bert_dir

from aigckit.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"))


def test_cli_json(tiny_dir, capsys):
    assert main(["embed", "A man is eating food.", "dogs", "--model", str(tiny_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == tiny_dir.name and out["dim"] == 32
    assert len(out["embeddings"]) == 2 and all(len(v) == 32 for v in out["embeddings"])
    assert out["usage"] == {"prompt_tokens": 8 + 4}


def test_cli_human_and_stdin(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a man\n\nthe dog runs\n"))
    assert main(["embed", "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 text(s)" in out and "cosine similarity" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["embed", "--model", str(tiny_dir)]) == 2
    assert "no texts" in capsys.readouterr().err
