"""The KGW text watermark (Kirchenbauer et al., "A Watermark for Large Language Models", ICML 2023) as a logits
processor of the text engine (``aigckit.text.processors``).

Symbols, as in the paper:

    key     the secret; only who holds it can mark or detect
    h       context width: the green list of position t is seeded by the h tokens before it
    gamma   green-list fraction: under the null hypothesis (text written without the key) every scored token is
            green with probability gamma, independently of everything else
    delta   the bias added to the logits of green tokens when generating

Seeding is integer arithmetic only (blake2b of the key, then SplitMix64 over the context tokens and the candidate
token), the same in Python ints and in numpy uint64, so a green list never depends on the device, the thread count
or torch's RNG state (the reference code seeds ``torch.Generator`` on the model's device, and users saw CPU/GPU
lists differ). A token is green when its 64-bit hash is below ``gamma * 2**64``: the probability is exactly
``gamma`` (to 2**-64) for every token, which the exact binomial test in ``aigckit.trust.detect`` relies on.

Two ways of seeding:

* ``self_hash=False`` ("LeftHash", the paper's first scheme): seed = SplitMix64 chain over the key and the h
  previous tokens, in order; green(v) = H(seed, v) < threshold.
* ``self_hash=True`` ("SelfHash", Kirchenbauer et al., "On the Reliability of Watermarks for LLMs", 2023): the
  anchor is the *minimum* of the keyed token hashes over the h previous tokens and the candidate itself, so a
  substitution in the context changes the list only when it changes that minimum (more robust to edits; the paper
  recommends h = 4).

Entropy gate (``min_entropy``, nats): the bias is added only where the model's next-token distribution (softmax
of the scores the processor sees, before temperature) has at least this entropy. The text's quality cost comes
from low-entropy steps, where the bias can push the model off the one token it is sure of; at high-entropy steps
it picks among near-equal candidates (the observation behind SWEET, Lee et al. 2023, which also gates on entropy).
Detection stays exact either way. Without the model the detector scores every token: an unmarked step is green
with probability gamma, as under the null hypothesis, so the gate only dilutes the signal. With the model
(``detect.token_entropies``, what ``aigc detect`` does by default) it recomputes each step's entropy from the text's
prefix and scores only the steps at or above the gate: which steps are scored depends only on the prefix, so under
the null hypothesis each scored token is still green with probability gamma. Measured on SmolLM2 (docs/TRUST.md,
128 prompts x 200 tokens, gamma 0.5, delta 2): the default gate of 3 nats costs +12% perplexity per token (+47%
without a gate) and, scored with the model, detects every sample at FPR 1e-3.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from aigckit.errors import AigcError

__all__ = ["Watermark", "watermark_from", "key64", "green_mask", "is_green", "seed_of", "entropy"]

M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MAX_CONTEXT_WIDTH = 16


def _mix(x: int) -> int:
    """SplitMix64's finaliser on a Python int (mod 2**64)."""
    x = (x + _GOLDEN) & M64
    x = ((x ^ (x >> 30)) * _C1) & M64
    x = ((x ^ (x >> 27)) * _C2) & M64
    return x ^ (x >> 31)


def _mix_np(x: np.ndarray) -> np.ndarray:
    """The same on a uint64 array (numpy's uint64 arithmetic wraps mod 2**64)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_C1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_C2)
        return x ^ (x >> np.uint64(31))


def key64(key: str | bytes) -> int:
    """The secret as 64 bits (blake2b, personalised so the key is not reused as-is elsewhere)."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, person=b"aigc-kgw").digest(), "little")


def _token_hash(k: int, t: int) -> int:
    return _mix(k ^ _mix(t))


@lru_cache(maxsize=8)
def _token_hashes(k: int, vocab: int) -> np.ndarray:
    """``_token_hash(k, v)`` for every v < vocab (read-only; shared by every sequence with this key)."""
    a = _mix_np(np.uint64(k) ^ _mix_np(np.arange(vocab, dtype=np.uint64)))
    a.setflags(write=False)
    return a


def _threshold(gamma: float) -> int:
    return min(M64, int(gamma * 2.0 ** 64))


def seed_of(k: int, context: list[int] | tuple[int, ...]) -> int:
    """LeftHash seed: a SplitMix64 chain over the key and the context tokens in order."""
    s = k
    for t in context:
        s = _mix(s ^ _mix(t))
    return s


def is_green(k: int, context, token: int, gamma: float, self_hash: bool) -> bool:
    """Whether ``token`` is green after ``context`` (the h tokens before it), in Python ints."""
    thr = _threshold(gamma)
    if self_hash:
        anchor = min(_token_hash(k, t) for t in (*context, token))
        return _mix(anchor ^ _mix(token)) < thr
    return _mix(seed_of(k, context) ^ _mix(token)) < thr


