"""The Fashion-MNIST classifier whose feature space measures generated images (classifier-FID/KID).

Training is deterministic: weights from ``torch.manual_seed(seed)``, batch order and flips from a seeded generator,
fixed epochs and learning-rate schedule, a fixed thread count (results on CPU can depend on the thread count).
The result is stored atomically in the model store as ``fmnist-classifier`` (config.json + model.safetensors +
manifest.json with its sha256, seed, epochs and test accuracy); loading verifies the sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aigckit.errors import CorruptFileError, ModelNotFoundError

NAME = "fmnist-classifier"


@dataclass
class ClassifierConfig:
    channels: tuple[int, ...] = (32, 64, 128)
    features: int = 128  # size of the feature vector used for FID/KID
    num_classes: int = 10
    resolution: int = 28

    def to_dict(self) -> dict:
        return asdict(self)


class Classifier(nn.Module):
    """Three conv-BN-ReLU-maxpool stages (28 -> 14 -> 7 -> 3), a 128-d feature layer, a linear head."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        layers, cin = [], 1
        for c in cfg.channels:
            layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            cin = c
        self.conv = nn.Sequential(*layers)
        side = cfg.resolution
        for _ in cfg.channels:
            side //= 2
        self.fc = nn.Linear(cin * side * side, cfg.features)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(cfg.features, cfg.num_classes)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of any size / 1 or 3 channels -> 1 x 28 x 28 (grey, antialiased resize)."""
        if x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if x.shape[-1] != self.cfg.resolution or x.shape[-2] != self.cfg.resolution:
            x = F.interpolate(x, size=(self.cfg.resolution,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(self.prepare(x)).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@torch.no_grad()
def predict(model: Classifier, x: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (features N x F, predicted labels N) for images in [-1, 1]."""
    model.eval()
    feats, preds = [], []
    for i in range(0, x.shape[0], batch):
        f = model.features(x[i:i + batch].float())
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def train_classifier(*, seed: int = 0, epochs: int | None = None, threads: int = 2, force: bool = False,
                     progress: bool = True, batch_size: int = 128, lr: float = 2e-3, store_dir: Path | None = None,
                     limit: int | None = None) -> Path:
    """Train on the Fashion-MNIST train split, report test accuracy, store as ``fmnist-classifier``."""
    from tqdm import tqdm

    from aigckit import store
    from aigckit.data.images import load_dataset, to_float
    from aigckit.train import distributed as dd

    dest = Path(store_dir) if store_dir else store.models_dir() / NAME
    if (dest / "manifest.json").exists() and not force:
        return dest
    epochs = epochs or 8
    old_threads = torch.get_num_threads()
    with dd.session() as d:  # under torchrun: data-parallel, rank 0 evaluates and stores (train/distributed.py)
        torch.set_num_threads(threads)
        try:
            train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
            X, Y = train.images[:limit], train.labels[:limit]  # noqa: N806
            torch.manual_seed(seed)
            cfg = ClassifierConfig()
            model = Classifier(cfg)
            if d.rank:  # dropout masks differ per rank
                torch.manual_seed(dd.rank_seed(seed, d.rank))
            dd.broadcast_module(model, d)
            averager = dd.GradAverager(model, d)
            # the order and the flips are drawn for the global batch from one generator seeded alike on every rank;
            # rank r takes slice r (one process: the global batch is the batch, as it always was)
            gb = batch_size * d.world_size
            steps_per_epoch = X.shape[0] // gb
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
            gen = torch.Generator().manual_seed(seed + 1)
            mine = slice(d.rank * batch_size, (d.rank + 1) * batch_size)
            bar = tqdm(total=epochs * steps_per_epoch, desc="train classifier", disable=not progress or d.rank > 0)
            for _ in range(epochs):
                model.train()
                perm = torch.randperm(X.shape[0], generator=gen)
                for i in range(steps_per_epoch):
                    idx = perm[i * gb:(i + 1) * gb][mine]
                    x = to_float(X[idx])
                    flip = (torch.rand(gb, generator=gen) < 0.5)[mine]  # horizontal flips: clothes are symmetric
                    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
                    loss = F.cross_entropy(model(x), Y[idx], label_smoothing=0.05)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update(1)
                    if i % 50 == 0:
                        bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.close()
            averager.remove()
            if d.rank:
                dd.barrier(d, "waiting for rank 0 to store the classifier")
                return dest
            _, pred = predict(model, to_float(test.images))
            acc = (pred == test.labels).float().mean().item()
            per_class = [(pred[test.labels == c] == c).float().mean().item() for c in range(10)]
        finally:
            torch.set_num_threads(old_threads)
        meta = {"seed": seed, "epochs": epochs, "threads": threads, "batch_size": gb, "lr": lr,
                "train_images": int(X.shape[0]), "test_accuracy": round(acc, 4), "world_size": d.world_size,
                "test_accuracy_per_class": [round(a, 4) for a in per_class], "torch": torch.__version__}
        _store(model, cfg, meta, dest)
        dd.barrier(d, "waiting for rank 0 to store the classifier")
    if progress:
        print(f"test accuracy {acc:.4f}", flush=True)
    return dest


def _store(model: Classifier, cfg: ClassifierConfig, meta: dict, dest: Path) -> None:
    from safetensors.torch import save_file

    from aigckit import store

    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}-tmp-", dir=dest.parent))  # same filesystem: atomic rename
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stage / "model.safetensors"))
        (stage / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        sums = {f: store.sha256_file(stage / f) for f in ("config.json", "model.safetensors")}
        manifest = {"name": NAME, "source": "trained: aigc image train-classifier", "kind": "classifier",
                    "sha256": sums, "training": meta}
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2))
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old{os.getpid()}")
            os.replace(dest, old)
        os.replace(stage, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def load_classifier(path: Path | None = None) -> tuple[Classifier, dict]:
    """Load the stored classifier after checking its files' sha256 against its manifest."""
    from safetensors.torch import load_file

    from aigckit import store

    d = Path(path) if path else store.models_dir() / NAME
    if not (d / "manifest.json").exists():
        raise ModelNotFoundError(f"no Fashion-MNIST classifier in the store ({d}); run: aigc image train-classifier")
    manifest = json.loads((d / "manifest.json").read_text())
    for f, want in manifest["sha256"].items():
        got = store.sha256_file(d / f) if (d / f).exists() else None
        if got != want:
            raise CorruptFileError(f"{d / f}: sha256 {got} does not match the manifest ({want}); "
                                   f"retrain with: aigc image train-classifier --force")
    cfg = json.loads((d / "config.json").read_text())
    cfg["channels"] = tuple(cfg["channels"])
    model = Classifier(ClassifierConfig(**cfg))
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    model.eval()
    return model, manifest
