"""One decode step of attention per layer in one numba call: RoPE on q and k, the KV-cache write, and attention of
every query head over its row's cached slots (grouped-query heads share their KV head's loads).

Why: at batch 1 a decode step of SmolLM2 spent as long in ~25 small PyTorch ops per layer as in its int8 matmuls
(torch.profiler: two tiny ``bmm`` per layer 13 us each at batch 1, ~120 us each at batch 16). The PyTorch code in
``model.py`` (``Attention.forward``) is the reference; tests compare both.

Work item i = (row b, KV head h). Slots go four at a time: four dot products share each query load, and the output
row is read and written once per four value rows. The softmax exp is vectorised (Cody-Waite range reduction and a
degree-7 polynomial; numba's ``np.exp`` is a scalar call per element).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from aigckit.text.kernels._numba import njit, prange

__all__ = ["AttentionScratch", "attend", "attend_one"]


class AttentionScratch(NamedTuple):
    """Per work item (row, KV head): the rotated query [items, D], scores over the cache slots [items, slots], the
    output accumulator [items, D] and the int32 scratch of the vectorised exp [items, slots]."""

    q_rot: np.ndarray
    scores: np.ndarray
    accs: np.ndarray
    exp_bits: np.ndarray


_f32 = np.float32


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _rotate(src, dst, cos, sin, half):  # pragma: no cover - compiled
    # HF rotate_half convention: dst = src * cos + cat(-src[half:], src[:half]) * sin
    for d in range(half):
        a = src[d]
        b = src[d + half]
        dst[d] = a * cos[d] - b * sin[d]
        dst[d + half] = b * cos[d + half] + a * sin[d + half]


_LOG2E = _f32(1.4426950408889634)
_LN2_HI, _LN2_LO = _f32(0.693359375), _f32(-2.12194440e-4)  # Cody-Waite split of ln 2 (hi has 9 bits)
# e**r for |r| <= ln(2)/2: Taylor terms 1/k!, k <= 7 (truncation error < 6e-9 relative)
_E0, _E1, _E2, _E3, _E4, _E5, _E6, _E7 = (_f32(1.0 / math.factorial(k)) for k in range(8))


# no 'reassoc' here: the two-step range reduction must stay in the written order (contract = FMAs allowed)
@njit(fastmath={"nnan", "ninf", "nsz", "contract"}, cache=True, nogil=True)
def _exp_shifted(sc, n, mx, ib):  # pragma: no cover - compiled
    # sc[s] = exp(sc[s] - mx) for s < n (arguments <= 0); returns their sum. Vectorised: e**t = 2**k * e**r,
    # k = rint(t / ln 2), r = t - k ln 2 in two steps, e**r a polynomial, 2**k built in the exponent bits
    # (ib: int32 scratch [>= n]). Within a few ulp of expf; numba's np.exp is a scalar call per element.
    for s in range(n):
        t = max(sc[s] - mx, _f32(-87.0))  # e**-87 ~ 1.6e-38: a weight of ~0 either way, 2**k stays normal
        k = np.rint(t * _LOG2E)
        r = t - k * _LN2_HI
        r = r - k * _LN2_LO
        p = _E7
        p = p * r + _E6
        p = p * r + _E5
        p = p * r + _E4
        p = p * r + _E3
        p = p * r + _E2
        p = p * r + _E1
        sc[s] = p * r + _E0
        ib[s] = (np.int32(k) + np.int32(127)) << 23
    two_k = ib.view(np.float32)
    tot = _f32(0.0)
    for s in range(n):
        e = sc[s] * two_k[s]
        sc[s] = e
        tot += e
    return tot


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def attend_one(i, qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, out, q_rot, score_rows, accs,
           exp_bits):  # pragma: no cover - compiled
    # work item i = (row b, kv head h): rope + cache write of k/v, then attention of its g query heads;
    # q_rot/score_rows/accs/exp_bits: the workspace's rows for item i (rotated query [D], scores [>= slots], output [D],
    # int32 exp scratch [>= slots]). Slots go four at a time: four dot products share each query load, and
    # the output row is read and written once per four value rows.
    D = kc.shape[3]
    half = D // 2
    g = nh // nkv
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
    q = q_rot[i]
    scores = score_rows[i]
    acc = accs[i]
    ib = exp_bits[i]
    for j in range(g):
        hq = h * g + j
        qs = row[hq * D:(hq + 1) * D]
        if has_rope:
            _rotate(qs, q, cos[b], sin[b], half)
        else:
            for d in range(D):
                q[d] = qs[d]
        mx = _f32(-np.inf)
        s = 0
        while s + 4 <= n:
            k0 = kc[b, h, s0 + s]
            k1 = kc[b, h, s0 + s + 1]
            k2 = kc[b, h, s0 + s + 2]
            k3 = kc[b, h, s0 + s + 3]
            a0 = a1 = a2 = a3 = _f32(0.0)
            for d in range(D):
                qd = q[d]
                a0 += qd * k0[d]
                a1 += qd * k1[d]
                a2 += qd * k2[d]
                a3 += qd * k3[d]
            scores[s] = a0 * scale
            scores[s + 1] = a1 * scale
            scores[s + 2] = a2 * scale
            scores[s + 3] = a3 * scale
            mx = max(mx, max(max(scores[s], scores[s + 1]), max(scores[s + 2], scores[s + 3])))
            s += 4
        while s < n:
            kr = kc[b, h, s0 + s]
            dot = _f32(0.0)
            for d in range(D):
                dot += q[d] * kr[d]
            dot *= scale
            scores[s] = dot
            mx = max(mx, dot)
            s += 1
        tot = _exp_shifted(scores, n, mx, ib)
        for d in range(D):
            acc[d] = _f32(0.0)
        s = 0
        while s + 4 <= n:
            w0 = scores[s]
            w1 = scores[s + 1]
            w2 = scores[s + 2]
            w3 = scores[s + 3]
            v0 = vc[b, h, s0 + s]
            v1 = vc[b, h, s0 + s + 1]
            v2 = vc[b, h, s0 + s + 2]
            v3 = vc[b, h, s0 + s + 3]
            for d in range(D):
                acc[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d]
            s += 4
        while s < n:
            w = scores[s]
            vr = vc[b, h, s0 + s]
            for d in range(D):
                acc[d] += w * vr[d]
            s += 1
        inv = _f32(1.0) / tot
        o = out[b]
        for d in range(D):
            o[hq * D + d] = acc[d] * inv


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _attend(qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, out, q_rot, score_rows, accs,
            exp_bits):  # pragma: no cover - compiled
    # qkv [B, (nh + 2 nkv) * D]; kc/vc [Bc, nkv, L, D]; pos/lo [B]; out [B, nh * D]; the rest: AttentionScratch
    for i in prange(qkv.shape[0] * nkv):
        attend_one(i, qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, out, q_rot, score_rows, accs, exp_bits)


def attend(qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray, has_rope: bool, k_cache: np.ndarray,
           v_cache: np.ndarray, pos: np.ndarray, lo: np.ndarray, n_head: int, n_kv_head: int, out: np.ndarray,
           scratch: AttentionScratch) -> None:
    """One new token per row: rotate q and k (``cos/sin`` [B, D] when ``has_rope``), write k and v into cache rows
    0..B-1 at slot ``pos[b]``, attend over slots ``lo[b]..pos[b]``; ``out [B, n_head * D]`` is written.
    ``qkv [B, (H + 2 Hkv) * D]`` float32 contiguous; caches [rows, Hkv, L, D] float32 contiguous."""
    D = k_cache.shape[3]
    _attend(qkv, cos, sin, has_rope, k_cache, v_cache, pos, lo, n_head, n_kv_head, np.float32(1.0 / math.sqrt(D)),
            out, *scratch)
