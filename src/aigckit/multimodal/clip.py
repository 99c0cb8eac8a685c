"""A CLIP-style image-text model in miniature (Radford et al. 2021): a small convolutional image encoder and the frozen
MiniLM text tower, each followed by a projection head into one shared space, trained with the symmetric contrastive
loss. Used for zero-shot classification, text -> image retrieval, CLIP-score and ranking candidate captions.

Text side: MiniLM's pooled sentence vector (``textcond.TextEncoder``; frozen, so training reads cached vectors)
-> 2-layer MLP head. Image side: conv stages -> global average pool -> linear. Both outputs are unit length;
similarity = cosine x exp(logit_scale) (learned temperature, clamped at 100 as in CLIP).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aigckit.errors import AigcError


@dataclass
class ClipConfig:
    resolution: int = 28
    channels: int = 1
    widths: tuple[int, ...] = (32, 64, 128)  # conv stage widths; each stage halves the image
    embed_dim: int = 128  # the shared space
    text_dim: int = 384  # the frozen text encoder's pooled vector
    text_encoder: str = "minilm-l6-v2"
    text_max_tokens: int = 32

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.channels not in (1, 3):
            raise AigcError(f"channels must be 1 or 3, got {self.channels}")
        if not self.widths or self.embed_dim < 1:
            raise AigcError("widths must be non-empty and embed_dim >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        layers, cin = [], cfg.channels
        for w in cfg.widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(), nn.AvgPool2d(2)]
            cin = w
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Linear(cin, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x).mean((2, 3)))


class ClipModel(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.image = ImageEncoder(cfg)
        self.text = nn.Sequential(nn.Linear(cfg.text_dim, 2 * cfg.embed_dim), nn.GELU(),
                                  nn.Linear(2 * cfg.embed_dim, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N x C x H x W) -> unit vectors N x embed_dim."""
        if x.shape[1] != self.cfg.channels:
            x = x.mean(1, keepdim=True) if self.cfg.channels == 1 else x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.cfg.resolution:
            x = F.interpolate(x, size=(self.cfg.resolution,) * 2, mode="bilinear", antialias=True)
        return F.normalize(self.image(x), dim=-1)

    def embed_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """The text encoder's pooled vectors (N x text_dim) -> unit vectors N x embed_dim."""
        return F.normalize(self.text(pooled.float()), dim=-1)

    def logits(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T

    def loss(self, x: torch.Tensor, pooled: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE: image i belongs with text i. ``same`` (N x N bool, optional) marks pairs whose captions
        are identical strings; those are not counted as negatives (template captions repeat within a batch)."""
        logits = self.logits(self.embed_images(x), self.embed_text(pooled))
        if same is not None:
            eye = torch.eye(len(x), dtype=torch.bool)
            logits = logits.masked_fill(same & ~eye, float("-inf"))
        target = torch.arange(len(x))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def zero_shot(model: ClipModel, images: torch.Tensor, class_pooled: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Predicted class per image: the class prompt (pooled text vectors, one per class) with the highest cosine."""
    with torch.no_grad():
        t = model.embed_text(class_pooled)
        return torch.cat([(model.embed_images(images[i:i + batch]) @ t.T).argmax(1)
                          for i in range(0, len(images), batch)])


def clip_score(model: ClipModel, images: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Cosine between each image and its own prompt (N images, N pooled prompt vectors), x 100 as in CLIPScore."""
    with torch.no_grad():
        return 100 * (model.embed_images(images) * model.embed_text(pooled)).sum(-1).clamp(min=0)


def load_clip(run) -> tuple[ClipModel, dict]:
    """A trained CLIP run (its newest intact checkpoint), a checkpoint folder, or a built-in name -> (model, config)."""
    from aigckit.multimodal.io import load_run

    return load_run(run, "clip", ClipConfig, ClipModel)