"""Image tensors -> PIL images, sample grids, and PNG files carrying their generation parameters as text chunks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from aigckit.data.images import to_uint8


def to_pil(x: torch.Tensor) -> list:
    """Float images in [-1, 1] (N x C x H x W) -> PIL images (mode L or RGB)."""
    from PIL import Image

    u = to_uint8(x.detach().cpu())
    out = []
    for img in u:
        a = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        out.append(Image.fromarray(a, mode="L" if img.shape[0] == 1 else "RGB"))
    return out


def make_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2):
    """Images in [-1, 1] -> one PIL image, ``nrow`` per row (default: square-ish), ``pad`` pixels apart."""
    from PIL import Image

    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = Image.new("L" if c == 1 else "RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad), 0)
    for i, im in enumerate(to_pil(x)):
        grid.paste(im, (pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + pad)))
    return grid


# Optional hooks, empty unless aigckit.trust.provenance.install() adds them (the CLI and the server do): each
# PIXEL_HOOKS entry maps (PIL image, metadata) -> PIL image before encoding (the invisible watermark; it may add
# metadata items), each FILE_HOOKS entry (PNG bytes, metadata) -> PNG bytes after (the signed C2PA manifest).
PIXEL_HOOKS: list = []
FILE_HOOKS: list = []


def encode_png(image, metadata: dict | None = None) -> bytes:
    """A PIL image as PNG bytes with each metadata item as a tEXt chunk (values JSON-encoded unless strings)."""
    import io

    from PIL.PngImagePlugin import PngInfo

    metadata = dict(metadata or {})
    for hook in PIXEL_HOOKS:
        image = hook(image, metadata)
    info = PngInfo()
    for k, v in metadata.items():
        info.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    info.add_text("software", "aigckit")
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    data = buf.getvalue()
    for hook in FILE_HOOKS:
        data = hook(data, metadata)
    return data


def save_png(image, path: str | Path, metadata: dict | None = None) -> Path:
    """``encode_png`` to a file, written to a temporary name and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(encode_png(image, metadata))
    os.replace(tmp, path)
    return path


def read_png_metadata(path: str | Path) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as im:
        return dict(getattr(im, "text", {}) or {})
