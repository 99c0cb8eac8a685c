"""A noise-free family for the data-parallel tests: linear regression of each image's mean from its pixels.

With no training noise, a 2-rank run and a 1-process run with the doubled batch take the same steps (up to the order
of float sums), so their losses and weights can be compared closely."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ToyConfig:
    n: int

    def to_dict(self) -> dict:
        return {"n": self.n}


class Toy(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.lin = nn.Linear(cfg.n, 1)


class Trainer:
    family = "toy"
    default_lr = 0.05

    def default_resolution(self, args):
        return None

    def build(self, args, ds):
        cfg = ToyConfig(ds.channels * ds.resolution * ds.resolution)
        return cfg, Toy(cfg)

    def optimizers(self, model, args):
        return {"model": torch.optim.Adam(model.parameters(), lr=args.lr or self.default_lr)}

    def step(self, model, opts, x, labels, gen):
        loss = ((model.lin(x.flatten(1)).squeeze(1) - x.mean(dim=(1, 2, 3))) ** 2).mean()
        opts["model"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # clipping must see the averaged gradients
        opts["model"].step()
        return {"loss": loss.item()}

    def grid(self, ema, args, labels, gen):
        n = args.grid_n if labels is None else labels.shape[0]
        return torch.zeros(n, 1, 8, 8)
