"""Fused float32 CPU kernels for the per-token work between the linears: RMSNorm, and one decode step of attention
(RoPE on q and k, KV-cache write, attention over the cached slots) in a single call per layer.

Why: at batch 1 a decode step of SmolLM2 spends as long in ~25 small PyTorch ops per layer as in its int8 matmuls
(measured with torch.profiler: RMSNorm alone ~15 us per call as pow/mean/div/mul; two tiny ``bmm`` per layer
13 us each at batch 1 and ~120 us each at batch 16). Each kernel here is one numba call.

The PyTorch code in ``model.py`` stays the reference and the path for everything else (bfloat16, training,
prefill attention, GPUs); ``model.py`` takes these only for float32 CPU inference. Tests compare both paths.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

try:
    import numba as _numba
    from numba import njit, prange

    AVAILABLE = os.environ.get("AIGC_NO_NUMBA", "") == ""
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the reference path working without it
    _numba = None
    AVAILABLE = False

__all__ = ["AVAILABLE", "rms_norm", "attend_decode"]

if _numba is not None:
    _f32 = np.float32

    @njit(fastmath=True, cache=True, nogil=True)
    def _rms_norm(x, w, eps, y):  # pragma: no cover - compiled
        M, K = x.shape
        for m in range(M):
            row = x[m]
            ss = _f32(0.0)
            for k in range(K):
                ss += row[k] * row[k]
            r = _f32(1.0) / np.sqrt(ss / _f32(K) + eps)
            dst = y[m]
            for k in range(K):
                dst[k] = row[k] * r * w[k]

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def _rotate(src, dst, cos, sin, half):  # pragma: no cover - compiled
        # HF rotate_half convention: dst = src * cos + cat(-src[half:], src[:half]) * sin
        for d in range(half):
            a = src[d]
            b = src[d + half]
            dst[d] = a * cos[d] - b * sin[d]
            dst[d + half] = b * cos[d + half] + a * sin[d + half]

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _attend(qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, out):  # pragma: no cover - compiled
        # qkv [B, (nh + 2 nkv) * D]; kc/vc [Bc, nkv, L, D]; pos/lo [B]; out [B, nh * D]
        B = qkv.shape[0]
        D = kc.shape[3]
        half = D // 2
        g = nh // nkv
        for i in prange(B * nkv):
            b = i // nkv
            h = i % nkv
            p = pos[b]
            row = qkv[b]
            k_off = (nh + h) * D
            v_off = (nh + nkv + h) * D
            kdst = kc[b, h, p]
            if has_rope:
                _rotate(row[k_off:k_off + D], kdst, cos[b], sin[b], half)
            else:
                for d in range(D):
                    kdst[d] = row[k_off + d]
            vdst = vc[b, h, p]
            for d in range(D):
                vdst[d] = row[v_off + d]
            s0 = lo[b]
            n = p + 1 - s0
            q = np.empty(D, dtype=np.float32)
            scores = np.empty(n, dtype=np.float32)
            acc = np.empty(D, dtype=np.float32)
            for j in range(g):
                hq = h * g + j
                qs = row[hq * D:(hq + 1) * D]
                if has_rope:
                    _rotate(qs, q, cos[b], sin[b], half)
                else:
                    for d in range(D):
                        q[d] = qs[d]
                mx = _f32(-np.inf)
                for s in range(n):
                    kr = kc[b, h, s0 + s]
                    dot = _f32(0.0)
                    for d in range(D):
                        dot += q[d] * kr[d]
                    dot *= scale
                    scores[s] = dot
                    if dot > mx:
                        mx = dot
                tot = _f32(0.0)
                for s in range(n):
                    e = np.exp(scores[s] - mx)
                    scores[s] = e
                    tot += e
                for d in range(D):
                    acc[d] = _f32(0.0)
                for s in range(n):
                    w = scores[s]
                    vr = vc[b, h, s0 + s]
                    for d in range(D):
                        acc[d] += w * vr[d]
                inv = _f32(1.0) / tot
                o = out[b]
                for d in range(D):
                    o[hq * D + d] = acc[d] * inv


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of float32 ``x [..., K]`` (contiguous) with a float32 ``weight [K]``: one call."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    y = np.empty(x2.shape, dtype=np.float32)
    _rms_norm(x2.numpy(), weight.numpy(), np.float32(eps), y)
    return torch.from_numpy(y).view(x.shape)


def attend_decode(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, pos: np.ndarray, lo: np.ndarray, n_head: int, n_kv_head: int
                  ) -> torch.Tensor:
    """One new token per row: rotate q and k (when ``rope`` = (cos, sin), each [B, D]), write k and v into cache
    rows 0..B-1 at slot ``pos[b]``, attend over slots ``lo[b]..pos[b]``. ``qkv [B, (H + 2 Hkv) * D]`` float32
    contiguous; caches [rows, Hkv, L, D] float32 contiguous. Returns [B, H * D]."""
    B = qkv.shape[0]
    D = k_cache.shape[3]
    out = np.empty((B, n_head * D), dtype=np.float32)
    if rope is None:
        cos = sin = np.empty((B, D), dtype=np.float32)
    else:
        cos, sin = rope[0].numpy(), rope[1].numpy()
    _attend(qkv.numpy(), cos, sin, rope is not None, k_cache.numpy(), v_cache.numpy(), pos, lo, n_head, n_kv_head,
            np.float32(1.0 / math.sqrt(D)), out)
    return torch.from_numpy(out)
