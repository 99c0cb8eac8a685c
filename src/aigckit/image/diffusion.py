"""Denoising diffusion (DDPM, Ho et al. 2020; DDIM, Song et al. 2021): noise schedules and stateless samplers.

Symbols (paper -> code):
    T            timesteps           number of diffusion steps
    β_t          betas[t]            noise added at step t
    α_t          alphas[t]           1 - β_t
    ᾱ_t          alpha_bars[t]       ∏_{s<=t} α_s
    x_0          x0                  clean image in [-1, 1]
    x_t          x_t                 noisy image: sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε
    ε            eps                 standard normal noise
    v            v                   sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x_0 (Salimans & Ho 2022)
    μ̃_t, β̃_t     posterior_mean, posterior_var   of q(x_{t-1} | x_t, x_0)
    σ_t(η)       sigma               DDIM noise scale; η=1 gives DDPM's β̃_t, η=0 a deterministic path

``ddpm_step`` and ``ddim_step`` are pure functions of their arguments: no step counters, no hidden state, so one model
can serve concurrent requests. The denoising loop with classifier-free guidance is written out in ``sample``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

from aigckit.errors import AigcError
from aigckit.image.unet import TextCondition, UNet, UNetConfig


@dataclass
class DiffusionConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    timesteps: int = 1000  # T
    schedule: Literal["linear", "cosine"] = "cosine"
    prediction: Literal["eps", "v"] = "eps"
    label_dropout: float = 0.1  # p(label -> "no label") during training, for classifier-free guidance
    text_encoder: str = ""  # text-conditioned models: the frozen encoder (store name) whose states the UNet reads
    text_max_tokens: int = 0  # ... and the prompt length it was trained with (longer prompts are truncated)
    min_snr_gamma: float = 0.0  # training loss weight min(SNR_t, γ)/SNR_t (Hang et al. 2023); 0: the simple loss

    def __post_init__(self) -> None:
        if isinstance(self.unet, dict):
            self.unet = UNetConfig(**self.unet)
        if self.schedule not in ("linear", "cosine"):
            raise AigcError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if self.prediction not in ("eps", "v"):
            raise AigcError(f"prediction must be 'eps' or 'v', got {self.prediction!r}")
        if not 2 <= self.timesteps <= 10000:
            raise AigcError(f"timesteps must be in 2..10000, got {self.timesteps}")
        if not 0 <= self.min_snr_gamma <= 1000:
            raise AigcError(f"min_snr_gamma must be in 0..1000 (0: off), got {self.min_snr_gamma}")

    @property
    def resolution(self) -> int:
        return self.unet.resolution

    @property
    def channels(self) -> int:
        return self.unet.channels

    @property
    def num_classes(self) -> int:
        return self.unet.num_classes

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one x_t (the space diffusion runs in): the image's here, the latent's for latent diffusion."""
        return (self.unet.channels, self.unet.resolution, self.unet.resolution)

    @property
    def text_conditioned(self) -> bool:
        return self.unet.context_dim > 0

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ schedules


@dataclass(frozen=True)
class Schedule:
    betas: torch.Tensor  # β_t, float64, shape [T]
    alphas: torch.Tensor  # α_t
    alpha_bars: torch.Tensor  # ᾱ_t

    @property
    def T(self) -> int:  # noqa: N802 - the paper's symbol
        return self.betas.shape[0]


def make_schedule(kind: str, T: int) -> Schedule:  # noqa: N803
    """Linear (Ho et al.: β from 1e-4 to 0.02, scaled for T != 1000) or cosine (Nichol & Dhariwal, s = 0.008)."""
    if kind == "linear":
        scale = 1000.0 / T
        betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    elif kind == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise AigcError(f"unknown noise schedule {kind!r}; known: linear, cosine")
    alphas = 1.0 - betas
    return Schedule(betas, alphas, torch.cumprod(alphas, 0))


