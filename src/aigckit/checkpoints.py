"""Reading training runs and their checkpoints (the write side is ``aigckit.train.checkpoint``). Never pickle.

A run folder holds its ``config.json`` and ``checkpoints/step-NNNNNNNNN/`` folders, each complete on its own::

    config.json                 family, model config, training arguments, class names
    model.safetensors           the trained weights
    ema.safetensors             EMA weights (used for sampling), when kept
    trainer_state.safetensors   optimiser tensors ("opt.NAME.state.I.KEY") and RNG states ("rng.*")
    trainer_state.json          step, images seen, elapsed time, optimiser param groups and scalar state
    checksums.json              size and sha256 of every file above; written last

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash leaves either the
previous checkpoints or the new complete one. Damage after the fact (a truncated copy, a disk error, a file edited by
hand) is caught by ``verify_checkpoint``: every file must match ``checksums.json``. ``latest_checkpoint`` returns the
newest checkpoint that verifies and reports each newer one it skipped. Checkpoints written before checksums existed
are verified by reading every tensor and JSON file instead.

This module sits below ``image`` and ``train`` (both read runs); it depends only on ``errors``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from aigckit.errors import CorruptFileError, ModelNotFoundError

CKPT_DIR = "checkpoints"
PREFIX = "step-"
CHECKSUMS = "checksums.json"
CHECKSUMS_FORMAT = 1
REQUIRED = ("config.json", "model.safetensors")


def private_tmp(path: str | Path) -> Path:
    """A temporary name beside ``path`` that belongs to this process and thread: write there, then rename onto
    ``path``, and two writers of the same file never share a half-written temporary file."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename: readers see the old file or the new
    one, never half of one."""
    path = Path(path)
    tmp = private_tmp(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksums(folder: Path, names: list[str]) -> dict:
    """The ``checksums.json`` content for files ``names`` of ``folder``."""
    return {"format": CHECKSUMS_FORMAT,
            "files": {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names}}


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (by step); temporary folders are not listed."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[len(PREFIX):]))


def verify_checkpoint(ckpt: Path) -> None:
    """Raise ``CorruptFileError`` saying what is wrong unless every file of ``ckpt`` is intact."""
    reason = damage(ckpt)
    if reason is not None:
        raise CorruptFileError(f"{ckpt}: {reason}")


def damage(ckpt: Path) -> str | None:
    """What is wrong with checkpoint folder ``ckpt`` (e.g. "model.safetensors: 20 bytes, checksums.json says 9000
    (truncated?)"), or None when every file is intact."""
    ckpt = Path(ckpt)
    for name in REQUIRED:
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    manifest = ckpt / CHECKSUMS
    if not manifest.exists():
        return _damage_by_reading(ckpt)
    try:
        sums = json.loads(manifest.read_text())
        files = sums["files"]
        if sums.get("format") != CHECKSUMS_FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown format {sums.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{CHECKSUMS} is unreadable ({e})"
    for name in REQUIRED:
        if name not in files:
            return f"{CHECKSUMS} does not cover {name}"
    for name, want in files.items():
        if Path(name).name != name or not isinstance(want, dict):
            return f"{CHECKSUMS} has a bad entry {name!r}"
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want.get("bytes"):
            return f"{name}: {size} bytes, {CHECKSUMS} says {want.get('bytes')} (truncated?)"
        if sha256_file(f) != want.get("sha256"):
            return f"{name}: sha256 does not match {CHECKSUMS} (damaged)"
    return None


def _damage_by_reading(ckpt: Path) -> str | None:
    """Checkpoints without checksums.json (written by older versions): every file must parse."""
    for f in sorted(ckpt.iterdir()):
        try:
            if f.suffix == ".safetensors":
                load_file(str(f))
            elif f.suffix == ".json":
                json.loads(f.read_text())
        except (SafetensorError, OSError, ValueError) as e:
            return f"{f.name} is unreadable ({e})"
    return None


def _report_skip(path: Path, reason: str) -> None:
    print(f"aigc: warning: skipping damaged checkpoint {path.name}: {reason}", file=sys.stderr)


def latest_checkpoint(run: str | Path, *, on_skip: Callable[[Path, str], None] | None = _report_skip) -> Path:
    """A run folder -> its newest intact checkpoint folder; a checkpoint folder -> itself, once verified.

    Newer checkpoints that fail ``verify_checkpoint`` are skipped and passed to ``on_skip(path, reason)`` (by default
    a warning line on stderr). Raises ``CorruptFileError`` naming each one when none is intact."""
    p = Path(run).expanduser()
    if (p / "model.safetensors").exists() and (p / "config.json").exists():
        verify_checkpoint(p)
        return p
    if not p.exists():
        raise ModelNotFoundError(f"run not found: {p}")
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise ModelNotFoundError(f"{p}: no checkpoint yet (expected {CKPT_DIR}/{PREFIX}*/)")
    skipped = []
    for c in reversed(ckpts):
        reason = damage(c)
        if reason is None:
            return c
        skipped.append(f"{c.name}: {reason}")
        if on_skip is not None:
            on_skip(c, reason)
    raise CorruptFileError(f"{p}: no intact checkpoint ({'; '.join(skipped)})")


def read_config(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{Path(ckpt) / 'config.json'}: unreadable ({e})") from e


def load_weights(module: nn.Module, path: Path) -> None:
    """Strict load: a missing file, a broken file, unknown/missing keys or shape mismatches are errors."""
    try:
        sd = load_file(str(path))
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"{path}: missing") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"{path}: corrupted safetensors file ({e})") from e
    own = module.state_dict()
    missing, unknown = own.keys() - sd.keys(), sd.keys() - own.keys()
    if missing or unknown:
        raise CorruptFileError(f"{path}: keys do not match the model (missing {sorted(missing)[:3]}, "
                               f"unknown {sorted(unknown)[:3]})")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise CorruptFileError(f"{path}: {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    module.load_state_dict(sd, strict=True)


def load_trainer_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        tensors = load_file(str(Path(ckpt) / "trainer_state.safetensors"))
        meta = json.loads((Path(ckpt) / "trainer_state.json").read_text())
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"{ckpt}: no trainer state to resume from") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"{ckpt}: corrupted trainer state ({e})") from e
    return tensors, meta
