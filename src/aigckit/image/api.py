"""Python API for trained image models::

    from aigckit import load_image_model
    m = load_image_model("runs/ddpm")                 # a run folder or one checkpoint folder
    out = m.sample(16, classes="sneaker", seed=0, sampler="ddim", steps=50, guidance=3.0)
    out.tensor            # 16 x 1 x 28 x 28 floats in [-1, 1]
    out.images            # 16 PIL images
    out.save("grid.png")  # a grid PNG carrying the generation parameters as text metadata

The loaded model is read-only (EMA weights, eval mode); ``sample`` keeps no state between calls, so one instance
can serve concurrent requests.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aigckit import checkpoints as ck
from aigckit.data.images import class_index
from aigckit.errors import AigcError
from aigckit.image.dcgan import DCGAN, DCGANConfig
from aigckit.image.diffusion import DiffusionConfig, DiffusionModel, sample as diffusion_sample
from aigckit.image.io import make_grid, save_png, to_pil
from aigckit.image.vae import VAE, VAEConfig

MAX_SAMPLES = 100_000
FAMILIES = {"ddpm": (DiffusionConfig, DiffusionModel), "vae": (VAEConfig, VAE), "dcgan": (DCGANConfig, DCGAN)}


def build_model(family: str, model_cfg: dict):
    if family not in FAMILIES:
        raise AigcError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    cfg_cls, model_cls = FAMILIES[family]
    try:
        cfg = cfg_cls(**model_cfg)
    except TypeError as e:
        raise AigcError(f"config does not match a {family} model: {e}") from e
    return cfg, model_cls(cfg)


@dataclass
class SampleResult:
    tensor: torch.Tensor  # N x C x H x W in [-1, 1]
    labels: torch.Tensor | None
    params: dict = field(default_factory=dict)  # generation parameters (also written into PNG metadata)

    @property
    def images(self) -> list:
        return to_pil(self.tensor)

    def grid(self, nrow: int | None = None):
        return make_grid(self.tensor, nrow=nrow)

    def save(self, path: str | Path, *, per_image: bool = False, nrow: int | None = None) -> list[Path]:
        """One grid PNG at ``path``, or with ``per_image`` one PNG per image in the folder ``path``."""
        path = Path(path)
        if not per_image:
            return [save_png(self.grid(nrow), path, self.params)]
        out = []
        for i, im in enumerate(self.images):
            meta = dict(self.params, index=i)
            if self.labels is not None:
                meta["class"] = int(self.labels[i])
            out.append(save_png(im, path / f"{i:05d}.png", meta))
        return out


class ImageModel:
    def __init__(self, ckpt: Path, config: dict, model: torch.nn.Module):
        self.checkpoint = ckpt
        self.config = config
        self.family: str = config["family"]
        self.model = model
        self.class_names: list[str] = config.get("data", {}).get("class_names", [])
        self.step = int(ckpt.name.split("-")[-1]) if ckpt.name.startswith("step-") else None

    @property
    def num_classes(self) -> int:
        return self.model.cfg.num_classes

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def labels_for(self, classes, n: int) -> torch.Tensor | None:
        """None | one class (name or index) | a list of n classes | 'all' (cycle through classes) -> labels."""
        if classes is None:
            if self.conditional and self.family != "ddpm":
                classes = "all"  # GAN/VAE need a label; cycle through the classes
            else:
                return None
        if not self.conditional:
            raise AigcError(f"this {self.family} model is unconditional; it cannot sample a class", param="classes")
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        if isinstance(classes, str) and classes == "all":
            return torch.arange(n) % self.num_classes
        if isinstance(classes, (list, tuple)):
            if len(classes) != n:
                raise AigcError(f"got {len(classes)} classes for {n} samples", param="classes")
            return torch.tensor([class_index(c, names) for c in classes])
        if isinstance(classes, torch.Tensor):
            return classes.long()
        return torch.full((n,), class_index(classes, names), dtype=torch.long)

    def sample(self, n: int = 16, *, classes=None, seed: int | None = None, sampler: str = "ddim",
               steps: int | None = 50, eta: float = 0.0, guidance: float | None = None, batch_size: int = 250,
               progress: bool = False, dtype: str = "float32", temperature: float = 1.0) -> SampleResult:
        """``temperature`` scales the latent noise of VAEs and GANs (1 = the trained prior); diffusion runs refuse it."""
        if not 1 <= n <= MAX_SAMPLES:
            raise AigcError(f"n must be in 1..{MAX_SAMPLES}, got {n}", param="n")
        if not 0 < temperature <= 10:
            raise AigcError(f"temperature must be in (0, 10], got {temperature}", param="temperature")
        if temperature != 1.0 and self.family == "ddpm":
            raise AigcError("temperature applies to VAE and GAN latents; diffusion runs use --guidance / --eta", param="temperature")
        if seed is None:
            seed = secrets.randbits(31)
        labels = self.labels_for(classes, n)
        if guidance is None:
            guidance = 3.0 if (labels is not None and self.family == "ddpm") else 1.0
        if guidance < 0 or guidance > 50:
            raise AigcError(f"guidance must be in [0, 50], got {guidance}", param="guidance")
        gen = torch.Generator().manual_seed(seed)
        outs = []
        from tqdm import tqdm

        with torch.inference_mode():
            for i in tqdm(range(0, n, batch_size), desc="sample", disable=not progress or n <= batch_size):
                b = min(batch_size, n - i)
                y = labels[i:i + b] if labels is not None else None
                if self.family == "ddpm":
                    outs.append(diffusion_sample(self.model, b, labels=y, guidance=guidance, sampler=sampler,
                                                 steps=steps if sampler == "ddim" else None, eta=eta,
                                                 generator=gen, progress=progress and n <= batch_size,
                                                 dtype=dtype))
                else:
                    outs.append(self.model.sample(b, y, generator=gen, temperature=temperature))
        params = {"model": self.family, "run": str(self.checkpoint), "seed": seed, "n": n}
        if self.family == "ddpm":
            params.update(sampler=sampler, steps=self.model.cfg.timesteps if sampler == "ddpm" else (steps or 50),
                          eta=eta, guidance=guidance, dtype=dtype)
        elif temperature != 1.0:
            params["temperature"] = temperature
        if labels is not None:
            params["classes"] = sorted({self.class_names[i] if self.class_names else str(i) for i in labels.tolist()})
        return SampleResult(torch.cat(outs), labels, params)

    def interpolate(self, steps: int = 8, *, seed: int | None = None, classes=None, a: torch.Tensor | None = None,
                    b: torch.Tensor | None = None) -> SampleResult:
        """VAE: between two images a and b (1 x C x H x W in [-1, 1]; default: two test images drawn by seed).
        GAN: between two latents drawn by seed. Returns ``steps`` images from a to b."""
        if not 2 <= steps <= 256:
            raise AigcError(f"steps must be in 2..256, got {steps}", param="steps")
        if seed is None:
            seed = secrets.randbits(31)
        gen = torch.Generator().manual_seed(seed)
        label = self.labels_for(classes, 1) if (classes is not None or self.conditional) else None
        if label is not None and classes is None:
            label = torch.zeros(1, dtype=torch.long)
        with torch.inference_mode():
            if self.family == "vae":
                if a is None or b is None:
                    from aigckit.data.images import load_dataset, to_float

                    d = self.config["data"]
                    ds = load_dataset(self.config["train"]["data"], "test", d["resolution"], d["channels"])
                    pool = torch.arange(len(ds)) if label is None else (ds.labels == label).nonzero().view(-1)
                    ia, ib = pool[torch.randperm(len(pool), generator=gen)[:2]]
                    a, b = to_float(ds.images[ia:ia + 1]), to_float(ds.images[ib:ib + 1])
                x = self.model.interpolate(a, b, steps, label)
            elif self.family == "dcgan":
                nz = self.model.cfg.nz
                za, zb = torch.randn((2, nz, 1, 1), generator=gen).chunk(2)
                x = self.model.interpolate(za, zb, steps, label)
            else:
                raise AigcError("interpolate works for vae and dcgan runs; diffusion has no latent to walk")
        params = {"model": self.family, "run": str(self.checkpoint), "seed": seed, "interpolate": steps}
        return SampleResult(x, label.expand(steps) if label is not None else None, params)


def load_image_model(run: str | Path, *, weights: str = "ema") -> ImageModel:
    """Load a trained run (its newest intact checkpoint; damaged newer ones are named on stderr) or one checkpoint
    folder, with EMA weights by default."""
    if weights not in ("ema", "model"):
        raise AigcError(f"weights must be 'ema' or 'model', got {weights!r}")
    ckpt = ck.latest_checkpoint(run)
    config = ck.read_config(ckpt)
    if "family" not in config or "model" not in config:
        raise AigcError(f"{ckpt / 'config.json'} is not an image-model config (no family/model)")
    _, model = build_model(config["family"], config["model"])
    path = ckpt / ("ema.safetensors" if weights == "ema" and (ckpt / "ema.safetensors").exists()
                   else "model.safetensors")
    ck.load_weights(model, path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if config["family"] == "ddpm":  # inference only: channels-last conv weights (sampling ~1.5x faster on CPU)
        model.to(memory_format=torch.channels_last)
    return ImageModel(ckpt, config, model)
