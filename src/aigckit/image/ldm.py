"""Latent diffusion (Rombach et al. 2022, the shape of Stable Diffusion): the diffusion model of ``diffusion.py`` run
on the latents of a frozen autoencoder (``autoencoder.py``) instead of on pixels.

    image x  --encoder-->  z_0 = scale_factor · μ(x)   (training only; the trainer caches the latents once)
    z_T ~ N(0, I)  --DDPM/DDIM + CFG, the UNet (cross-attention to the prompt)-->  z_0  --decoder-->  image

Everything between noise and z_0 is unchanged: the UNet, the schedules, ``ddpm_step`` / ``ddim_step`` and the guidance
loop in ``diffusion.sample`` work on tensors of any shape. Two differences, both hooks of ``DiffusionModel``:
x̂_0 is clipped at each step to the range of the training latents, [-latent_clip, latent_clip], instead of the
pixels' [-1, 1], and ``to_images`` decodes. The clip matters: with the cosine schedule ᾱ at t = T-1 is ~1e-9, so
the first DDIM step multiplies the error of ε̂ by sqrt(ᾱ_prev/ᾱ_t) ~ 1e3, and unclipped latents came out with a
standard deviation of ~1,500 (decoded: blobs).
One ``state_dict`` holds both networks (``unet.*`` and ``autoencoder.*``), so a checkpoint is a whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aigckit.errors import AigcError
from aigckit.image.autoencoder import Autoencoder, AutoencoderConfig
from aigckit.image.diffusion import DiffusionConfig, DiffusionModel


@dataclass
class LatentDiffusionConfig(DiffusionConfig):
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    latent_clip: float = 0.0  # sampling clamps x̂_0 to [-latent_clip, latent_clip] (max |z| of the training latents)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.autoencoder, dict):
            self.autoencoder = AutoencoderConfig(**self.autoencoder)
        if self.latent_clip < 0:
            raise AigcError(f"latent_clip must be >= 0, got {self.latent_clip}")
        ae, u = self.autoencoder, self.unet
        if (u.channels, u.resolution) != (ae.latent_channels, ae.latent_resolution):
            raise AigcError(f"the UNet works on {u.channels} x {u.resolution}^2 but the autoencoder's latents are "
                            f"{ae.latent_channels} x {ae.latent_resolution}^2")

    @property
    def resolution(self) -> int:  # of the images the model makes (the decoder's output)
        return self.autoencoder.resolution

    @property
    def channels(self) -> int:
        return self.autoencoder.channels


class LatentDiffusionModel(DiffusionModel):
    def __init__(self, cfg: LatentDiffusionConfig):
        super().__init__(cfg)
        self.clip_x0 = cfg.latent_clip or False  # the training latents' range (0: no clipping)
        self.autoencoder = Autoencoder(cfg.autoencoder)
        self.autoencoder.requires_grad_(False)  # frozen: trained first, only the UNet learns here

    def to_images(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_latents(z.float())

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the latents the UNet was trained on (scale_factor · μ)."""
        return self.autoencoder.encode_latents(x)
