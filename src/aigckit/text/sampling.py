"""Pure functions on logits: processors, warpers and ``sample``. No hidden state; every call gets what it needs.

Order (as in transformers' generate): repetition penalty and n-gram bans on the raw scores, then temperature,
top-k, top-p, min-p, then a draw (or argmax when ``temperature`` is 0 or below ``TEMPERATURE_FLOOR``, where
``logits / temperature`` would overflow float32; see ``aigckit.text.params``). Parameters are validated once, by
``GenerationParams`` (or ``validate``), not here on every decode step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from aigckit.text.params import TEMPERATURE_FLOOR, check_sampling


def validate(*, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0) -> None:
    """Raise ``AigcError`` (a ``ValueError``, with ``param``) for out-of-range sampling parameters; never clamps.

    ``GenerationParams`` runs these checks once when it is made; the functions below trust their arguments."""
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty)


def apply_repetition_penalty(scores: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty on tokens already in the sequence. ``seen`` is a bool mask [B, V]."""
    if penalty == 1.0:
        return scores
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``seq`` (no_repeat_ngram_size)."""
    if n <= 0 or len(seq) + 1 < n:
        return []
    prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
    banned = []
    for i in range(len(seq) - n + 1):
        if tuple(seq[i:i + n - 1]) == prefix:
            banned.append(seq[i + n - 1])
    return banned


def apply_no_repeat_ngram(scores: Tensor, seqs: list[list[int]], n: int) -> Tensor:
    if n <= 0:
        return scores
    for row, seq in enumerate(seqs):
        banned = banned_ngram_tokens(seq, n)
        if banned:
            scores[row, banned] = float("-inf")
    return scores


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (ties with the k-th value are kept, as in transformers)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the smallest set of tokens whose probability mass reaches ``p`` (at least one token)."""
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def warp(logits: Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Temperature then top-k, top-p, min-p masks. ``temperature`` must be >= ``TEMPERATURE_FLOOR`` here."""
    logits = logits / temperature
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    return min_p_filter(logits, min_p)


def sample(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
    """Pick one token per row of ``logits`` [B, V]. Greedy (argmax) when ``temperature < TEMPERATURE_FLOOR``
    (0 included). ``generator``: one for the batch, or one per row (row i draws from ``generator[i]`` alone, so its
    token does not depend on the other rows of the batch: RL sampling seeded per prompt)."""
    logits = logits.float()
    if temperature < TEMPERATURE_FLOOR:
        return logits.argmax(dim=-1)
    probs = warp(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p).softmax(dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g)[0] for i, g in enumerate(generator)])
