"""Self-describing, crash-safe checkpoints. Never pickle.

A run folder holds ``checkpoints/step-NNNNNNNNN/`` folders, each complete on its own::

    config.json                 family, model config, training arguments, class names
    model.safetensors           the trained weights
    ema.safetensors             EMA weights (used for sampling), when kept
    trainer_state.safetensors   optimiser tensors ("opt.NAME.state.I.KEY") and RNG states ("rng.*")
    trainer_state.json          step, images seen, elapsed time, optimiser param groups and scalar state

A checkpoint is written into a hidden temporary folder beside the others and renamed into place, so a crash at any
moment leaves either the previous checkpoints or the new complete one - never half of one. The newest folder whose
name parses is the latest checkpoint; leftover temporary folders are ignored and cleaned up by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from aigckit.errors import CorruptFileError, ModelNotFoundError

CKPT_DIR = "checkpoints"
PREFIX = "step-"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def optimizer_to_flat(opts: dict[str, torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimisers -> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, opt in opts.items():
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"opt.{name}.state.{pid}.{k}"] = v.detach().clone().contiguous()
                else:
                    scalars.setdefault(str(pid), {})[k] = v
        meta[name] = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def optimizer_from_flat(opts: dict[str, torch.optim.Optimizer], tensors: dict[str, torch.Tensor], meta: dict) -> None:
    for name, opt in opts.items():
        if name not in meta:
            raise CorruptFileError(f"checkpoint has no state for optimiser {name!r}")
        state: dict[int, dict[str, Any]] = {}
        prefix = f"opt.{name}.state."
        for key, v in tensors.items():
            if key.startswith(prefix):
                pid, k = key[len(prefix):].split(".", 1)
                state.setdefault(int(pid), {})[k] = v
        for pid, sc in meta[name]["scalars"].items():
            state.setdefault(int(pid), {}).update(sc)
        opt.load_state_dict({"state": state, "param_groups": meta[name]["param_groups"]})


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: str | Path, *, step: int, config: dict, model: nn.Module, ema: nn.Module | None = None,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None,
                    rng: dict[str, torch.Tensor] | None = None, state: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints. Returns its folder."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(_state(model), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(_state(ema), str(tmp / "ema.safetensors"))
        tensors, opt_meta = optimizer_to_flat(optimizers or {})
        for k, v in (rng or {}).items():
            tensors[f"rng.{k}"] = v.contiguous()
        save_file(tensors, str(tmp / "trainer_state.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "optimizers": opt_meta, **(state or {})},
                                                           indent=2))
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run: str | Path) -> Path:
    """A run folder -> its newest checkpoint folder; a checkpoint folder -> itself."""
    p = Path(run).expanduser()
    if (p / "config.json").exists() and (p / "model.safetensors").exists():
        return p
    if not p.exists():
        raise ModelNotFoundError(f"run not found: {p}")
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise ModelNotFoundError(f"{p}: no checkpoint yet (expected {CKPT_DIR}/{PREFIX}*/)")
    return ckpts[-1]


def read_config(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{ckpt / 'config.json'}: unreadable ({e})") from e


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
        tensors = load_file(str(ckpt / "trainer_state.safetensors"))
        meta = json.loads((ckpt / "trainer_state.json").read_text())
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"{ckpt}: no trainer state to resume from") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"{ckpt}: corrupted trainer state ({e})") from e
    return tensors, meta
