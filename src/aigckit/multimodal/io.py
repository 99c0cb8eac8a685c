"""Image files -> model input: tensors in [-1, 1] at a model's resolution and channel count."""

from __future__ import annotations

from pathlib import Path

import torch

from aigckit.errors import AigcError


def read_images(paths: list[str | Path], resolution: int, channels: int) -> torch.Tensor:
    """PNG/JPEG files -> N x channels x resolution x resolution floats in [-1, 1] (grey or RGB, bilinear resize)."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB").resize((resolution, resolution), Image.BILINEAR)
                t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except FileNotFoundError as e:
            raise AigcError(f"image not found: {p}", param="image") from e
        except (UnidentifiedImageError, OSError) as e:
            raise AigcError(f"{p}: not a readable image ({e})", param="image") from e
        t = t.view(resolution, resolution, channels).permute(2, 0, 1)
        out.append(t.float().div(127.5).sub(1.0))
    return torch.stack(out)


def is_grey(path: str | Path) -> bool:
    """A greyscale image file (mode L/LA/1/I, or RGB with equal channels)?"""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("L", "LA", "1", "I", "I;16"):
                return True
            rgb = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8).view(-1, 3)
    except FileNotFoundError as e:
        raise AigcError(f"image not found: {path}", param="image") from e
    except OSError as e:
        raise AigcError(f"{path}: not a readable image ({e})", param="image") from e
    return bool((rgb.int().amax(1) - rgb.int().amin(1)).max() <= 8)


def run_config(run) -> tuple[Path, dict]:
    """A run (newest intact checkpoint), checkpoint folder or built-in name -> (checkpoint folder, its config)."""
    from aigckit import checkpoints as ck
    from aigckit import store

    if not Path(run).expanduser().exists() and store.builtin_path(run) is not None:
        run = store.builtin_path(run)
    ckpt = ck.latest_checkpoint(run)
    return ckpt, ck.read_config(ckpt)


def load_run(run, family: str, cfg_cls, model_cls):
    """A run (newest intact checkpoint), checkpoint folder or built-in name -> (model in eval mode, config);
    the config's family must be ``family``."""
    from aigckit import checkpoints as ck

    ckpt, config = run_config(run)
    if config.get("family") != family:
        raise AigcError(f"{ckpt}: not a {family} model (family {config.get('family')!r})")
    model = model_cls(cfg_cls(**config["model"]))
    ck.load_weights(model, ckpt / "model.safetensors")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config
