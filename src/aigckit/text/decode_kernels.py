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
import torch.nn.functional as F

try:
    import numba as _numba
    from numba import njit, prange

    AVAILABLE = os.environ.get("AIGC_NO_NUMBA", "") == ""
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the reference path working without it
    _numba = None
    AVAILABLE = False

__all__ = ["AVAILABLE", "rms_norm", "attend_decode", "int8_block_step", "w8a8_block_step"]

if _numba is not None:
    _f32 = np.float32

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def _rotate(src, dst, cos, sin, half):  # pragma: no cover - compiled
        # HF rotate_half convention: dst = src * cos + cat(-src[half:], src[:half]) * sin
        for d in range(half):
            a = src[d]
            b = src[d + half]
            dst[d] = a * cos[d] - b * sin[d]
            dst[d + half] = b * cos[d + half] + a * sin[d + half]

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def _attend_one(i, qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, out):  # pragma: no cover
        # work item i = (row b, kv head h): rope + cache write of k/v, then attention of its g query heads
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

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _attend(qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, out):  # pragma: no cover - compiled
        # qkv [B, (nh + 2 nkv) * D]; kc/vc [Bc, nkv, L, D]; pos/lo [B]; out [B, nh * D]
        for i in prange(qkv.shape[0] * nkv):
            _attend_one(i, qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, out)

    from numba.core import types as _types
    from numba.extending import overload as _overload

    from aigckit.text.quant import _ROW_BLOCK, _f32_block, _int8_block, _quant_row

    def _rows_block(x, w, scale, bias, has_bias, y, b):  # pragma: no cover - typed by the overload below
        raise NotImplementedError

    @_overload(_rows_block, inline="always")
    def _rows_block_impl(x, w, scale, bias, has_bias, y, b):
        # output rows of block b of one linear inside a fused block kernel, by weight type at compile time:
        # int8 rows (times per-row scales) or float32 rows read in place (their unit scales unused)
        if isinstance(w.dtype, _types.Float):
            return lambda x, w, scale, bias, has_bias, y, b: _f32_block(x, w, bias, has_bias, y, b)
        return lambda x, w, scale, bias, has_bias, y, b: _int8_block(x, w, scale, bias, has_bias, y, b)

    # ---- w8a8 blocks: the integer matmuls are oneDNN's (Int8Linear.int_product); these do everything in between

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def _rms_row(row, w, eps, dst):  # pragma: no cover - compiled
        K = row.shape[0]
        ss = _f32(0.0)
        for k in range(K):
            ss += row[k] * row[k]
        r = _f32(1.0) / np.sqrt(ss / _f32(K) + eps)
        for k in range(K):
            dst[k] = row[k] * r * w[k]

    @njit(fastmath=True, cache=True, nogil=True)
    def _rms_quant(x, w, eps, xq, xs):  # pragma: no cover - compiled
        # xq, xs = per-row int8 of rms_norm(x) * w
        h = np.empty(x.shape[1], dtype=np.float32)
        for m in range(x.shape[0]):
            _rms_row(x[m], w, eps, h)
            xs[m] = _quant_row(h, xq[m])

    @njit(fastmath=True, cache=True, nogil=True)
    def _scale_add(yw, xs, bias, has_bias, res, y):  # pragma: no cover - compiled
        # y = yw * xs[:, None] + bias + res   (yw: integer product times the weight scales, see Int8Linear)
        M, N = yw.shape
        for m in range(M):
            s = xs[m]
            for n in range(N):
                v = yw[m, n] * s + res[m, n]
                y[m, n] = v + bias[n] if has_bias else v

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def _rms_rows(x, w, eps, y):  # pragma: no cover - compiled
        for m in range(x.shape[0]):
            _rms_row(x[m], w, eps, y[m])

    @njit(fastmath=True, cache=True, nogil=True)
    def _rms_norm(x, w, eps, y):  # pragma: no cover - compiled
        _rms_rows(x, w, eps, y)

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _int8_attn_layer(x, nw, eps, wq, sq, bq, has_bq, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale,
                         wo, so, bo, has_bo, out):  # pragma: no cover - compiled
        # out = x + proj(attention(rope(qkv(rms_norm(x))))) for one new token per row; x, out [B, C]
        B, C = x.shape
        D = kc.shape[3]
        h = np.empty((B, C), dtype=np.float32)
        _rms_rows(x, nw, eps, h)
        qkv = np.empty((B, wq.shape[0]), dtype=np.float32)
        for blk in prange((wq.shape[0] + _ROW_BLOCK - 1) // _ROW_BLOCK):
            _rows_block(h, wq, sq, bq, has_bq, qkv, blk)
        att = np.empty((B, nh * D), dtype=np.float32)
        for i in prange(B * nkv):
            _attend_one(i, qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, att)
        for blk in prange((wo.shape[0] + _ROW_BLOCK - 1) // _ROW_BLOCK):
            _rows_block(att, wo, so, bo, has_bo, out, blk)
        for b in range(B):
            for c in range(C):
                out[b, c] += x[b, c]

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _int8_mlp_layer(x, nw, eps, wgu, sgu, bgu, has_bgu, wd, sd, bd, has_bd, out):  # pragma: no cover
        # out = x + down(silu(gate) * up), [gate | up] = gate_up(rms_norm(x)); x, out [B, C]
        B, C = x.shape
        inter = wd.shape[1]
        h = np.empty((B, C), dtype=np.float32)
        _rms_rows(x, nw, eps, h)
        gu = np.empty((B, 2 * inter), dtype=np.float32)
        for blk in prange((wgu.shape[0] + _ROW_BLOCK - 1) // _ROW_BLOCK):
            _rows_block(h, wgu, sgu, bgu, has_bgu, gu, blk)
        a = np.empty((B, inter), dtype=np.float32)
        for b in range(B):
            for j in range(inter):
                gt = gu[b, j]
                a[b, j] = gt / (_f32(1.0) + np.exp(-gt)) * gu[b, inter + j]
        for blk in prange((wd.shape[0] + _ROW_BLOCK - 1) // _ROW_BLOCK):
            _rows_block(a, wd, sd, bd, has_bd, out, blk)
        for b in range(B):
            for c in range(C):
                out[b, c] += x[b, c]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of float32 ``x [..., K]`` (contiguous) with a float32 ``weight [K]``: one call."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    y = np.empty(x2.shape, dtype=np.float32)
    _rms_norm(x2.numpy(), weight.numpy(), np.float32(eps), y)
    return torch.from_numpy(y).view(x.shape)


def attend_decode(qkv: torch.Tensor, fused, k_cache: torch.Tensor, v_cache: torch.Tensor, n_head: int,
                  n_kv_head: int) -> torch.Tensor:
    """One new token per row: rotate q and k (``fused.cos/sin`` [B, D] when ``fused.has_rope``), write k and v into
    cache rows 0..B-1 at slot ``fused.pos[b]``, attend over slots ``fused.lo[b]..fused.pos[b]``.
    ``qkv [B, (H + 2 Hkv) * D]`` float32 contiguous; caches [rows, Hkv, L, D] float32 contiguous. Returns [B, H * D]."""
    B = qkv.shape[0]
    D = k_cache.shape[3]
    out = np.empty((B, n_head * D), dtype=np.float32)
    _attend(qkv.numpy(), fused.cos, fused.sin, fused.has_rope, k_cache.numpy(), v_cache.numpy(), fused.pos,
            fused.lo, n_head, n_kv_head, np.float32(1.0 / math.sqrt(D)), out)
    return torch.from_numpy(out)


def int8_block_step(block, x: torch.Tensor, layer: int, cache, fused) -> torch.Tensor:
    """One whole Llama block for one new token per row with int8 weight-only (or float32, with unit scales: see
    ``OneDNNLinear._kernel_args``) linears: two numba calls (attention half, MLP half), each doing norm + matmuls + the pointwise work + the
    residual add. ``x [B, 1, C]`` float32."""
    attn, mlp = block.attn, block.mlp
    B, _, C = x.shape
    x2 = x.reshape(B, C)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    D = cache.k[layer].shape[3]
    wq, sq, bq, hbq = attn.qkv._kernel_args()
    wo, so, bo, hbo = attn.proj._kernel_args()
    mid = np.empty((B, C), dtype=np.float32)
    _int8_attn_layer(x2.numpy(), block.attn_norm.weight.numpy(), np.float32(block.attn_norm.eps), wq, sq, bq, hbq,
                     fused.cos, fused.sin, fused.has_rope, cache.k[layer].numpy(), cache.v[layer].numpy(), fused.pos,
                     fused.lo, attn.n_head, attn.n_kv_head, np.float32(1.0 / math.sqrt(D)), wo, so, bo, hbo, mid)
    wgu, sgu, bgu, hbgu = mlp.gate_up._kernel_args()
    wd, sd, bd, hbd = mlp.down._kernel_args()
    out = np.empty((B, C), dtype=np.float32)
    _int8_mlp_layer(mid, block.mlp_norm.weight.numpy(), np.float32(block.mlp_norm.eps), wgu, sgu, bgu, hbgu,
                    wd, sd, bd, hbd, out)
    return torch.from_numpy(out).view(B, 1, C)


def fused_block_kind(block) -> str | None:
    """Which fused block step can run this block: "int8" or "f32" (``int8_block_step``), "w8a8"
    (``w8a8_block_step``) or None. Llama blocks (RMSNorm, SwiGLU) whose four linears are all weight-only int8, all
    w8a8, or all float32 ``OneDNNLinear`` (which keep plain weight rows)."""
    from aigckit.text.fastpath import OneDNNLinear
    from aigckit.text.quant import Int8Linear

    lins = (block.attn.qkv, block.attn.proj, getattr(block.mlp, "gate_up", None), getattr(block.mlp, "down", None))
    if not (AVAILABLE and block.mlp.arch == "llama" and block.attn_norm.weight.dtype == torch.float32):
        return None
    if all(type(m) is OneDNNLinear and m.weight is not None for m in lins):
        return "f32"  # float32 rows through the int8 kernels with unit scales (OneDNNLinear._kernel_args)
    if not all(type(m) is Int8Linear for m in lins):
        return None
    modes = {m.act_quant for m in lins}
    if modes == {False}:
        return "int8"
    return "w8a8" if modes == {True} else None


def _w8a8_plan(block) -> tuple:
    """The numpy arguments of ``w8a8_block_step``'s epilogues for this block, built once per set of tensors."""
    lins = (block.attn.qkv, block.attn.proj, block.mlp.gate_up, block.mlp.down)
    key = tuple(id(m.qweight) for m in lins) + (id(block.attn_norm.weight), id(block.mlp_norm.weight))
    plan = block.__dict__.get("_w8a8_plan")
    if plan is None or plan[0] != key:
        epi = tuple(m._kernel_args()[2:] for m in lins)  # (bias, has_bias) each
        norms = (block.attn_norm.weight.numpy(), np.float32(block.attn_norm.eps),
                 block.mlp_norm.weight.numpy(), np.float32(block.mlp_norm.eps))
        plan = (key, lins, epi, norms)
        block.__dict__["_w8a8_plan"] = plan
    return plan


def w8a8_block_step(block, x: torch.Tensor, layer: int, cache, fused) -> torch.Tensor:
    """One whole Llama block for one new token per row with w8a8 linears: four integer matmuls
    (``Int8Linear.int_product``), numba calls for everything between them (norm + activation quantisation,
    scaling + residual, attention) and torch's SiLU; no module calls. ``x [B, 1, C]`` float32."""
    from aigckit.text.quant import _quant_act, _rows_scale

    _, (l_qkv, l_o, l_gu, l_d), (e_qkv, e_o, e_gu, e_d), (n1, eps1, n2, eps2) = _w8a8_plan(block)
    attn = block.attn
    B, _, C = x.shape
    xn = x.reshape(B, C).contiguous().numpy()
    D = cache.k[layer].shape[3]
    nh = attn.n_head
    inter = l_d.in_features
    qc = np.empty((B, C), dtype=np.int8)  # int8 activations by width: model, attention output, MLP hidden
    qa = np.empty((B, nh * D), dtype=np.int8)
    qi = np.empty((B, inter), dtype=np.int8)
    qs = np.empty(B, dtype=np.float32)

    _rms_quant(xn, n1, eps1, qc, qs)
    qkv = np.empty((B, l_qkv.out_features), dtype=np.float32)
    _rows_scale(l_qkv.int_product(qc), qs, *e_qkv, qkv)
    att = np.empty((B, nh * D), dtype=np.float32)
    _attend(qkv, fused.cos, fused.sin, fused.has_rope, cache.k[layer].numpy(), cache.v[layer].numpy(), fused.pos,
            fused.lo, nh, attn.n_kv_head, np.float32(1.0 / math.sqrt(D)), att)
    _quant_act(att, qa, qs)
    mid = np.empty((B, C), dtype=np.float32)
    _scale_add(l_o.int_product(qa), qs, *e_o, xn, mid)

    _rms_quant(mid, n2, eps2, qc, qs)
    gu = np.empty((B, 2 * inter), dtype=np.float32)
    _rows_scale(l_gu.int_product(qc), qs, *e_gu, gu)
    g = torch.from_numpy(gu)
    a = F.silu(g[:, :inter]).mul_(g[:, inter:])  # torch's vectorised exp: ~2x faster than numba's scalar expf
    _quant_act(a.numpy(), qi, qs)
    out = np.empty((B, C), dtype=np.float32)
    _scale_add(l_d.int_product(qi), qs, *e_d, mid, out)
    return torch.from_numpy(out).view(B, 1, C)
