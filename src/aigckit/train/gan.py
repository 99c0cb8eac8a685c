"""Training step of the DCGAN family: the classic alternating updates with BCE (non-saturating generator loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aigckit.image.dcgan import DCGAN, DCGANConfig
from aigckit.train.family import preset

PRESETS = {
    "tiny": dict(ngf=8, ndf=8, nz=16),
    "small": dict(ngf=64, ndf=64, nz=64),
    "base": dict(ngf=128, ndf=128, nz=100),
}


class Trainer:
    family = "dcgan"
    default_lr = 2e-4

    def default_resolution(self, args) -> int | None:
        return None

    def build(self, args, ds):
        p = preset(PRESETS, args.size, "dcgan", nz=args.latent_dim)
        cfg = DCGANConfig(resolution=ds.resolution, channels=ds.channels,
                          num_classes=ds.num_classes if args.conditional else 0, **p)
        return cfg, DCGAN(cfg)

    def optimizers(self, model, args):
        lr = args.lr or self.default_lr
        return {"generator": torch.optim.Adam(model.generator.parameters(), lr=lr, betas=(0.5, 0.999)),
                "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))}

    def step(self, model, opts, x, labels, gen) -> dict[str, float]:
        model.train()
        G, D = model.generator, model.discriminator  # noqa: N806
        n = x.shape[0]
        z = torch.randn((n, model.cfg.nz, 1, 1), generator=gen)
        fake = G(z, labels)
        ones, zeros = torch.ones(n), torch.zeros(n)
        # discriminator: maximise log D(x) + log(1 - D(G(z)))
        d_real, d_fake = D(x, labels), D(fake.detach(), labels)
        loss_d = F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_fake, zeros)
        opts["discriminator"].zero_grad(set_to_none=True)
        loss_d.backward()
        opts["discriminator"].step()
        # generator: maximise log D(G(z))
        g_out = D(fake, labels)
        loss_g = F.binary_cross_entropy_with_logits(g_out, ones)
        opts["generator"].zero_grad(set_to_none=True)
        loss_g.backward()
        opts["generator"].step()
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(),
                "d_real": torch.sigmoid(d_real).mean().item(), "d_fake": torch.sigmoid(d_fake).mean().item()}

    def grid(self, ema, args, labels, gen) -> torch.Tensor:
        ema.eval()
        n = args.grid_n if labels is None else labels.shape[0]
        return ema.sample(n, labels, generator=gen)
