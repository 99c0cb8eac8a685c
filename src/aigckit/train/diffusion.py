"""Training step of the diffusion family (DDPM objective, ε- or v-prediction, label dropout for CFG)."""

from __future__ import annotations

import torch

from aigckit.image.diffusion import DiffusionConfig, DiffusionModel, sample
from aigckit.image.unet import UNetConfig
from aigckit.train.family import preset

# UNet size presets: "tiny" is for tests, "small" for 30 CPU-minutes, "base" for longer runs.
PRESETS = {
    "tiny": dict(base=8, mults=(1, 2), num_res_blocks=1, attn_levels=(1,), groups=4),
    # the text-to-image default's UNet (train/t2i.py adds cross-attention), here for a like-for-like class-conditional
    "mini": dict(base=16, mults=(1, 2, 2), num_res_blocks=1, attn_levels=(2,), groups=8),
    "small": dict(base=32, mults=(1, 2, 2), num_res_blocks=1, attn_levels=(2,), groups=8),
    "base": dict(base=64, mults=(1, 2, 2), num_res_blocks=2, attn_levels=(2,), groups=8),
}


class Trainer:
    family = "ddpm"
    default_lr = 2e-4

    def default_resolution(self, args) -> int | None:
        return None  # the data's own (28 for Fashion-MNIST)

    def build(self, args, ds):
        unet = UNetConfig(resolution=ds.resolution, channels=ds.channels,
                          num_classes=ds.num_classes if args.conditional else 0, **preset(PRESETS, args.size, "ddpm"))
        cfg = DiffusionConfig(unet=unet, timesteps=args.timesteps, schedule=args.schedule,
                              prediction=args.prediction, label_dropout=args.label_dropout,
                              min_snr_gamma=args.min_snr_gamma)
        return cfg, DiffusionModel(cfg)

    def optimizers(self, model, args):
        return {"model": torch.optim.AdamW(model.parameters(), lr=args.lr or self.default_lr, weight_decay=0.0)}

    def step(self, model, opts, x, labels, gen) -> dict[str, float]:
        model.train()
        return self.update(model, opts, model.loss(x, labels, gen))

    def update(self, model, opts, loss) -> dict[str, float]:
        """One optimiser step on ``loss`` (gradient norm clipped at 1)."""
        opt = opts["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item()}

    def grid(self, ema, args, labels, gen) -> torch.Tensor:
        ema.eval()
        n = args.grid_n if labels is None else labels.shape[0]
        return sample(ema, n, labels=labels, guidance=3.0 if labels is not None else 1.0, sampler="ddim",
                      steps=min(args.grid_steps, ema.cfg.timesteps), eta=0.0, generator=gen)
