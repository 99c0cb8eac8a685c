"""Torch building blocks the model files share.

``embedding(n, d)``: ``nn.Embedding`` as torch builds it (weights drawn with ``normal_``, the same random draws), except
on the meta device, where the loaders build a model before assigning a file's tensors (``with torch.device("meta")``):
there the draw is skipped. torch runs ``normal_`` on a meta tensor through its Python reference kernels, whose first
use imports ``torch._dynamo``: about 2 of the 3 seconds it took to load SmolLM2 (measured with cProfile)."""

from __future__ import annotations

import torch
from torch import nn


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    weight = torch.empty(num_embeddings, embedding_dim)  # on the device of an enclosing ``torch.device`` context
    if weight.device.type != "meta":
        nn.init.normal_(weight)  # what nn.Embedding.reset_parameters draws
    return nn.Embedding(num_embeddings, embedding_dim, _weight=weight)
