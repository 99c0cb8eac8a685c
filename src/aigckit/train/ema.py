"""Exponential moving average of a model's weights (used for sampling): θ_ema <- d·θ_ema + (1-d)·θ.

With warm-up, d = min(decay, (1 + step) / (10 + step)): early on the average follows the model closely, so a short
run's EMA is not dominated by the random initial weights (0.999**300 would still weigh them at 74%)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model)
    ema.eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int | None = None) -> None:
    """Parameters are averaged; buffers (e.g. BatchNorm statistics) are copied. ``step``: warm-up (see above)."""
    if step is not None:
        decay = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)
