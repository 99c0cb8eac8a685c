"""What the shared training loop (``train/loop.py``) asks of a model family, and the preset lookup they share.

Each family file (``train/diffusion.py``, ``train/vae.py``, ``train/gan.py``) defines a ``Trainer`` class with these
members; the loop owns data order, EMA, checkpoints, metrics and grids, the family only its model and its step.
Optional members the loop uses when a family has them: ``dataset(args)`` (its own data, e.g. captioned images),
``inputs(idx)`` (the batch for the data indices ``idx`` instead of the images: ldm's cached latents),
``run_info()`` (extra config.json entries) and ``grid_nrow``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from aigckit.errors import AigcError


class FamilyTrainer(Protocol):
    family: str  # "ddpm" | "vae" | "dcgan": the name written into the run's config.json
    default_lr: float  # used when --lr is not given

    def default_resolution(self, args) -> int | None:
        """Image size when --resolution is not given (None: the data's own)."""

    def build(self, args, ds) -> tuple[Any, nn.Module]:
        """(config dataclass, model) for the data set ``ds``; called after ``torch.manual_seed(args.seed)``."""

    def optimizers(self, model: nn.Module, args) -> dict[str, torch.optim.Optimizer]:
        """Named optimisers; the names key their state in the checkpoints."""

    def step(self, model: nn.Module, opts: dict[str, torch.optim.Optimizer], x: torch.Tensor,
             labels: torch.Tensor | None, gen: torch.Generator) -> dict[str, float]:
        """One optimiser step on the batch ``x`` (N x C x H x W in [-1, 1]); all noise from ``gen``; returns losses."""

    def grid(self, ema: nn.Module, args, labels: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
        """Images in [-1, 1] for the periodic sample grid: one per label, or ``args.grid_n`` when unconditional."""


def preset(presets: dict[str, dict[str, Any]], size: str, family: str, **overrides: Any) -> dict[str, Any]:
    """A copy of ``presets[size]`` with the ``overrides`` that are not None; an unknown size lists the known ones."""
    if size not in presets:
        raise AigcError(f"unknown size {size!r} for {family}; known: {', '.join(presets)}")
    return {**presets[size], **{k: v for k, v in overrides.items() if v is not None}}
