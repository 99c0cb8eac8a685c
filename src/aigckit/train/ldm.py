"""Training of text-to-image latent diffusion (``aigc image train --model ldm --condition text``).

Two stages, as Stable Diffusion:

1. The autoencoder (``image/autoencoder.py``): given with ``--vae RUN`` (an ``aigc image train --model autoencoder``
   run on images of the same size), or trained first for ``--vae-steps`` steps into ``RUN/autoencoder/`` (a run of
   its own: checkpoints, metrics, reconstruction grids; killed midway, the next start of the same command resumes
   it). Then frozen: its reconstruction MSE/PSNR on test images goes into the run's config.json.
2. The training images are encoded once (posterior means, cached in ``RUN/latents.safetensors`` keyed by the
   autoencoder's weights), scaled to unit variance (the factor is kept in the model config, with the latents'
   range that sampling clips x̂_0 to), and the text-to-image
   trainer of ``train/t2i.py`` runs on them unchanged: caption sampling, caption dropout, the UNet with
   cross-attention, EMA, checkpoints, bit-for-bit resume. Only the UNet is optimised; the checkpoints hold both
   networks, so a run samples (decodes) like a pixel-space one.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from aigckit import checkpoints as ck
from aigckit.errors import AigcError
from aigckit.image.autoencoder import encode_all, latent_scale, load_autoencoder, reconstruction_metrics
from aigckit.image.ldm import LatentDiffusionConfig, LatentDiffusionModel
from aigckit.image.unet import UNetConfig
from aigckit.train.family import preset
from aigckit.train.t2i import Trainer as TextToImageTrainer
from aigckit.train.t2i import caption_data

# the UNet on 4 x 7 x 7 (Fashion-MNIST) or 4 x 8 x 8 (shapes) latents: one level (7 does not halve), self- and
# cross-attention over all 49/64 positions
PRESETS = {
    "tiny": dict(base=8, mults=(1,), num_res_blocks=1, attn_levels=(0,), groups=4, cross_levels=(0,)),
    "mini": dict(base=32, mults=(1,), num_res_blocks=2, attn_levels=(0,), groups=8, cross_levels=(0,)),
    "small": dict(base=64, mults=(1,), num_res_blocks=2, attn_levels=(0,), groups=8, cross_levels=(0,)),
    "base": dict(base=128, mults=(1,), num_res_blocks=2, attn_levels=(0,), groups=8, cross_levels=(0,)),
}
AUTOENCODER_SIZE = {"tiny": "tiny"}  # the autoencoder preset an ldm size trains first (default: "small")
LATENT_CACHE = "latents.safetensors"
RECON_TEST_IMAGES = 2000  # test images the frozen autoencoder's reconstruction is measured on


class Trainer(TextToImageTrainer):
    family = "ldm"

    def __init__(self) -> None:
        super().__init__()
        self.latents: torch.Tensor | None = None
        self.info: dict = {}

    def build(self, args, ds):
        ae, weights = self.first_stage(args, ds)
        mu = self.cached_latents(Path(args.out), ae, weights, ds)
        ae_cfg = replace(ae.cfg, scale_factor=latent_scale(mu))
        self.latents = mu * ae_cfg.scale_factor
        torch.manual_seed(args.seed)  # the UNet's initial weights: the same whether stage 1 ran now or before
        enc = self.prepare_text(args)
        unet = UNetConfig(resolution=ae_cfg.latent_resolution, channels=ae_cfg.latent_channels, context_dim=enc.dim,
                          **preset(PRESETS, args.size, "ldm"))
        cfg = LatentDiffusionConfig(unet=unet, autoencoder=ae_cfg, latent_clip=float(self.latents.abs().max()),
                                    **self.diffusion_options(args))
        model = LatentDiffusionModel(cfg)
        model.autoencoder.load_state_dict(ae.state_dict())
        test = caption_data(args.data, "test", args.seed)[0].images[:RECON_TEST_IMAGES]
        self.info = {"autoencoder": {"weights": str(weights), "scale_factor": ae_cfg.scale_factor,
                                     "latent_shape": list(ae_cfg.latent_shape),
                                     "test_reconstruction": reconstruction_metrics(ae, test)}}
        return cfg, model

    def first_stage(self, args, ds):
        """The frozen autoencoder: ``--vae RUN``, or RUN/autoencoder trained (or resumed) to ``vae_steps``."""
        if args.vae:
            ae, weights = load_autoencoder(args.vae)
        else:
            from aigckit.train.loop import TrainArgs, train

            run = Path(args.out) / "autoencoder"
            have = ck.list_checkpoints(run)
            if not have or int(have[-1].name.split("-")[-1]) < args.vae_steps:
                train(TrainArgs(model="autoencoder", out=str(run), data=args.data, steps=args.vae_steps,
                                batch_size=args.batch_size, seed=args.seed, size=AUTOENCODER_SIZE.get(args.size, "small"),
                                kl_weight=args.kl_weight, threads=args.threads, log_every=args.log_every,
                                ckpt_every=args.ckpt_every, sample_every=max(args.vae_steps, 1)),
                      resume=bool(have), progress=sys.stderr.isatty())
            ae, weights = load_autoencoder(run)
        if (ae.cfg.channels, ae.cfg.resolution) != (ds.channels, ds.resolution):
            raise AigcError(f"the autoencoder takes {ae.cfg.channels} x {ae.cfg.resolution}^2 images, the data are "
                            f"{ds.channels} x {ds.resolution}^2", param="vae")
        return ae, weights

    @staticmethod
    def cached_latents(run: Path, ae, weights: Path, ds) -> torch.Tensor:
        """Posterior means of the training images, encoded once: ``RUN/latents.safetensors``, valid while the
        autoencoder's weights (sha256) and the image count are the same."""
        key = {"weights_sha256": ck.sha256_file(weights), "images": str(len(ds))}
        path = run / LATENT_CACHE
        if path.exists():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if all(meta.get(k) == v for k, v in key.items()):
                return load_file(str(path))["mu"]
        mu = encode_all(ae, ds.images, progress=sys.stderr.isatty())
        run.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{LATENT_CACHE}")
        save_file({"mu": mu.contiguous()}, str(tmp), metadata=key)
        os.replace(tmp, path)
        return mu

    def run_info(self) -> dict:
        """Extra config.json entries: where the autoencoder came from and how well it reconstructs."""
        return self.info

    def inputs(self, idx: torch.Tensor) -> torch.Tensor:
        """The batch the diffusion trains on: the cached latents of the images ``idx``."""
        return self.latents[idx]

    def optimizers(self, model, args):
        return {"model": torch.optim.AdamW(model.unet.parameters(), lr=args.lr or self.default_lr, weight_decay=0.0)}
