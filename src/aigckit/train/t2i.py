"""Training step of text-to-image diffusion (``aigc image train --model ddpm --condition text``).

The data set's labels are *caption keys* (captioned Fashion-MNIST: class x light/dark attribute; shapes: the scene);
each step draws one fitting caption per image from the key's list (all noise from the training generator), drops it
to the empty prompt with probability ``label_dropout`` (classifier-free guidance), and reads its MiniLM encoding from
the caption bank (encoded once, cached on disk). The UNet is the diffusion family's with cross-attention added.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from aigckit.data.images import ImageDataset, load_dataset
from aigckit.errors import AigcError
from aigckit.image.diffusion import DiffusionConfig, DiffusionModel, sample
from aigckit.image.unet import UNetConfig
from aigckit.multimodal import textcond
from aigckit.multimodal.textcond import DEFAULT_MAX_TOKENS, DEFAULT_TEXT_ENCODER, CaptionBank
from aigckit.train.diffusion import PRESETS as DIFFUSION_PRESETS
from aigckit.train.diffusion import Trainer as DiffusionTrainer
from aigckit.train.family import preset

DATASETS = ("fashion-mnist-captions", "shapes")
# cross-attention at the lower resolutions (14x14 and 7x7 at 28 px; 16 and 8 at 32 px) and in the middle; "mini"
# (0.5 M parameters, ~2.5x the images per CPU-second of "small") is what a shared 2-core CPU trains in 15 minutes
PRESETS = {k: dict(v, cross_levels=tuple(range(1, len(v["mults"])))) for k, v in DIFFUSION_PRESETS.items()}


@lru_cache(maxsize=4)
def caption_data(name: str, split: str, seed: int = 0):
    """(images as an ImageDataset whose labels are caption keys, CaptionSet) of a captioned data set."""
    if name == "fashion-mnist-captions":
        from aigckit.multimodal import captions

        ds = load_dataset("fashion-mnist", split)
        keys = ds.labels * 3 + captions.attributes(ds.images)
        return ImageDataset(ds.images, keys, [], name=name), captions.train_captions()
    if name == "shapes":
        from aigckit.multimodal import shapes

        return shapes.dataset(split, seed=seed)
    raise AigcError(f"--condition text needs captioned data: {', '.join(DATASETS)}; got {name!r}", param="data")


class Trainer(DiffusionTrainer):
    family = "ddpm"
    grid_nrow = 4

    def __init__(self) -> None:
        self.bank: CaptionBank | None = None
        self.table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.grid_prompts: list[str] = []

    def dataset(self, args):
        ds, caps = caption_data(args.data, "train", args.seed)
        self.captions = caps
        return ds

    def build(self, args, ds):
        enc = self.prepare_text(args)
        unet = UNetConfig(resolution=ds.resolution, channels=ds.channels, context_dim=enc.dim,
                          **preset(PRESETS, args.size, "ddpm"))
        cfg = DiffusionConfig(unet=unet, **self.diffusion_options(args))
        return cfg, DiffusionModel(cfg)

    def prepare_text(self, args):
        """The frozen text encoder; the training captions' encodings (cached), their choice table, grid prompts."""
        enc = textcond.load_text_encoder(DEFAULT_TEXT_ENCODER, DEFAULT_MAX_TOKENS)
        self.bank = CaptionBank.build(self.captions.texts, enc, progress=True)
        self.table = self.captions.choice_table()
        self.grid_prompts = grid_prompts(args.data)
        return enc

    @staticmethod
    def diffusion_options(args) -> dict:
        """The DiffusionConfig fields besides the UNet's."""
        return dict(timesteps=args.timesteps, schedule=args.schedule, prediction=args.prediction,
                    label_dropout=args.label_dropout, min_snr_gamma=args.min_snr_gamma,
                    text_encoder=DEFAULT_TEXT_ENCODER, text_max_tokens=DEFAULT_MAX_TOKENS)

    def captions_for(self, keys: torch.Tensor, dropout: float, gen: torch.Generator) -> torch.Tensor:
        """One caption id per image, drawn uniformly from its key's fitting captions; 0 (the empty prompt) with
        probability ``dropout``."""
        ids, counts = self.table
        pick = (torch.rand(keys.shape[0], generator=gen) * counts[keys]).long()
        cap = ids[keys, pick]
        drop = torch.rand(keys.shape[0], generator=gen) < dropout
        return torch.where(drop, torch.zeros_like(cap), cap)

    def step(self, model, opts, x, labels, gen) -> dict[str, float]:
        model.train()
        text = self.bank.take(self.captions_for(labels, model.cfg.label_dropout, gen))
        return self.update(model, opts, model.loss(x, None, gen, text=text))

    def grid(self, ema, args, labels, gen) -> torch.Tensor:
        """Each grid prompt in one row of 4 (training phrasings first, then held-out ones), guidance 3."""
        ema.eval()
        enc = textcond.load_text_encoder(DEFAULT_TEXT_ENCODER, DEFAULT_MAX_TOKENS)
        per = self.grid_nrow
        text = enc.encode(self.grid_prompts).repeat(per)
        neg = enc.encode([""]).repeat(len(text))
        return sample(ema, len(text), text=text, negative=neg, guidance=3.0, sampler="ddim",
                      steps=min(args.grid_steps, ema.cfg.timesteps), eta=0.0, generator=gen)


def grid_prompts(data: str) -> list[str]:
    if data == "fashion-mnist-captions":
        from aigckit.multimodal import captions

        return [captions.train_prompt(c) for c in range(10)] + [p for p, _ in captions.heldout_prompts(1)[::2]]
    from aigckit.multimodal import shapes

    return shapes.grid_prompts()
