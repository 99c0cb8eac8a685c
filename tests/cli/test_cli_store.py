"""`aigc pull | list | rm` and model resolution errors from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigckit.cli import main


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "aigc"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "aigc"


def test_cli_errors_are_one_line_exit_2(home, capsys):
    assert main(["text", "hello", "--model", "nope-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aigc: error: unknown model") and "\n" not in err
    assert main(["text", "hello", "--model", "smollm2-135m-instruct"]) == 2
    assert "aigc pull smollm2-135m-instruct" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["text", "hello", "--temperature", "abc"])
    assert e.value.code == 2
    assert main(["rm", "nothing-here"]) == 2