def green_mask(k: int, context, vocab: int, gamma: float, self_hash: bool) -> np.ndarray:
    """Boolean [vocab]: the green tokens after ``context`` (numpy, equal to ``is_green`` token by token)."""
    thr = np.uint64(_threshold(gamma))
    v = np.arange(vocab, dtype=np.uint64)
    if self_hash:
        th = _token_hashes(k, vocab)
        ctx = min((_token_hash(k, t) for t in context), default=M64)
        anchor = np.minimum(th, np.uint64(ctx))
        return _mix_np(anchor ^ _mix_np(v)) < thr
    return _mix_np(np.uint64(seed_of(k, context)) ^ _mix_np(v)) < thr


@dataclass(frozen=True)
class Watermark:
    """A KGW watermark: an immutable logits processor (``GenerationParams(processors=(Watermark("key"),))``).

    ``delta`` matters only for generating; ``detect`` needs the same key, gamma, context_width and self_hash."""

    key: str | bytes
    gamma: float = 0.5
    delta: float = 2.0
    context_width: int = 1
    self_hash: bool = False
    min_entropy: float = 3.0  # nats; 0 marks every step (the paper's scheme)

    def __post_init__(self) -> None:
        if not isinstance(self.key, (str, bytes)) or not self.key:
            raise AigcError("watermark key must be a non-empty string", param="watermark")
        if not isinstance(self.gamma, (int, float)) or not 0.0 < self.gamma < 1.0:
            raise AigcError(f"gamma must be in (0, 1), got {self.gamma!r}", param="gamma")
        if not isinstance(self.delta, (int, float)) or not 0.0 <= self.delta <= 100.0:
            raise AigcError(f"delta must be in [0, 100], got {self.delta!r}", param="delta")
        if (not isinstance(self.context_width, int) or isinstance(self.context_width, bool)
                or not 1 <= self.context_width <= MAX_CONTEXT_WIDTH):
            raise AigcError(f"context_width must be an integer in [1, {MAX_CONTEXT_WIDTH}], got "
                            f"{self.context_width!r}", param="context_width")
        if (not isinstance(self.min_entropy, (int, float)) or isinstance(self.min_entropy, bool)
                or not 0.0 <= self.min_entropy <= 20.0):
            raise AigcError(f"min_entropy must be in [0, 20] nats, got {self.min_entropy!r}", param="min_entropy")

    def __repr__(self) -> str:  # never print the secret
        return (f"Watermark(key=<secret>, gamma={self.gamma}, delta={self.delta}, "
                f"context_width={self.context_width}, self_hash={self.self_hash}, min_entropy={self.min_entropy})")

    @property
    def k(self) -> int:
        return key64(self.key)

    def describe(self) -> dict:
        """The public parameters (no key): what a detector must be told besides the key."""
        return {"scheme": "kgw-selfhash" if self.self_hash else "kgw-lefthash", "gamma": self.gamma,
                "delta": self.delta, "context_width": self.context_width, "min_entropy": self.min_entropy,
                "hash": "blake2b+splitmix64"}

    # -------------------------------------------------------------------------------- the processor protocol
    def start(self, prompt: list[int], tokenizer, vocab_size: int) -> _WatermarkState:
        return _WatermarkState(self, self.k)


@lru_cache(maxsize=512)
def _green_tensor(k: int, context: tuple[int, ...], vocab: int, gamma: float, self_hash: bool) -> Tensor:
    """``green_mask`` as a torch bool tensor, cached (a pure function of its arguments; with h = 1 the contexts
    repeat a lot: common tokens)."""
    return torch.from_numpy(green_mask(k, context, vocab, gamma, self_hash))


def entropy(scores: Tensor) -> float:
    """Entropy in nats of softmax(scores) over the last dimension (one row); -inf scores count as zero mass."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    return float(-(logp.exp() * logp.nan_to_num(neginf=0.0)).sum())


class _WatermarkState:
    """Stateless in effect: the green list depends only on ``seq``'s last h tokens, so forks share it."""

    __slots__ = ("wm", "k")

    def __init__(self, wm: Watermark, k: int) -> None:
        self.wm, self.k = wm, k

    def process(self, seq: list[int], scores: Tensor) -> Tensor:
        h = self.wm.context_width
        if len(seq) < h:  # too little context (an empty prompt): leave this step unmarked
            return scores
        if self.wm.min_entropy > 0 and entropy(scores) < self.wm.min_entropy:
            return scores  # the model is sure here: marking would cost quality, not add much signal
        mask = _green_tensor(self.k, tuple(seq[len(seq) - h:]), scores.shape[-1], self.wm.gamma, self.wm.self_hash)
        scores.add_(mask, alpha=self.wm.delta)  # (boolean indexing is ~100x slower here)
        return scores

    def advance(self, token: int) -> None:
        pass

    def fork(self) -> _WatermarkState:
        return self


def watermark_from(value, **defaults) -> Watermark | None:
    """A ``Watermark`` from what a user gives: None/False (off), a key string, a dict of fields, or a Watermark."""
    if value is None or value is False:
        return None
    if isinstance(value, Watermark):
        return value
    if isinstance(value, (str, bytes)):
        return Watermark(value, **defaults)
    if isinstance(value, dict):
        return Watermark(**{**defaults, **value})
    raise AigcError(f"watermark must be a key string, a dict or a Watermark, got {type(value).__name__}",
                    param="watermark")
