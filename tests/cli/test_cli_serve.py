"""`aigc serve` option and spec errors (the server itself as a process: tests/serve/test_serve_load.py)."""

from __future__ import annotations

import pytest

from aigckit.cli import main


def test_bad_specs_fail_before_binding(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--model", "openai:gpt-4o"]) == 2
    assert "cannot be served" in capsys.readouterr().err


def test_bad_voices_fail_before_binding(capsys, tmp_path):
    assert main(["serve", "--voice", str(tmp_path / "missing.onnx")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["serve", "--voice", "v=minilm-l6-v2"]) == 2
    assert "'minilm-l6-v2' is a embed model, not a voice" in capsys.readouterr().err


def test_bad_options_fail_before_binding(capsys):
    assert main(["serve", "--max-queue", "0"]) == 2
    assert "--max-queue must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: usage error, exit 2
        main(["serve", "--quantize", "int3"])
    assert e.value.code == 2
    assert "invalid choice: 'int3' (choose from int8, int4, w8a8)" in capsys.readouterr().err
