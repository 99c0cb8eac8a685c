"""Prompt animations: walk a text-to-image model between prompts with a fixed seed.

Between prompts A and B, frame k of N uses s = k / (N - 1): token states lerp(A, B, s) (padded to one length, mask =
either's), pooled vector slerp(A, B, s), and starting noise slerp(z_A, z_B, s) (z_A, z_B drawn from seed and seed + 1
of each leg), then the usual deterministic DDIM sampling with guidance. Spherical interpolation keeps the noise at
the norm a Gaussian sample has (a straight lerp would shrink it half-way and give washed-out frames).
"""

from __future__ import annotations

import torch

from aigckit.errors import AigcError
from aigckit.image.diffusion import sample as diffusion_sample
from aigckit.image.unet import TextCondition

MAX_FRAMES = 240


def slerp(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """Spherical interpolation between a and b (flattened per row), s in [0, 1]."""
    af, bf = a.flatten(1), b.flatten(1)
    cos = (F_normalize(af) * F_normalize(bf)).sum(1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    out = torch.where(so > 1e-6, (torch.sin((1 - s) * omega) * af + torch.sin(s * omega) * bf) / so,
                      (1 - s) * af + s * bf)
    return out.view_as(a)


def F_normalize(x: torch.Tensor) -> torch.Tensor:  # noqa: N802
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def mix(a: TextCondition, b: TextCondition, s: float) -> TextCondition:
    both = TextCondition.cat([a, b])
    ta, tb = both.tokens.chunk(2)
    ma, mb = both.mask.chunk(2)
    return TextCondition((1 - s) * ta + s * tb, ma | mb, slerp(a.pooled, b.pooled, s))


def animate(model, prompts: list[str], *, frames: int = 16, seed: int = 0, guidance: float = 3.0, steps: int = 30,
            negative_prompt: str | None = None, progress: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """``model``: a text-conditioned ``ImageModel``. Returns (frames x C x H x W in [-1, 1], per-frame parameters);
    ``frames`` per leg between consecutive prompts (the last frame of a leg is the first of the next)."""
    from tqdm import tqdm

    if not model.text_conditioned:
        raise AigcError("animate needs a text-conditioned model (e.g. fmnist-t2i)", param="run")
    if len(prompts) < 2:
        raise AigcError("give at least two prompts to walk between", param="prompt")
    if not 2 <= frames <= MAX_FRAMES:
        raise AigcError(f"frames must be in 2..{MAX_FRAMES}, got {frames}", param="frames")
    cfg = model.model.cfg
    conds = [model.encode_prompts([p]) for p in prompts]
    neg = model.encode_prompts([negative_prompt or ""])
    shape = (1, *cfg.sample_shape)  # latents for latent diffusion
    noises = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(len(prompts))]
    out, params = [], []
    legs = [(i, k) for i in range(len(prompts) - 1) for k in range(frames) if i == 0 or k > 0]
    for i, k in tqdm(legs, desc="animate", disable=not progress):
        s = k / (frames - 1)
        text = mix(conds[i], conds[i + 1], s)
        x_T = slerp(noises[i], noises[i + 1], s)  # noqa: N806
        with torch.inference_mode():
            out.append(diffusion_sample(model.model, 1, text=text, negative=neg, guidance=guidance, sampler="ddim",
                                        steps=steps, x_T=x_T))
        params.append({"from": prompts[i], "to": prompts[i + 1], "s": round(s, 4), "seed": seed + i,
                       "guidance": guidance, "steps": steps, "negative_prompt": negative_prompt or ""})
    return torch.cat(out), params


def save_animation(frames: torch.Tensor, params: list[dict], path, *, fps: int = 8, scale: int = 4,
                   frames_dir=None) -> list:
    """Animated GIF or WebP at ``path`` (upscaled ``scale`` x, nearest), and one PNG per frame (with its parameters
    as metadata) in ``frames_dir`` (default: PATH's stem + '_frames')."""
    from pathlib import Path

    from PIL import Image

    from aigckit.image.io import save_png, to_pil

    path = Path(path)
    if path.suffix.lower() not in (".gif", ".webp"):
        raise AigcError(f"--out must end in .gif or .webp, got {path.name}", param="out")
    if not 1 <= fps <= 60:
        raise AigcError(f"fps must be in 1..60, got {fps}", param="fps")
    pils = to_pil(frames)
    big = [p.resize((p.width * scale, p.height * scale), Image.NEAREST) for p in pils]
    path.parent.mkdir(parents=True, exist_ok=True)
    big[0].save(path, save_all=True, append_images=big[1:], duration=int(1000 / fps), loop=0)
    fdir = Path(frames_dir) if frames_dir else path.with_name(path.stem + "_frames")
    written = [path]
    for i, (p, meta) in enumerate(zip(pils, params)):
        written.append(save_png(p, fdir / f"{i:04d}.png", dict(meta, frame=i)))
    return written
