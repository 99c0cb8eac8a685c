"""Writing crash-safe, self-describing checkpoints (the read side, and the layout, are in ``aigckit.checkpoints``).

``save_checkpoint`` writes every file into a hidden temporary folder, then ``checksums.json`` (size and sha256 of each
file) last, fsyncs, and renames the folder into place: a crash at any moment leaves either the previous checkpoints
or the new complete one, and later damage is caught by ``checkpoints.verify_checkpoint``. Leftover temporary folders
are ignored by readers and cleaned up by the next save. Never pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from aigckit.checkpoints import (  # noqa: F401  (the read side, re-exported for the trainers)
    CHECKSUMS, CKPT_DIR, PREFIX, atomic_write_text, checksums, latest_checkpoint, list_checkpoints,
    load_trainer_state, load_weights, read_config, verify_checkpoint,
)
from aigckit.errors import CorruptFileError


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
    """Write checkpoint ``step`` atomically, with checksums; keep the newest ``keep`` checkpoints. Returns its
    folder."""
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
        names = sorted(f.name for f in tmp.iterdir())
        (tmp / CHECKSUMS).write_text(json.dumps(checksums(tmp, names), indent=2))  # last: covers all the others
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
