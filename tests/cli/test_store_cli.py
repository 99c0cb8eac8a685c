"""`aigc rm` and `aigc gc` from the command line: one-line errors, bytes reported, a running server's models kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aigckit import store
from aigckit.cli import main


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "aigc"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "aigc"


def _entry(home: Path, name: str, src: Path) -> Path:
    d = home / "models" / name
    shutil.copytree(src, d)
    (d / "manifest.json").write_text(json.dumps({"name": name, "kind": "lm", "sha256": {}}))
    return d


def test_rm_and_gc_report_what_they_free(home, tiny_llama_dir, capsys):
    from aigckit import load_lm

    d = _entry(home, "tiny-llama", tiny_llama_dir)
    load_lm("tiny-llama", quantize="int8")
    assert main(["gc"]) == 0
    assert capsys.readouterr().out.strip() == "freed 0.0 MB (0 bytes) in 0 item(s)"
    assert main(["rm", "tiny-llama"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("removed tiny-llama (") and "and 1 derived cache(s)" in out
    assert not d.exists() and not any((home / "cache").iterdir())
    # an orphan: the quantised cache of a model removed by hand
    _entry(home, "tiny-llama", tiny_llama_dir)
    load_lm("tiny-llama", quantize="int8")
    shutil.rmtree(home / "models" / "tiny-llama")
    cache = next((home / "cache").iterdir())
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    assert main(["gc", "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["bytes"] == size and cache.exists()
    assert main(["gc"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"freed {size / 1e6:.1f} MB ({size} bytes) in 1 item(s)"
    assert not cache.exists()


def test_rm_symlink_is_one_line_exit_2(home, tmp_path, tiny_llama_dir, capsys):
    real = tmp_path / "real"
    shutil.copytree(tiny_llama_dir, real)
    (real / "manifest.json").write_text("{}")
    (home / "models").mkdir(parents=True)
    (home / "models" / "ln").symlink_to(real)
    assert main(["rm", "ln"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aigc: error: ") and "symbolic link" in err and "\n" not in err
    assert (real / "config.json").exists()


def test_rm_refuses_a_model_a_running_server_uses(home, tiny_llama_dir, capsys):
    _entry(home, "tiny-llama", tiny_llama_dir)
    env = dict(os.environ, AIGC_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "aigckit", "serve", "--model", "tiny-llama", "--port", "0",
                             "--log-level", "warning", "--threads", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not store.users("tiny-llama"):
            assert proc.poll() is None, "the server exited"
            time.sleep(0.1)
        assert store.users("tiny-llama") == [proc.pid]
        assert main(["rm", "tiny-llama"]) == 2
        err = capsys.readouterr().err
        assert f"in use by a running aigc serve (pid {proc.pid})" in err and "--force" in err
        assert (home / "models" / "tiny-llama" / "config.json").exists()
    finally:
        proc.terminate()
        proc.wait(30)
    assert store.users("tiny-llama") == []
    assert main(["rm", "tiny-llama"]) == 0
