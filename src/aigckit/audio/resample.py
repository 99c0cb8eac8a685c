"""Streaming sample-rate conversion by a rational factor L/M (a polyphase windowed-sinc filter), for the formats
whose rate is not the voice's: OpenAI's raw ``pcm`` is 24 kHz, and Opus only takes 8/12/16/24/48 kHz.

Output sample n sits at input position t = n * M / L (integer part i, phase p = n * M mod L) and is
``sum_k x[i - K/2 + 1 + k] * H[p, k]`` with ``H[p, k] = fc * sinc(fc * d) * kaiser(d)``, d = the distance from t to
that input sample. Every output sample is computed by the same arithmetic whatever the chunking, so pushing audio
in pieces gives exactly the samples of one push of the whole (tested). Zero phase: no delay, the output has
``ceil(n_in * L / M)`` samples.
"""

from __future__ import annotations

import math

import numpy as np

from aigckit.errors import AigcError

TAPS = 32  # input samples under the filter per output sample
KAISER_BETA = 8.0
PASSBAND = 0.95  # cutoff as a fraction of the lower of the two Nyquist frequencies


def _table(L: int, M: int, K: int = TAPS) -> np.ndarray:
    """H[p, k]: the filter weight of input tap k for output phase p (see the module docstring)."""
    fc = PASSBAND * min(1.0, L / M)  # relative to the input's Nyquist frequency
    p = np.arange(L)[:, None] / L
    k = np.arange(K)[None, :]
    d = p + (K // 2 - 1) - k  # t - j for j = i - K/2 + 1 + k
    w = np.i0(KAISER_BETA * np.sqrt(np.clip(1 - (d / (K / 2)) ** 2, 0, None))) / np.i0(KAISER_BETA)
    h = fc * np.sinc(fc * d) * w
    return (h / h.sum(axis=1, keepdims=True)).astype(np.float32)  # unit DC gain in every phase


class Resampler:
    """``push(chunk)`` -> the output samples that chunk completes; ``close()`` -> the rest."""

    def __init__(self, rate_in: int, rate_out: int):
        if rate_in < 1 or rate_out < 1:
            raise AigcError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
        g = math.gcd(rate_in, rate_out)
        self.L, self.M = rate_out // g, rate_in // g
        self.H = _table(self.L, self.M) if self.L != self.M else None
        self.half = TAPS // 2
        # buffer holds input samples from absolute index `base` on (negative indices are the zeros before the start)
        self.buf = np.zeros(self.half - 1, np.float32)
        self.base = -(self.half - 1)
        self.n_in = 0  # input samples pushed
        self.n_out = 0  # output samples produced
        self.closed = False

    def _produce(self, n_end: int) -> np.ndarray:
        """Output samples [n_out, n_end), all of whose taps are in the buffer."""
        n = np.arange(self.n_out, n_end, dtype=np.int64)
        if not len(n):
            return np.zeros(0, np.float32)
        i, p = (n * self.M) // self.L, (n * self.M) % self.L
        idx = (i - self.half + 1 - self.base)[:, None] + np.arange(TAPS)[None, :]
        y = (self.buf[idx] * self.H[p]).sum(axis=1, dtype=np.float32)
        self.n_out = n_end
        keep_from = ((n_end * self.M) // self.L) - self.half + 1  # first input sample the next output needs
        drop = max(0, keep_from - self.base)
        self.buf, self.base = self.buf[drop:], self.base + drop
        return y

    def push(self, x: np.ndarray) -> np.ndarray:
        if self.closed:
            raise AigcError("resampler is closed")
        x = np.asarray(x, dtype=np.float32)
        if self.H is None:
            return x
        self.buf = np.concatenate([self.buf, x])
        self.n_in += len(x)
        last = self.base + len(self.buf) - 1  # highest input index present
        # output n needs inputs up to i + K/2, i = floor(n M / L):  n M / L < last - K/2 + 1
        n_end = max(self.n_out, -(-(last - self.half + 1) * self.L // self.M))
        return self._produce(n_end)

    def close(self) -> np.ndarray:
        if self.closed:
            return np.zeros(0, np.float32)
        self.closed = True
        if self.H is None:
            return np.zeros(0, np.float32)
        self.buf = np.concatenate([self.buf, np.zeros(self.half, np.float32)])  # the zeros after the end
        return self._produce(-(-self.n_in * self.L // self.M))


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    r = Resampler(rate_in, rate_out)
    return np.concatenate([r.push(x), r.close()])
