import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aigckit.data.images import class_index, load_dataset
from aigckit.errors import AigcError

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _folder(root: Path, labelled: bool) -> Path:
    rng = np.random.default_rng(0)
    for i in range(20):
        sub = root / (["cat", "dog"][i % 2] if labelled else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")
    return root


def test_labelled_folder_resized_grayscale(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    root = _folder(tmp_path / "imgs", labelled=True)
    ds = load_dataset(str(root), "train", resolution=16, channels=1)
    assert ds.images.shape == (18, 1, 16, 16) and ds.images.dtype.is_floating_point is False
    assert ds.class_names == ["cat", "dog"] and ds.labels is not None
    test = load_dataset(str(root), "test", resolution=16, channels=3)
    assert test.images.shape == (2, 3, 16, 16)
    # decoded once: a cache file exists and gives the same tensor
    assert list((tmp_path / "home" / "cache" / "datasets").glob("*.safetensors"))
    again = load_dataset(str(root), "train", resolution=16, channels=1)
    assert (again.images == ds.images).all()


def test_unlabelled_folder_via_file_url_and_zip(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    root = _folder(tmp_path / "imgs", labelled=False)
    ds = load_dataset(f"file://{root}", "train", resolution=8)
    assert ds.labels is None and ds.images.shape == (18, 3, 8, 8)
    zpath = tmp_path / "imgs.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(root.iterdir()):
            zf.write(p, f"data/{p.name}")
    dz = load_dataset(f"zip://data::{zpath}", "train", resolution=8)
    assert (dz.images == ds.images).all()


def test_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(AigcError, match="not found"):
        load_dataset(str(tmp_path / "nope"))


def test_class_names():
    names = ["t-shirt/top", "trouser", "sneaker"]
    assert class_index("Sneaker", names) == 2 and class_index("1", names) == 1 and class_index("top", names) == 0
    with pytest.raises(AigcError, match="known"):
        class_index("hat", names)


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_splits():
    tr, te = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test", resolution=32)
    assert tr.images.shape == (60000, 1, 28, 28) and tr.num_classes == 10
    assert te.images.shape == (10000, 1, 32, 32) and te.labels.shape == (10000,)
