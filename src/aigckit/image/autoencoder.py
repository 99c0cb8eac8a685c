"""A KL-regularised convolutional autoencoder with a *spatial* latent: the first stage of latent diffusion.

Stable Diffusion's AutoencoderKL in miniature (Rombach et al. 2022): an encoder maps an image x (C x H x W in [-1, 1])
to a posterior q(z|x) = N(μ, diag σ²) over a latent z of shape ``latent_channels x H/f x W/f`` (f = 2^(levels-1):
28x28x1 -> 4x7x7 and 32x32x3 -> 4x8x8 with the default three levels), a decoder maps z back to an image.

Loss per image = mean |x - x̂| (SD's pixel term; no perceptual or adversarial term here) + ``kl_weight`` · mean KL
(q(z|x) || N(0, I)) per latent element. The KL weight is small on purpose: the latents stay detailed (the decoder
reconstructs well) and the KL only keeps their scale bounded, as in SD (1e-6 on sums there).

Latent diffusion works on ``scale_factor · μ`` (``encode_latents``): the posterior mean (the cached latents are then
deterministic; with this KL weight σ is tiny anyway) times a factor that gives the training latents unit variance,
measured once on the training set and kept in the config as SD keeps its 0.18215. ``decode_latents`` undoes it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aigckit.errors import AigcError


@dataclass
class AutoencoderConfig:
    resolution: int = 28
    channels: int = 1  # image channels
    latent_channels: int = 4
    base: int = 32  # channels at full resolution
    mults: tuple[int, ...] = (1, 2, 2)  # channel multiplier per level; each level after the first halves the size
    num_res_blocks: int = 1
    groups: int = 8  # GroupNorm groups
    kl_weight: float = 1e-5
    scale_factor: float = 1.0  # latents for diffusion: scale_factor · μ (1/std of the training latents)

    def __post_init__(self) -> None:
        self.mults = tuple(int(m) for m in self.mults)
        if not self.mults:
            raise AigcError("mults must name at least one level")
        if self.resolution % self.factor:
            raise AigcError(f"resolution {self.resolution} is not divisible by the downsampling factor {self.factor}")
        if self.latent_channels < 1:
            raise AigcError(f"latent_channels must be >= 1, got {self.latent_channels}")
        if self.kl_weight < 0:
            raise AigcError(f"kl_weight must be >= 0, got {self.kl_weight}", param="kl_weight")
        if not 0 < self.scale_factor < 1e6:
            raise AigcError(f"scale_factor must be positive, got {self.scale_factor}")
        for m in self.mults:
            if (self.base * m) % self.groups:
                raise AigcError(f"channels {self.base * m} not divisible by {self.groups} GroupNorm groups")

    @property
    def factor(self) -> int:
        """Downsampling factor f: image H x W -> latent H/f x W/f."""
        return 2 ** (len(self.mults) - 1)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_resolution, self.latent_resolution)

    def to_dict(self) -> dict:
        return asdict(self)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1 when the width changes) skip; no timestep input."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class Encoder(nn.Module):
    """conv_in -> per level: ResBlocks, then a stride-2 conv (not after the last) -> mid ResBlock -> μ and log σ²."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.base
        self.conv_in = nn.Conv2d(cfg.channels, ch, 3, padding=1)
        self.blocks = nn.ModuleList()
        cur = ch
        for level, m in enumerate(cfg.mults):
            for _ in range(cfg.num_res_blocks):
                self.blocks.append(ResBlock(cur, ch * m, cfg.groups))
                cur = ch * m
            if level < len(cfg.mults) - 1:
                self.blocks.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
        self.mid = ResBlock(cur, cur, cfg.groups)
        self.norm_out = nn.GroupNorm(cfg.groups, cur)
        self.conv_out = nn.Conv2d(cur, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_in(x)
        for blk in self.blocks:
            h = blk(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    """conv_in -> mid ResBlock -> per level (deepest first): ResBlocks, then nearest x2 + conv (not after the
    first level) -> image."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.base
        cur = ch * cfg.mults[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, cur, 3, padding=1)
        self.mid = ResBlock(cur, cur, cfg.groups)
        self.blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.blocks.append(ResBlock(cur, ch * cfg.mults[level], cfg.groups))
                cur = ch * cfg.mults[level]
            if level > 0:
                self.blocks.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                                 nn.Conv2d(cur, cur, 3, padding=1)))
        self.norm_out = nn.GroupNorm(cfg.groups, cur)
        self.conv_out = nn.Conv2d(cur, cfg.channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for blk in self.blocks:
            h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N x C x H x W in [-1, 1]) -> (μ, log σ²), each N x latent_channels x H/f x W/f."""
        if tuple(x.shape[1:]) != (self.cfg.channels, self.cfg.resolution, self.cfg.resolution):
            raise AigcError(f"the autoencoder takes {self.cfg.channels} x {self.cfg.resolution} x "
                            f"{self.cfg.resolution} images, got {tuple(x.shape[1:])}")
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z -> the reconstruction (not clamped; the loss sees it as it is)."""
        return self.decoder(z)

    def loss(self, x: torch.Tensor, labels: None = None,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """'rec' = mean |x - x̂|, 'kl' = mean KL per latent element, 'loss' = rec + kl_weight · kl, and 'mse'
        (not optimised, for the logs); z = μ + σ·ε drawn with ``generator``. Unconditional: ``labels`` (the VAE's
        signature, so the two share a training step) must be None."""
        if labels is not None:
            raise AigcError("the autoencoder is unconditional; it takes no labels")
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator)
        x_hat = self.decode(z)
        rec = (x_hat - x).abs().mean()
        kl = 0.5 * torch.mean(mu.pow(2) + logvar.exp() - 1.0 - logvar)
        return {"loss": rec + self.cfg.kl_weight * kl, "rec": rec, "kl": kl,
                "mse": F.mse_loss(x_hat.detach(), x)}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x -> decode(μ(x)), clamped to [-1, 1]."""
        return self.decode(self.encode(x)[0]).clamp(-1, 1)

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the latents latent diffusion models: scale_factor · μ."""
        return self.encode(x)[0] * self.cfg.scale_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in [-1, 1]."""
        return self.decode(z / self.cfg.scale_factor).clamp(-1, 1)


@torch.no_grad()
def encode_all(ae: Autoencoder, images: torch.Tensor, batch_size: int = 500, progress: bool = False) -> torch.Tensor:
    """uint8 images (N x C x H x W) -> their posterior means μ, float32 (unscaled), in batches."""
    from tqdm import tqdm

    from aigckit.data.images import to_float

    ae.eval()
    out = [ae.encode(to_float(images[i:i + batch_size]))[0]
           for i in tqdm(range(0, len(images), batch_size), desc="encode latents", disable=not progress)]
    return torch.cat(out) if out else torch.zeros(0, *ae.cfg.latent_shape)


def latent_scale(mu: torch.Tensor) -> float:
    """1 / std of the latents (over every element), so that scale · μ has unit variance."""
    std = float(mu.double().std())
    if not math.isfinite(std) or std <= 0:
        raise AigcError(f"the autoencoder's latents have std {std}; it cannot be used for latent diffusion")
    return 1.0 / std


@torch.no_grad()
def reconstruction_metrics(ae: Autoencoder, images: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Reconstruction of uint8 images through decode(μ): MSE on [-1, 1] and PSNR (dB) on [0, 1] pixels
    (PSNR = 10 log10(1 / MSE_[0,1]) from the mean squared error over all images)."""
    from aigckit.data.images import to_float

    ae.eval()
    se, n = 0.0, 0
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size])
        se += float(((ae.reconstruct(x) - x) ** 2).double().sum())
        n += x.numel()
    mse = se / max(n, 1)
    return {"mse": mse, "psnr": 10 * math.log10(4.0 / mse) if mse > 0 else float("inf"), "images": len(images)}


def load_autoencoder(run, *, weights: str = "ema") -> tuple[Autoencoder, "Path"]:
    """An autoencoder run (``aigc image train --model autoencoder``; its newest intact checkpoint) or checkpoint
    folder -> (frozen model in eval mode, the weights file it was read from)."""
    from pathlib import Path

    from aigckit import checkpoints as ck

    if not Path(run).expanduser().exists():
        raise AigcError(f"no autoencoder run at {run}", param="vae")
    try:
        ckpt = ck.latest_checkpoint(run)
    except AigcError as e:
        raise AigcError(f"{run} is not an autoencoder run: {e}", param="vae") from None
    config = ck.read_config(ckpt)
    if config.get("family") != "autoencoder":
        raise AigcError(f"{run} is a {config.get('family', 'unknown')!r} run, not an autoencoder "
                        "(train one with `aigc image train --model autoencoder`)", param="vae")
    ae = Autoencoder(AutoencoderConfig(**config["model"]))
    path = ckpt / ("ema.safetensors" if weights == "ema" and (ckpt / "ema.safetensors").exists()
                   else "model.safetensors")
    ck.load_weights(ae, path)
    ae.eval()
    ae.requires_grad_(False)
    return ae, path
