"""Image datasets as one uint8 tensor in memory: Fashion-MNIST and folders of PNG/JPEG files.

A dataset argument is either ``fashion-mnist`` or an fsspec URL of a folder (a plain path, ``file://``,
``zip://*::a.zip``, ``http(s)://`` and ``s3://`` when the matching fsspec backend is installed). Images are decoded
once into a ``N x C x H x W`` uint8 tensor (kept per process, and for folders also cached on disk under the store's
cache), so epochs never re-decode files.

Folders: images directly in the folder are unlabelled; one sub-folder per class gives labels (class names = folder
names, sorted). A folder with ``train/`` and ``test/`` sub-folders provides those splits; otherwise every tenth file
(in sorted order) is held out as the test split.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from aigckit.data.idx import parse_idx
from aigckit.errors import AigcError, CorruptFileError

FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor | None  # int64, N (None: unlabelled)
    class_names: list[str] = field(default_factory=list)
    name: str = ""

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.labels is not None else 0

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def class_index(name_or_index: str | int, class_names: list[str]) -> int:
    """'sneaker', 'Sneaker' or '7' -> 7; raises with the known names otherwise."""
    s = str(name_or_index).strip().lower()
    if s.lstrip("-").isdigit():
        i = int(s)
        if not 0 <= i < len(class_names):
            raise AigcError(f"class index {i} out of range 0..{len(class_names) - 1}")
        return i
    names = [c.lower() for c in class_names]
    for i, c in enumerate(names):
        if s == c or s in c.split("/"):
            return i
    raise AigcError(f"unknown class {name_or_index!r}; known: {', '.join(class_names)}")


def load_dataset(spec: str, split: str = "train", resolution: int | None = None,
                 channels: int | None = None) -> ImageDataset:
    """Load ``fashion-mnist`` or an image folder URL as uint8 tensors, resized to ``resolution`` (square)."""
    if split not in ("train", "test"):
        raise AigcError(f"split must be 'train' or 'test', got {split!r}")
    if spec in ("fashion-mnist", "fmnist", "fashion_mnist"):
        ds = _fashion_mnist(split, os.environ.get("AIGC_FASHION_MNIST", FASHION_MNIST_ROOT))
    elif spec.startswith("fashion-mnist:"):
        ds = _fashion_mnist(split, spec.split(":", 1)[1])
    else:
        ds = _folder(spec, split, resolution or 0, channels or 0)
    return _conform(ds, resolution, channels)


# ------------------------------------------------------------------------------------------------ Fashion-MNIST


@lru_cache(maxsize=4)
def _fashion_mnist(split: str, root: str) -> ImageDataset:
    import fsspec

    prefix = "train" if split == "train" else "t10k"
    arrays = {}
    for kind, fname in (("images", f"{prefix}-images-idx3-ubyte.gz"), ("labels", f"{prefix}-labels-idx1-ubyte.gz")):
        url = root.rstrip("/") + "/" + fname
        try:
            with fsspec.open(url, "rb") as f:
                arrays[kind] = parse_idx(f.read(), url)
        except FileNotFoundError as e:
            raise AigcError(
                f"Fashion-MNIST not found at {url}; install it with: apt-get install dataset-fashion-mnist"
            ) from e
    imgs, labels = arrays["images"], arrays["labels"]
    if imgs.ndim != 3 or labels.ndim != 1 or imgs.shape[0] != labels.shape[0]:
        raise CorruptFileError(f"Fashion-MNIST {split}: images {imgs.shape} and labels {labels.shape} do not match")
    images = torch.from_numpy(imgs.copy()).unsqueeze(1)  # N x 1 x 28 x 28
    return ImageDataset(images, torch.from_numpy(labels.astype(np.int64)), list(FASHION_MNIST_CLASSES),
                        name="fashion-mnist")


# ------------------------------------------------------------------------------------------------ image folders


def _folder(url: str, split: str, resolution: int, channels: int) -> ImageDataset:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise AigcError(f"cannot open data location {url!r}: {e}") from e
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise AigcError(f"data directory not found: {url}")
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
    rels = [p[len(root):].lstrip("/") for p in files]
    if rels and all(r.split("/", 1)[0] in ("train", "test") for r in rels):
        keep = [(p, r.split("/", 1)[1]) for p, r in zip(files, rels) if r.split("/", 1)[0] == split]
    else:
        keep = [(p, r) for i, (p, r) in enumerate(zip(files, rels)) if (i % 10 == 9) == (split == "test")]
    if not keep:
        raise AigcError(f"no images (.png/.jpg) for split {split!r} in {url}")
    labelled = all(r.count("/") == 1 for _, r in keep)
    class_names = sorted({r.split("/", 1)[0] for _, r in keep}) if labelled else []
    key = hashlib.sha256(repr((url, split, resolution, channels,
                               [(p, fs.size(p)) for p, _ in keep])).encode()).hexdigest()[:24]
    cached = _read_cache(key)
    if cached is None:
        from PIL import Image
        from tqdm import tqdm

        arrs = []
        for p, _ in tqdm(keep, desc="decode images", unit="img", leave=False, disable=len(keep) < 2000):
            try:
                with fs.open(p, "rb") as f:
                    im = Image.open(io.BytesIO(f.read()))
                    im.load()
            except Exception as e:  # noqa: BLE001 - any decoder error is a bad file
                raise CorruptFileError(f"{p}: cannot decode image ({e})") from e
            arrs.append(_prepare(im, resolution, channels))
        first = arrs[0].shape
        if any(a.shape != first for a in arrs):
            raise AigcError(f"images in {url} differ in size; pass a resolution to resize them")
        cached = torch.from_numpy(np.stack(arrs))
        _write_cache(key, cached)
    labels = torch.tensor([class_names.index(r.split("/", 1)[0]) for _, r in keep]) if labelled else None
    return ImageDataset(cached, labels, class_names, name=url)


def _prepare(im, resolution: int, channels: int) -> np.ndarray:
    """PIL image -> C x H x W uint8: mode by channels (1 = L, 3 = RGB), centre-crop to square, resize."""
    from PIL import Image

    if channels == 0:
        channels = 1 if im.mode in ("L", "LA", "1", "I", "I;16") else 3
    im = im.convert("L" if channels == 1 else "RGB")
    if resolution:
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != resolution:
            im = im.resize((resolution, resolution), Image.BICUBIC)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy()


def _cache_path(key: str):
    from aigckit import store

    return store.cache_dir("datasets") / f"{key}.safetensors"


def _read_cache(key: str) -> torch.Tensor | None:
    p = _cache_path(key)
    if not p.exists():
        return None
    from safetensors.torch import load_file

    try:
        return load_file(str(p))["images"]
    except Exception:  # noqa: BLE001 - a broken cache file is just re-decoded
        return None


def _write_cache(key: str, images: torch.Tensor) -> None:
    from safetensors.torch import save_file

    p = _cache_path(key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    save_file({"images": images.contiguous()}, str(tmp))
    os.replace(tmp, p)


# ------------------------------------------------------------------------------------------------ conform


def _conform(ds: ImageDataset, resolution: int | None, channels: int | None) -> ImageDataset:
    """Resize (bilinear, antialiased) and convert channels of an in-memory dataset when the model needs it."""
    x = ds.images
    if channels and channels != x.shape[1]:
        if channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        elif channels == 1 and x.shape[1] == 3:
            x = (x.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = x.round().clamp(0, 255).to(torch.uint8)
        else:
            raise AigcError(f"cannot convert {x.shape[1]} channels to {channels}")
    if resolution and resolution != x.shape[-1]:
        if resolution < 8 or resolution > 512:
            raise AigcError(f"resolution must be in 8..512, got {resolution}")
        x = torch.nn.functional.interpolate(x.float(), size=(resolution, resolution), mode="bilinear",
                                            antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    if x is ds.images:
        return ds
    return ImageDataset(x, ds.labels, ds.class_names, ds.name)
