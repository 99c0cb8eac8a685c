"""Convolutional variational autoencoder (Kingma & Welling 2014), optionally class-conditional (CVAE).

Symbols: x the image with pixel intensities in [0, 1] (Bernoulli likelihood p(x|z), as in the classic MNIST VAE),
z ~ q(z|x) = N(μ, diag σ²) via the reparameterisation z = μ + σ·ε, prior p(z) = N(0, I).
Loss per image = reconstruction (-log p(x|z), nats) + β·KL(q(z|x) || p(z)); with β = 1 its mean is -ELBO.
Images enter and leave the public methods in [-1, 1] like every other image model here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aigckit.errors import AigcError


@dataclass
class VAEConfig:
    resolution: int = 28
    channels: int = 1
    latent_dim: int = 16
    hidden: int = 32  # channels after the first downsampling; doubles per level
    fc: int = 256
    num_classes: int = 0  # 0: unconditional
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution > 256:
            raise AigcError(f"VAE resolution must be in 8..256, got {self.resolution}")
        if self.beta < 0:
            raise AigcError(f"beta must be >= 0, got {self.beta}")

    @property
    def levels(self) -> list[int]:
        """Feature-map sizes after each stride-2 conv: halve while even and > 8 (28 -> 14, 7; 32 -> 16, 8)."""
        sizes, s = [], self.resolution
        while s % 2 == 0 and (not sizes or s > 8):
            s //= 2
            sizes.append(s)
        if not sizes:
            raise AigcError(f"VAE resolution {self.resolution} must be even")
        return sizes

    def to_dict(self) -> dict:
        return asdict(self)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        chans = [cfg.hidden * 2**i for i in range(len(cfg.levels))]
        enc, cin = [], cfg.channels
        for c in chans:
            enc += [nn.Conv2d(cin, c, 4, stride=2, padding=1), nn.SiLU()]
            cin = c
        self.encoder = nn.Sequential(*enc)
        self.s = cfg.levels[-1]
        flat = chans[-1] * self.s * self.s
        k = cfg.num_classes
        self.enc_fc = nn.Sequential(nn.Linear(flat + k, cfg.fc), nn.SiLU())
        self.mu = nn.Linear(cfg.fc, cfg.latent_dim)
        self.logvar = nn.Linear(cfg.fc, cfg.latent_dim)
        self.dec_fc = nn.Sequential(nn.Linear(cfg.latent_dim + k, cfg.fc), nn.SiLU(),
                                    nn.Linear(cfg.fc, flat), nn.SiLU())
        # each decoder layer also sees the label as constant one-hot channels, so samples follow the requested class
        self.decoder = nn.ModuleList()
        rev = chans[::-1]
        for i, c in enumerate(rev):
            cout = rev[i + 1] if i + 1 < len(rev) else cfg.channels
            self.decoder.append(nn.ConvTranspose2d(c + k, cout, 4, stride=2, padding=1))
        self._top = chans[-1]

    def _onehot(self, labels: torch.Tensor | None, n: int) -> torch.Tensor:
        if not self.cfg.num_classes:
            if labels is not None:
                raise AigcError("this VAE is unconditional; it takes no class")
            return torch.zeros(n, 0)
        if labels is None:
            raise AigcError("this VAE is class-conditional; give a class")
        return F.one_hot(labels, self.cfg.num_classes).float()

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] -> (μ, log σ²)."""
        h = self.encoder(x).flatten(1)
        h = self.enc_fc(torch.cat([h, self._onehot(labels, x.shape[0])], 1))
        return self.mu(h), self.logvar(h)

    def decode_logits(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        onehot = self._onehot(labels, z.shape[0])
        h = self.dec_fc(torch.cat([z, onehot], 1)).view(-1, self._top, self.s, self.s)
        for i, conv in enumerate(self.decoder):
            if self.cfg.num_classes:
                h = torch.cat([h, onehot[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])], 1)
            h = conv(h)
            if i + 1 < len(self.decoder):
                h = F.silu(h)
        return h

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z -> the mean of p(x|z), as an image in [-1, 1]."""
        return torch.sigmoid(self.decode_logits(z, labels)) * 2 - 1

    def loss(self, x: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None = None,
             beta: float | None = None) -> dict[str, torch.Tensor]:
        """Per-image means (nats): 'rec' = -log p(x|z), 'kl', 'loss' = rec + β·kl (= -ELBO when β = 1)."""
        mu, logvar = self.encode(x, labels)
        eps = torch.randn(mu.shape, generator=generator)
        z = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation
        logits = self.decode_logits(z, labels)
        target = (x + 1) / 2
        n = x.shape[0]
        rec = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / n
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / n
        b = self.cfg.beta if beta is None else beta
        return {"loss": rec + b * kl, "rec": rec, "kl": kl}

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Decode ``z ~ N(0, temperature^2 I)``; temperature < 1 trades variety for typical, cleaner samples."""
        z = torch.randn((n, self.cfg.latent_dim), generator=generator) * temperature
        return self.decode(z, labels)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, labels)[0], labels)

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 8,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the straight line between the posterior means of images a and b (each 1 x C x H x W)."""
        za, zb = self.encode(a, labels)[0], self.encode(b, labels)[0]
        w = torch.linspace(0, 1, steps).view(-1, 1)
        y = labels.expand(steps) if labels is not None else None
        return self.decode((1 - w) * za + w * zb, y)
