"""Python API for trained image models::

    from aigckit import load_image_model
    m = load_image_model("runs/ddpm")                 # a run folder or one checkpoint folder
    out = m.sample(16, classes="sneaker", seed=0, sampler="ddim", steps=50, guidance=3.0)
    t2i = load_image_model("fmnist-t2i")             # a text-conditioned run (or built-in model name)
    out = t2i.sample(8, prompts=["a pair of trainers", "a dark coat"], negative_prompt="a bag", guidance=3.0)
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
from aigckit.image.ldm import LatentDiffusionConfig, LatentDiffusionModel
from aigckit.image.vae import VAE, VAEConfig

MAX_SAMPLES = 100_000
FAMILIES = {"ddpm": (DiffusionConfig, DiffusionModel), "ldm": (LatentDiffusionConfig, LatentDiffusionModel),
            "vae": (VAEConfig, VAE), "dcgan": (DCGANConfig, DCGAN)}
DIFFUSION_FAMILIES = ("ddpm", "ldm")  # pixel and latent diffusion: the same samplers, guidance and options


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
    prompts: list[str] | None = None  # text-conditioned samples: the prompt of each image

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
            if self.prompts is not None:
                meta["prompt"] = self.prompts[i]
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

    @property
    def diffusion(self) -> bool:
        return self.family in DIFFUSION_FAMILIES

    @property
    def text_conditioned(self) -> bool:
        return self.diffusion and self.model.cfg.text_conditioned

    def prompts_for(self, prompts, n: int) -> list[str]:
        """One prompt, or a list of prompts: n must be a multiple of their count; each prompt fills n / count
        consecutive samples (one grid row per prompt when nrow = n / count)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise AigcError("give at least one prompt", param="prompt")
        if n % len(prompts):
            raise AigcError(f"n ({n}) must be a multiple of the number of prompts ({len(prompts)})", param="n")
        return [p for p in prompts for _ in range(n // len(prompts))]

    def encode_prompts(self, prompts: list[str]):
        """Prompts -> the UNet's TextCondition, with the frozen text encoder the model was trained with."""
        from aigckit.multimodal.textcond import load_text_encoder  # the text tower of text-to-image models

        cfg = self.model.cfg
        return load_text_encoder(cfg.text_encoder, cfg.text_max_tokens).encode(prompts)

    def labels_for(self, classes, n: int) -> torch.Tensor | None:
        """None | one class (name or index) | a list of n classes | 'all' (cycle through classes) -> labels."""
        if classes is None:
            if self.conditional and not self.diffusion:
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
               progress: bool = False, dtype: str = "float32", temperature: float = 1.0, prompts=None,
               negative_prompt: str | None = None) -> SampleResult:
        """``temperature`` scales the latent noise of VAEs and GANs (1 = the trained prior); diffusion runs refuse it.
        Text-conditioned runs take ``prompts`` (see ``prompts_for``) and an optional ``negative_prompt`` that guidance
        steers away from (default: the empty prompt)."""
        if not 1 <= n <= MAX_SAMPLES:
            raise AigcError(f"n must be in 1..{MAX_SAMPLES}, got {n}", param="n")
        if not 0 < temperature <= 10:
            raise AigcError(f"temperature must be in (0, 10], got {temperature}", param="temperature")
        if temperature != 1.0 and self.diffusion:
            raise AigcError("temperature applies to VAE and GAN latents; diffusion runs use --guidance / --eta", param="temperature")
        if seed is None:
            seed = secrets.randbits(31)
        text = neg = None
        if self.text_conditioned:
            if classes is not None:
                raise AigcError("this model is text-conditioned: give prompts, not classes", param="classes")
            prompt_list = self.prompts_for(prompts if prompts is not None else "", n)
            text = self.encode_prompts(sorted(set(prompt_list)))
            rows = {p: i for i, p in enumerate(sorted(set(prompt_list)))}
            text = text[torch.tensor([rows[p] for p in prompt_list])]
            neg = self.encode_prompts([negative_prompt or ""]).repeat(n)
        elif prompts is not None or negative_prompt is not None:
            raise AigcError(f"this {self.family} model is not text-conditioned; use classes", param="prompt")
        labels = self.labels_for(classes, n)
        if guidance is None:
            guidance = 3.0 if ((labels is not None or text is not None) and self.diffusion) else 1.0
        if guidance < 0 or guidance > 50:
            raise AigcError(f"guidance must be in [0, 50], got {guidance}", param="guidance")
        gen = torch.Generator().manual_seed(seed)
        outs = []
        from tqdm import tqdm

        with torch.inference_mode():
            for i in tqdm(range(0, n, batch_size), desc="sample", disable=not progress or n <= batch_size):
                b = min(batch_size, n - i)
                y = labels[i:i + b] if labels is not None else None
                if self.diffusion:
                    outs.append(diffusion_sample(self.model, b, labels=y, guidance=guidance, sampler=sampler,
                                                 steps=steps if sampler == "ddim" else None, eta=eta,
                                                 generator=gen, progress=progress and n <= batch_size,
                                                 dtype=dtype, text=text[i:i + b] if text is not None else None,
                                                 negative=neg[i:i + b] if neg is not None else None))
                else:
                    outs.append(self.model.sample(b, y, generator=gen, temperature=temperature))
        params = {"model": self.family, "run": str(self.checkpoint), "seed": seed, "n": n}
        if self.diffusion:
            params.update(sampler=sampler, steps=self.model.cfg.timesteps if sampler == "ddpm" else (steps or 50),
                          eta=eta, guidance=guidance, dtype=dtype)
        elif temperature != 1.0:
            params["temperature"] = temperature
        if text is not None:
            params["prompt"] = prompt_list[0] if len(set(prompt_list)) == 1 else list(dict.fromkeys(prompt_list))
            params["negative_prompt"] = negative_prompt or ""
        if labels is not None:
            params["classes"] = sorted({self.class_names[i] if self.class_names else str(i) for i in labels.tolist()})
        res = SampleResult(torch.cat(outs), labels, params)
        if text is not None:
            res.prompts = prompt_list
        return res

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
    from aigckit import store

    if not Path(run).expanduser().exists() and store.builtin_path(run) is not None:
        run = store.builtin_path(run)  # a model shipped with the package (e.g. fmnist-t2i)
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
    if config["family"] in DIFFUSION_FAMILIES:  # inference only: channels-last conv weights (sampling ~1.5x faster on CPU)
        model.to(memory_format=torch.channels_last)
    return ImageModel(ckpt, config, model)