def _at(a: torch.Tensor, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
    """Schedule value(s) at t, shaped to broadcast against x (t: int or one timestep per batch row)."""
    if isinstance(t, int):
        return a[t].to(x.dtype)
    return a.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
    """Forward noising q(x_t | x_0): x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε."""
    ab = _at(schedule.alpha_bars, t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def min_snr_weight(schedule: Schedule, t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-γ loss weight per timestep: min(SNR_t, γ) / SNR_t for an ε target, min(SNR_t, γ) / (SNR_t + 1) for v
    (SNR_t = ᾱ_t / (1 - ᾱ_t)); float32, one per row of t."""
    ab = schedule.alpha_bars[t]
    snr = ab / (1 - ab)
    return (snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)).float()


def v_target(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
    ab = _at(schedule.alpha_bars, t, x0)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def to_eps(schedule: Schedule, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor | int,
           prediction: str) -> torch.Tensor:
    """Model output (ε̂ or v̂) -> ε̂. For v: ε̂ = sqrt(1-ᾱ_t)·x_t + sqrt(ᾱ_t)·v̂."""
    if prediction == "eps":
        return out
    ab = _at(schedule.alpha_bars, t, x_t)
    return (1 - ab).sqrt() * x_t + ab.sqrt() * out


def predict_x0(schedule: Schedule, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """x̂_0 = (x_t - sqrt(1-ᾱ_t)·ε̂) / sqrt(ᾱ_t)."""
    ab = _at(schedule.alpha_bars, t, x_t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


# ------------------------------------------------------------------------------------------------ samplers


def _clip_bound(clip: bool | float) -> float | None:
    """``clip``: True = the pixel range [-1, 1], a number B = [-B, B] (latents), False / 0 = none."""
    if clip is True:
        return 1.0
    return float(clip) if clip else None


def ddpm_step(x_t: torch.Tensor, eps: torch.Tensor, t: int, *, schedule: Schedule,
              generator: torch.Generator | None = None, clip: bool | float = True,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} ~ N(μ̃_t(x_t, x̂_0), β̃_t) with
    μ̃_t = sqrt(ᾱ_{t-1})·β_t/(1-ᾱ_t)·x̂_0 + sqrt(α_t)·(1-ᾱ_{t-1})/(1-ᾱ_t)·x_t and β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t)·β_t.
    ``clip``: x̂_0 clamped to [-1, 1] (True), to [-clip, clip] (a number), or not (False)."""
    b, a, ab = schedule.betas[t].item(), schedule.alphas[t].item(), schedule.alpha_bars[t].item()
    ab_prev = schedule.alpha_bars[t - 1].item() if t > 0 else 1.0
    x0 = predict_x0(schedule, x_t, eps, t)
    bound = _clip_bound(clip)
    if bound is not None:
        x0 = x0.clamp(-bound, bound)
    mean = (math.sqrt(ab_prev) * b / (1 - ab)) * x0 + (math.sqrt(a) * (1 - ab_prev) / (1 - ab)) * x_t
    if t == 0:
        return mean
    var = (1 - ab_prev) / (1 - ab) * b
    z = noise if noise is not None else torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype)
    return mean + math.sqrt(var) * z


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, *, schedule: Schedule, eta: float = 0.0,
              generator: torch.Generator | None = None, clip: bool | float = True,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (t_prev = -1 means the clean image, ᾱ = 1):
    x_prev = sqrt(ᾱ_prev)·x̂_0 + sqrt(1-ᾱ_prev-σ²)·ε̂ + σ·z,  σ = η·sqrt((1-ᾱ_prev)/(1-ᾱ_t))·sqrt(1-ᾱ_t/ᾱ_prev).
    ``clip`` as in ``ddpm_step``."""
    if eta < 0:
        raise AigcError(f"eta must be >= 0, got {eta}")
    ab = schedule.alpha_bars[t].item()
    ab_prev = schedule.alpha_bars[t_prev].item() if t_prev >= 0 else 1.0
    x0 = predict_x0(schedule, x_t, eps, t)
    bound = _clip_bound(clip)
    if bound is not None:
        x0 = x0.clamp(-bound, bound)
        eps = (x_t - math.sqrt(ab) * x0) / math.sqrt(1 - ab)  # ε̂ consistent with the clipped x̂_0
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(max(0.0, 1 - ab / ab_prev))
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(0.0, 1 - ab_prev - sigma**2)) * eps
    if sigma > 0:
        z = noise if noise is not None else torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype)
        x_prev = x_prev + sigma * z
    return x_prev


def ddim_timesteps(T: int, steps: int) -> list[int]:  # noqa: N803
    """`steps` evenly spaced timesteps from T-1 down to 0 (any count 1..T)."""
    if not 1 <= steps <= T:
        raise AigcError(f"steps must be in 1..{T}, got {steps}")
    ts = sorted({round(i * (T - 1) / max(steps - 1, 1)) for i in range(steps)}, reverse=True)
    return ts if steps > 1 else [T - 1]


# ------------------------------------------------------------------------------------------------ model


class DiffusionModel(nn.Module):
    """The denoiser plus its schedule. ``forward`` = the UNet's prediction (ε or v, per config).
    ``clip_x0`` and ``to_images`` are what latent diffusion (``ldm.py``) changes: pixels clip x̂_0 to [-1, 1]."""

    clip_x0: bool | float = True

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(cfg.unet)
        self.schedule = make_schedule(cfg.schedule, cfg.timesteps)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                text: TextCondition | None = None) -> torch.Tensor:
        if text is None:
            return self.unet(x_t, t, labels)  # class-conditional / unconditional models: unchanged call
        return self.unet(x_t, t, labels, text)

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
             text: TextCondition | None = None) -> torch.Tensor:
        """Simple loss: MSE between the prediction and its target (ε or v) at a uniformly drawn t; with
        ``min_snr_gamma`` γ > 0 each image's error is weighted by min(SNR_t, γ) / SNR_t for ε (/ (SNR_t + 1) for v),
        the Min-SNR-γ weighting that stops the nearly noise-free steps from dominating (Hang et al. 2023).
        ``text``: the prompts of the batch, caption dropout already applied by the caller (it knows the empty
        prompt's encoding)."""
        n = x0.shape[0]
        t = torch.randint(0, self.cfg.timesteps, (n,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        if labels is not None and self.cfg.num_classes:
            drop = torch.rand(n, generator=generator) < self.cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.cfg.num_classes), labels)
        else:
            labels = None
        x_t = q_sample(self.schedule, x0, t, eps)
        target = eps if self.cfg.prediction == "eps" else v_target(self.schedule, x0, t, eps)
        if not self.cfg.min_snr_gamma:
            return torch.mean((self(x_t, t, labels, text) - target) ** 2)
        err = ((self(x_t, t, labels, text) - target) ** 2).flatten(1).mean(1)
        return torch.mean(err * min_snr_weight(self.schedule, t, self.cfg.min_snr_gamma, self.cfg.prediction))

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """The sampler's final x_0 -> images in [-1, 1]."""
        return x0.clamp(-1, 1)


@torch.no_grad()
def sample(model: DiffusionModel, n: int, *, labels: torch.Tensor | None = None, guidance: float = 1.0,
           sampler: Literal["ddpm", "ddim"] = "ddim", steps: int | None = None, eta: float = 0.0,
           generator: torch.Generator | None = None, progress: bool = False,
           dtype: str = "float32", text: TextCondition | None = None,
           negative: TextCondition | None = None, x_T: torch.Tensor | None = None) -> torch.Tensor:  # noqa: N803
    """Draw n images in [-1, 1] starting from x_T ~ N(0, I) (of ``cfg.sample_shape``: latents for latent diffusion,
    decoded at the end by ``model.to_images``).

    Classifier-free guidance (Ho & Salimans 2022): ε̂ = ε̂(x_t, ∅) + w·(ε̂(x_t, y) - ε̂(x_t, ∅)) with w = ``guidance``;
    w = 1 is the plain conditional model, w = 0 the unconditional one.
    Text-conditioned models take ``text`` (n encoded prompts) and ``negative`` (n encoded negative prompts, the empty
    prompt when there is none): ε̂ = ε̂(x_t, neg) + w·(ε̂(x_t, text) - ε̂(x_t, neg)), so guidance pushes away from the
    negative prompt as well as towards the prompt. ``x_T``: the starting noise (default: drawn from ``generator``).
    ``dtype="bfloat16"`` runs the network under CPU autocast; the sampler arithmetic stays float32.
    """
    from tqdm import tqdm

    cfg, sch = model.cfg, model.schedule
    if dtype not in ("float32", "bfloat16"):
        raise AigcError(f"dtype must be float32 or bfloat16, got {dtype!r}")

    def net(x_in, t_in, y_in, text_in=None):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            return model(x_in, t_in, y_in, text_in).float()

    if labels is not None and not cfg.num_classes:
        raise AigcError("this diffusion model is unconditional; it cannot sample a class")
    if cfg.text_conditioned:
        if text is None or negative is None:
            raise AigcError("a text-conditioned model needs text= and negative= (encode '' for no prompt)")
        if len(text) != n or len(negative) != n:
            raise AigcError(f"text and negative need {n} rows, got {len(text)} and {len(negative)}")
    elif text is not None or negative is not None:
        raise AigcError("this diffusion model is not text-conditioned; it cannot take a prompt", param="prompt")
    if sampler == "ddpm":
        if steps not in (None, cfg.timesteps):
            raise AigcError(f"the ddpm sampler runs all {cfg.timesteps} steps; use --sampler ddim for {steps}")
        ts = list(range(cfg.timesteps - 1, -1, -1))
    elif sampler == "ddim":
        ts = ddim_timesteps(cfg.timesteps, steps or 50)
    else:
        raise AigcError(f"unknown sampler {sampler!r}; known: ddpm, ddim")
    guided = (labels is not None or text is not None) and guidance != 1.0
    if text is not None:
        both = TextCondition.cat([text, negative])  # one batch of 2n rows: prompt, then negative prompt
    null = torch.full((n,), cfg.num_classes, dtype=torch.long) if cfg.num_classes else None
    shape = (n, *cfg.sample_shape)
    if x_T is not None and tuple(x_T.shape) != shape:
        raise AigcError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
    x = x_T.float().clone() if x_T is not None else torch.randn(shape, generator=generator)  # x_T
    # channels-last activations: oneDNN's convolutions run ~1.5x faster on CPU (same values, other memory order)
    x = x.contiguous(memory_format=torch.channels_last)
    for i, t in enumerate(tqdm(ts, desc=sampler, leave=False, disable=not progress)):
        tt = torch.full((n,), t, dtype=torch.long)
        if text is not None and guided:  # guidance towards the prompt, away from the negative prompt
            out = net(torch.cat([x, x]), torch.cat([tt, tt]), None, both)
            eps_c, eps_neg = to_eps(sch, torch.cat([x, x]), out, t, cfg.prediction).chunk(2)
            eps = eps_neg + guidance * (eps_c - eps_neg)
        elif text is not None:
            eps = to_eps(sch, x, net(x, tt, None, text), t, cfg.prediction)
        elif guided:
            out = net(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
            eps_c, eps_u = to_eps(sch, torch.cat([x, x]), out, t, cfg.prediction).chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = to_eps(sch, x, net(x, tt, labels if labels is not None else null), t, cfg.prediction)
        if sampler == "ddpm":
            x = ddpm_step(x, eps, t, schedule=sch, generator=generator, clip=model.clip_x0)
        else:
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            x = ddim_step(x, eps, t, t_prev, schedule=sch, eta=eta, generator=generator, clip=model.clip_x0)
    return model.to_images(x)
