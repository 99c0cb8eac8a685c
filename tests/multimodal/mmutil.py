"""A stand-in for the MiniLM text encoder: deterministic token states from hashed words (no model download, fast)."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from aigckit.image.unet import TextCondition


class _Named:
    name = "fake-encoder"


class FakeEncoder:
    dim = 16
    max_tokens = 8
    embedder = _Named()

    def encode(self, prompts, batch_size: int = 64) -> TextCondition:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        words = [["[cls]"] + p.split()[: self.max_tokens - 2] + ["[sep]"] for p in prompts]
        L = max(len(w) for w in words)  # noqa: N806
        tok = torch.zeros(len(prompts), L, self.dim)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                seed = int(hashlib.sha256(w.encode()).hexdigest()[:8], 16)
                tok[i, j] = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
                mask[i, j] = True
        pooled = F.normalize((tok * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
        return TextCondition(tok, mask, pooled)


