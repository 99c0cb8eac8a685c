"""DCGAN (Radford et al. 2016): transposed-conv generator, conv discriminator, BCE loss, N(0, 0.02) init.

Generator: z (N x nz x 1 x 1) [+ label embedding] -> image in [-1, 1] (tanh). Discriminator: image [+ label map as an
extra channel] -> one logit per image. Sizes 28 (7 -> 14 -> 28), 32 (4 -> 8 -> 16 -> 32) and 64 (4 -> ... -> 64).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from aigckit.errors import AigcError


@dataclass
class DCGANConfig:
    resolution: int = 28
    channels: int = 1
    nz: int = 64
    ngf: int = 64
    ndf: int = 64
    num_classes: int = 0
    label_dim: int = 16  # generator's label embedding size (conditional only)

    def __post_init__(self) -> None:
        if self.resolution not in (28, 32, 64):
            raise AigcError(f"DCGAN resolution must be 28, 32 or 64, got {self.resolution}")

    def to_dict(self) -> dict:
        return asdict(self)


def dcgan_init(m: nn.Module) -> None:
    """Weights N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0 (the DCGAN paper's recipe)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        self.cfg = cfg
        g = cfg.ngf
        cin = cfg.nz + (cfg.label_dim if cfg.num_classes else 0)
        self.label_emb = nn.Embedding(cfg.num_classes, cfg.label_dim) if cfg.num_classes else None
        if cfg.resolution == 28:  # 1 -> 7 -> 14 -> 28
            chans, first = [g * 2, g], (7, 1, 0)
        elif cfg.resolution == 32:  # 1 -> 4 -> 8 -> 16 -> 32
            chans, first = [g * 4, g * 2, g], (4, 1, 0)
        else:  # 1 -> 4 -> 8 -> 16 -> 32 -> 64
            chans, first = [g * 8, g * 4, g * 2, g], (4, 1, 0)
        layers = [nn.ConvTranspose2d(cin, chans[0], *first, bias=False), nn.BatchNorm2d(chans[0]), nn.ReLU(True)]
        for a, b in zip(chans, chans[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(chans[-1], cfg.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.label_emb is not None:
            if labels is None:
                raise AigcError("this GAN is class-conditional; give a class")
            z = torch.cat([z, self.label_emb(labels)[:, :, None, None]], 1)
        elif labels is not None:
            raise AigcError("this GAN is unconditional; it takes no class")
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.ndf
        r = cfg.resolution
        self.label_map = nn.Embedding(cfg.num_classes, r * r) if cfg.num_classes else None
        cin = cfg.channels + (1 if cfg.num_classes else 0)
        chans = {28: [d, d * 2], 32: [d, d * 2, d * 4], 64: [d, d * 2, d * 4, d * 8]}[r]
        layers = [nn.Conv2d(cin, chans[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for a, b in zip(chans, chans[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, True)]
        k = 7 if r == 28 else 4
        layers += [nn.Conv2d(chans[-1], 1, k, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.label_map is not None:
            m = self.label_map(labels).view(-1, 1, self.cfg.resolution, self.cfg.resolution)
            x = torch.cat([x, m], 1)
        return self.net(x).view(-1)  # logits


class DCGAN(nn.Module):
    """Both networks in one module, so one checkpoint holds the pair."""

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        self.cfg = cfg
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)
        self.apply(dcgan_init)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Generate from ``z ~ N(0, temperature^2 I)`` (temperature < 1: the 'truncation trick' in its simplest form)."""
        z = torch.randn((n, self.cfg.nz, 1, 1), generator=generator) * temperature
        return self.generator(z, labels)

    @torch.no_grad()
    def interpolate(self, z_a: torch.Tensor, z_b: torch.Tensor, steps: int = 8,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """Spherical interpolation between two latents (each 1 x nz x 1 x 1); Gaussian latents live near a sphere."""
        a, b = z_a.flatten(), z_b.flatten()
        omega = torch.arccos((a / a.norm()).dot(b / b.norm()).clamp(-1, 1))
        w = torch.linspace(0, 1, steps)
        if omega.abs() < 1e-6:
            zs = (1 - w)[:, None] * a + w[:, None] * b
        else:
            zs = (torch.sin((1 - w) * omega)[:, None] * a + torch.sin(w * omega)[:, None] * b) / torch.sin(omega)
        y = labels.expand(steps) if labels is not None else None
        return self.generator(zs.view(steps, -1, 1, 1), y)
