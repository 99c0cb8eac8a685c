"""Captioning through a frozen language model (ClipCap, Mokady et al. 2021): a small image encoder and a mapping
network turn an image into P input embeddings, a *prefix* that SmolLM2 continues with the caption.

Only the encoder and the mapping network are trained (``aigc caption-train --decoder smollm2``): teacher-forced
cross-entropy on the caption tokens (and an end-of-text token) through the frozen language model, whose weights
never change and are not saved with the run (the run's config names the model; ``model.safetensors`` holds the
encoder and the mapping). Decoding - greedy, sampling, beam search - is the text engine's: the prompt is P
placeholder tokens whose embeddings ``Transformer.forward(prefix=...)`` replaces, so the KV cache is prefilled with
the image and every decoding option of ``aigc text`` applies.

    prefix = mapper(image)                      # [N, P, dim]
    lm.model(placeholders + caption, prefix=prefix)  -> logits, loss on the caption positions
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aigckit.errors import AigcError
from aigckit.multimodal.caption import check_decoding, conv_encoder, fit_images


@dataclass
class PrefixCaptionConfig:
    lm: str = "smollm2-135m-instruct"  # store name of the frozen language model
    lm_dim: int = 576  # its embedding width
    prefix_len: int = 8  # P
    resolution: int = 28
    channels: int = 1
    widths: tuple[int, ...] = (16, 32, 64)
    hidden: int = 512  # the mapping network's hidden width
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if not 1 <= self.prefix_len <= 64:
            raise AigcError(f"prefix_len must be in 1..64, got {self.prefix_len}", param="prefix_len")

    def to_dict(self) -> dict:
        return asdict(self)


class PrefixMapper(nn.Module):
    """Image -> P embeddings of the language model's width: conv encoder, mean pool, MLP (ClipCap's MLP mapper)."""

    def __init__(self, cfg: PrefixCaptionConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = conv_encoder(cfg.channels, cfg.widths)
        self.map = nn.Sequential(nn.Linear(cfg.widths[-1], cfg.hidden), nn.Tanh(),
                                 nn.Linear(cfg.hidden, cfg.prefix_len * cfg.lm_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.encoder(fit_images(x, self.cfg.channels, self.cfg.resolution)).mean((2, 3))
        return self.map(feat).view(x.shape[0], self.cfg.prefix_len, self.cfg.lm_dim)


class PrefixCaptioner:
    """A trained mapper and the frozen language model it feeds (any ``aigckit.text.lm.LM`` of width ``lm_dim``)."""

    def __init__(self, mapper: PrefixMapper, lm) -> None:
        dim = lm.model.config.n_embd
        if dim != mapper.cfg.lm_dim:
            raise AigcError(f"the language model's width is {dim}, the prefix's {mapper.cfg.lm_dim}", param="lm")
        self.mapper, self.lm = mapper, lm
        tok = lm.tokenizer
        self.placeholder = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.eos = tok.eos_token_id if tok.eos_token_id is not None else min(tok.eos_token_ids)

    @property
    def cfg(self) -> PrefixCaptionConfig:
        return self.mapper.cfg

    def targets(self, texts: list[str]) -> list[list[int]]:
        """Caption token ids, each ended by the end-of-text token."""
        return [self.lm.tokenizer.encode(t, add_special_tokens=False) + [self.eos] for t in texts]

    def loss(self, x: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Mean cross-entropy of the caption tokens given the image prefix (gradients reach only the mapper)."""
        P = self.cfg.prefix_len  # noqa: N806
        tgt = self.targets(texts)
        T = P + max(len(t) for t in tgt)  # noqa: N806
        tokens = torch.full((len(tgt), T), self.placeholder, dtype=torch.long)
        labels = torch.full((len(tgt), T - P + 1), -100, dtype=torch.long)  # positions P-1 .. T-1
        for i, t in enumerate(tgt):
            tokens[i, P:P + len(t)] = torch.tensor(t)
            labels[i, :len(t)] = torch.tensor(t)  # position P-1+j predicts caption token j
        logits = self.lm.model(tokens, prefix=self.mapper(x), logits_from=P - 1)  # no head on the other positions
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    @torch.no_grad()
    def describe(self, x: torch.Tensor, *, beams: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = 0) -> list[str]:
        """Captions of images x by the text engine: greedy, sampling (temperature > 0) or beam search (beams > 1)."""
        from aigckit.text.engine import generate
        from aigckit.text.params import GenerationParams

        check_decoding(beams, temperature)
        self.mapper.eval()
        params = GenerationParams(max_new_tokens=self.cfg.max_new_tokens, temperature=temperature, top_p=top_p,
                                  num_beams=beams, seed=seed)
        prompts = [[self.placeholder] * self.cfg.prefix_len for _ in range(x.shape[0])]
        res = generate(self.lm.model, self.lm.tokenizer, prompts, params, self.lm.name, prefix=self.mapper(x))
        return [r.sequences[0].text.strip() for r in res]


def load_prefix_captioner(run, lm=None) -> tuple[PrefixCaptioner, dict]:
    """A trained prefix-captioning run (newest intact checkpoint), checkpoint folder or built-in name, with its
    language model (loaded from the store by the config's name unless ``lm`` is given) -> (captioner, config)."""
    from aigckit.multimodal.io import load_run

    mapper, config = load_run(run, "prefix-caption", PrefixCaptionConfig, PrefixMapper)
    if lm is None:
        from aigckit.text.lm import load_lm

        lm = load_lm(mapper.cfg.lm)
    return PrefixCaptioner(mapper, lm), config
