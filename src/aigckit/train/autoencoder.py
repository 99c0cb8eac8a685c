"""Training step of the autoencoder family (``aigc image train --model autoencoder``): the first stage of latent
diffusion, L1 reconstruction + a small KL with Adam. Its grids show training images (odd rows) over their
reconstructions (even rows). ``--model ldm`` trains one of these first, or takes one with ``--vae RUN``."""

from __future__ import annotations

import torch

from aigckit.data.images import load_dataset, to_float
from aigckit.image.autoencoder import Autoencoder, AutoencoderConfig
from aigckit.train.family import preset
from aigckit.train.vae import Trainer as VAETrainer

# f = 4: 28x28x1 -> 4x7x7 (4x fewer numbers), 32x32x3 -> 4x8x8 (12x). "small" (0.2 M parameters) trains at about
# 90 images/s on 2 threads of the shared 2-core CPU, twice the pixel UNet "mini"
PRESETS = {
    "tiny": dict(base=8, mults=(1, 2), num_res_blocks=1, groups=4, latent_channels=2),
    "small": dict(base=16, mults=(1, 2, 2), num_res_blocks=1, groups=8, latent_channels=4),
    "base": dict(base=64, mults=(1, 2, 2), num_res_blocks=2, groups=8, latent_channels=4),
}
GRID_ROWS = 8


class Trainer(VAETrainer):
    """The VAE family's Adam step and learning rate (1e-3); its own model, data and grids."""

    family = "autoencoder"
    grid_nrow = GRID_ROWS

    def dataset(self, args):
        """The data set's images (a captioned one's too: the autoencoder of an ldm run learns the same images)."""
        from aigckit.train.t2i import DATASETS, caption_data

        if args.data in DATASETS:
            return caption_data(args.data, "train", args.seed)[0]
        return load_dataset(args.data, "train", args.resolution, args.channels)

    def build(self, args, ds):
        cfg = AutoencoderConfig(resolution=ds.resolution, channels=ds.channels, kl_weight=args.kl_weight,
                                **preset(PRESETS, args.size, "autoencoder", latent_channels=args.latent_dim))
        self.grid_images = to_float(ds.images[:GRID_ROWS * GRID_ROWS // 2])
        return cfg, Autoencoder(cfg)

    def grid(self, ema, args, labels, gen) -> torch.Tensor:
        ema.eval()
        x = self.grid_images
        rec = ema.reconstruct(x)
        rows = [t for i in range(0, len(x), GRID_ROWS) for t in (x[i:i + GRID_ROWS], rec[i:i + GRID_ROWS])]
        return torch.cat(rows)
