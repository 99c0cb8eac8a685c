"""The frozen text encoder of text-to-image models: MiniLM (all-MiniLM-L6-v2, our BERT in ``embed/bert.py``).

``TextEncoder.encode(prompts)`` gives a ``TextCondition``: the last layer's token states (for cross-attention), their
mask, and the pooled sentence vector (mean over tokens, unit length: the sentence embedding, for the FiLM path).
The empty prompt ``""`` ([CLS][SEP]) is the "no prompt" condition of classifier-free guidance.

``CaptionBank`` holds the encodings of a fixed list of training captions, computed once and cached on disk under the
store's cache (safetensors, keyed by the encoder and the captions' hash), so training pays nothing for the encoder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from aigckit.errors import AigcError
from aigckit.image.unet import TextCondition

DEFAULT_TEXT_ENCODER = "minilm-l6-v2"
DEFAULT_MAX_TOKENS = 32
MAX_PROMPT_CHARS = 1000


class TextEncoder:
    """Prompts -> TextCondition with a frozen BERT sentence encoder. Keeps no per-request state."""

    def __init__(self, embedder, max_tokens: int = DEFAULT_MAX_TOKENS):
        if not 2 <= max_tokens <= 512:
            raise AigcError(f"max_tokens must be in 2..512, got {max_tokens}")
        self.embedder = embedder
        self.max_tokens = max_tokens
        self.dim = embedder.dim

    @torch.inference_mode()
    def encode(self, prompts: list[str] | str, batch_size: int = 64) -> TextCondition:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise AigcError(f"prompts must be strings, got {type(p).__name__}", param="prompt")
            if len(p) > MAX_PROMPT_CHARS:
                raise AigcError(f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(p)}", param="prompt")
        if not prompts:
            raise AigcError("no prompts to encode", param="prompt")
        parts = []
        for s in range(0, len(prompts), batch_size):
            ids, mask = self.embedder.tokenize(prompts[s:s + batch_size])
            ids, mask = ids[:, : self.max_tokens], mask[:, : self.max_tokens]
            hidden = self.embedder.model(ids, mask).float()
            m = mask[..., None].float()
            pooled = F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
            parts.append(TextCondition(hidden, mask.bool(), pooled))
        return TextCondition.cat(parts) if len(parts) > 1 else parts[0]


@lru_cache(maxsize=2)
def load_text_encoder(name: str = DEFAULT_TEXT_ENCODER, max_tokens: int = DEFAULT_MAX_TOKENS) -> TextEncoder:
    from aigckit.embed.bert import load_embedder

    return TextEncoder(load_embedder(name), max_tokens)


@dataclass
class CaptionBank:
    """Encoded captions: ``texts[i]`` -> row i of ``cond`` (token states stored as float16 to halve the memory)."""

    texts: list[str]
    cond: TextCondition

    def index(self, text: str) -> int:
        return self.texts.index(text)

    def take(self, ids: torch.Tensor) -> TextCondition:
        """Rows ``ids`` as float32 (the training batch's prompts)."""
        c = self.cond[ids]
        return TextCondition(c.tokens.float(), c.mask, c.pooled.float())

    @staticmethod
    def build(texts: list[str], encoder: TextEncoder, *, cache: bool = True, progress: bool = False) -> "CaptionBank":
        key = hashlib.sha256(("\n".join(texts) + f"|{encoder.embedder.name}|{encoder.max_tokens}|v1").encode())
        path = _cache_path(key.hexdigest()[:20]) if cache else None
        if path is not None and path.exists():
            from safetensors.torch import load_file

            t = load_file(str(path))
            return CaptionBank(list(texts), TextCondition(t["tokens"], t["mask"].bool(), t["pooled"]))
        from tqdm import tqdm

        parts = [encoder.encode(texts[i:i + 256]) for i in tqdm(range(0, len(texts), 256), desc="encode captions",
                                                                 disable=not progress)]
        c = TextCondition.cat(parts)
        c = TextCondition(c.tokens.half(), c.mask, c.pooled)
        if path is not None:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            from aigckit.checkpoints import private_tmp

            tmp = private_tmp(path)
            save_file({"tokens": c.tokens.contiguous(), "mask": c.mask.to(torch.uint8).contiguous(),
                       "pooled": c.pooled.contiguous()}, str(tmp))
            tmp.replace(path)
        return CaptionBank(list(texts), c)


def _cache_path(key: str) -> Path:
    from aigckit import store

    return store.cache_dir("captions") / f"{key}.safetensors"
