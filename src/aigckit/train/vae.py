"""Training step of the VAE family: minimise reconstruction + β·KL with Adam."""

from __future__ import annotations

import torch

from aigckit.image.vae import VAE, VAEConfig
from aigckit.train.family import preset

PRESETS = {
    "tiny": dict(hidden=8, fc=32, latent_dim=4),
    "small": dict(hidden=32, fc=256, latent_dim=16),
    "base": dict(hidden=64, fc=512, latent_dim=32),
}


class Trainer:
    family = "vae"
    default_lr = 1e-3

    def default_resolution(self, args) -> int | None:
        return None

    def build(self, args, ds):
        p = preset(PRESETS, args.size, "vae", latent_dim=args.latent_dim)
        cfg = VAEConfig(resolution=ds.resolution, channels=ds.channels, beta=args.beta,
                        num_classes=ds.num_classes if args.conditional else 0, **p)
        return cfg, VAE(cfg)

    def optimizers(self, model, args):
        return {"model": torch.optim.Adam(model.parameters(), lr=args.lr or self.default_lr)}

    def step(self, model, opts, x, labels, gen) -> dict[str, float]:
        model.train()
        out = model.loss(x, labels, gen)
        opt = opts["model"]
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return {k: v.item() for k, v in out.items()}

    def grid(self, ema, args, labels, gen) -> torch.Tensor:
        ema.eval()
        n = args.grid_n if labels is None else labels.shape[0]
        return ema.sample(n, labels, generator=gen)
