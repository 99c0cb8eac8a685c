"""Fused float32 CPU kernels for the per-token work between the linears: RMSNorm, and one decode step of attention
(RoPE on q and k, KV-cache write, attention over the cached slots) in a single call per layer.

Why: at batch 1 a decode step of SmolLM2 spends as long in ~25 small PyTorch ops per layer as in its int8 matmuls
(measured with torch.profiler: RMSNorm alone ~15 us per call as pow/mean/div/mul; two tiny ``bmm`` per layer
13 us each at batch 1 and ~120 us each at batch 16). Each kernel here is one numba call.

The PyTorch code in ``model.py`` stays the reference and the path for everything else (bfloat16, training,
prefill attention, GPUs); ``model.py`` takes these only for float32 CPU inference. Tests compare both paths.
"""

from __future__ import annotations

import contextlib
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
    def _attend_one(i, qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, out, aq, asc, aacc,
                    aib):  # pragma: no cover - compiled
        # work item i = (row b, kv head h): rope + cache write of k/v, then attention of its g query heads;
        # aq/asc/aacc/aib: the workspace's rows for item i (rotated query [D], scores [>= slots], output [D],
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
        q = aq[i]
        scores = asc[i]
        acc = aacc[i]
        ib = aib[i]
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
    def _attend(qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, out, aq, asc, aacc,
                aib):  # pragma: no cover - compiled
        # qkv [B, (nh + 2 nkv) * D]; kc/vc [Bc, nkv, L, D]; pos/lo [B]; out [B, nh * D]; aq/asc/aacc/aib scratch
        for i in prange(qkv.shape[0] * nkv):
            _attend_one(i, qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, out, aq, asc, aacc, aib)

    from numba.core import types as _types
    from numba.extending import overload as _overload

    from aigckit.text.quant import _ROW_BLOCK, _f32_block, _int4_block, _int8_block, _quant_row

    def _rows_block(x, w, scale, aux, bias, has_bias, y, b, buf):  # pragma: no cover - typed by the overload
        raise NotImplementedError

    @_overload(_rows_block)
    def _rows_block_impl(x, w, scale, aux, bias, has_bias, y, b, buf):
        # output rows of block b of one linear inside a fused block kernel, by weight type at compile time:
        # float32 rows read in place (scale, aux, buf unused); int8 rows times per-row scales (aux unused);
        # int4 groups (uint8 pairs) with scales and mins (aux) [out, groups]; int8/int4 dequantise through buf
        if isinstance(w.dtype, _types.Float):
            return lambda x, w, scale, aux, bias, has_bias, y, b, buf: _f32_block(x, w, bias, has_bias, y, b)
        if w.dtype == _types.uint8:
            return lambda x, w, scale, aux, bias, has_bias, y, b, buf: _int4_block(x, w, scale, aux, bias,
                                                                                    has_bias, y, b, buf)
        return lambda x, w, scale, aux, bias, has_bias, y, b, buf: _int8_block(x, w, scale, bias, has_bias, y, b,
                                                                                buf)

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
    def _rms_quant(x, w, eps, xq, xs, h):  # pragma: no cover - compiled
        # xq, xs = per-row int8 of rms_norm(x) * w; h: float32 scratch row [>= K]
        hk = h[:x.shape[1]]
        for m in range(x.shape[0]):
            _rms_row(x[m], w, eps, hk)
            xs[m] = _quant_row(hk, xq[m])

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
    def _int8_attn_layer(x, nw, eps, wq, sq, mq, bq, has_bq, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale,
                         wo, so, mo, bo, has_bo, out, h, qkv, att, aq, asc, aacc, aib, tiles):  # pragma: no cover
        # out = x + proj(attention(rope(qkv(rms_norm(x))))) for one new token per row; x, out [B, C];
        # h [B, C], qkv [B, Nqkv], att [B, nh * D], aq/asc/aacc (see _attend_one), tiles [threads, 4, >= C]: scratch
        B, C = x.shape
        _rms_rows(x, nw, eps, h)
        for blk in prange((wq.shape[0] + _ROW_BLOCK - 1) // _ROW_BLOCK):
            _rows_block(h, wq, sq, mq, bq, has_bq, qkv, blk, tiles[_numba.get_thread_id()])
        for i in prange(B * nkv):
            _attend_one(i, qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, att, aq, asc, aacc, aib)
        for blk in prange((wo.shape[0] + _ROW_BLOCK - 1) // _ROW_BLOCK):
            _rows_block(att, wo, so, mo, bo, has_bo, out, blk, tiles[_numba.get_thread_id()])
        for b in range(B):
            for c in range(C):
                out[b, c] += x[b, c]

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _int8_mlp_layer(x, nw, eps, wgu, sgu, mgu, bgu, has_bgu, wd, sd, md, bd, has_bd, out, h, gu, a,
                        tiles):  # pragma: no cover - compiled
        # out = x + down(silu(gate) * up), [gate | up] = gate_up(rms_norm(x)); x, out [B, C];
        # h [B, C], gu [B, 2 inter], a [B, inter], tiles [threads, 4, >= inter]: scratch
        B, C = x.shape
        inter = wgu.shape[0] // 2  # (wd.shape[1] is a byte count for int4 rows)
        _rms_rows(x, nw, eps, h)
        for blk in prange((wgu.shape[0] + _ROW_BLOCK - 1) // _ROW_BLOCK):
            _rows_block(h, wgu, sgu, mgu, bgu, has_bgu, gu, blk, tiles[_numba.get_thread_id()])
        for b in range(B):
            for j in range(inter):
                gt = gu[b, j]
                a[b, j] = gt / (_f32(1.0) + np.exp(-gt)) * gu[b, inter + j]
        for blk in prange((wd.shape[0] + _ROW_BLOCK - 1) // _ROW_BLOCK):
            _rows_block(a, wd, sd, md, bd, has_bd, out, blk, tiles[_numba.get_thread_id()])
        for b in range(B):
            for c in range(C):
                out[b, c] += x[b, c]


class Workspace:
    """Scratch buffers of the fused decode path, reused step after step so that a decode step allocates nothing per
    layer: every intermediate of a block (normalised rows, q/k/v, attention scratch, MLP hidden, the int8 tiles,
    the block outputs) is a view of a buffer kept here. One per model and Python thread (``Transformer.workspace``;
    concurrent callers never share one). Buffers grow to the largest batch / cache seen and are then reused;
    ``allocations`` counts how often one had to be (re)allocated."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}
        self._views: dict[tuple, tuple] = {}
        self.allocations = 0

    def views(self, key: tuple) -> tuple | None:
        """The views kept under ``key`` by ``keep_views``, or None if there are none or a buffer has been
        reallocated since (the views would point at the old one)."""
        hit = self._views.get(key)
        return hit[1] if hit is not None and hit[0] == self.allocations else None

    def keep_views(self, key: tuple, views: tuple) -> tuple:
        """Remember a step's views (built with ``get``) so that later steps of the same shapes skip the lookups."""
        self._views[key] = (self.allocations, views)
        return views

    def get(self, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """A C-contiguous ``shape`` view of buffer ``name`` (contents undefined)."""
        n = 1
        for d in shape:
            n *= d
        buf = self._bufs.get(name)
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = np.empty(max(n, 2 * buf.size if buf is not None and buf.dtype == dtype else n), dtype=dtype)
            self._bufs[name] = buf
            self.allocations += 1
        return buf[:n].reshape(shape)

    def attention(self, items: int, slots: int, head_dim: int) -> tuple[np.ndarray, ...]:
        """Per work item (row, kv head) of ``_attend``: rotated query, scores over the cache slots, output, and the
        int32 scratch of the vectorised exp."""
        return (self.get("aq", (items, head_dim)), self.get("asc", (items, slots)),
                self.get("aacc", (items, head_dim)), self.get("aib", (items, slots), np.int32))

    def tiles(self, width: int) -> np.ndarray:
        """One [4, width] dequantisation tile per numba thread (the int8 kernels at several rows)."""
        return self.get("tiles", (_numba.config.NUMBA_NUM_THREADS, 4, width))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: np.ndarray | None = None) -> torch.Tensor:
    """RMSNorm of float32 ``x [..., K]`` (contiguous) with a float32 ``weight [K]``: one call. ``out``: an optional
    float32 buffer of x's shape (flattened to [rows, K]) to write into."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    y = np.empty(x2.shape, dtype=np.float32) if out is None else out
    _rms_norm(x2.numpy(), weight.numpy(), np.float32(eps), y)
    return torch.from_numpy(y).view(x.shape)


def attend_decode(qkv: torch.Tensor, fused, k_cache: torch.Tensor, v_cache: torch.Tensor, n_head: int,
                  n_kv_head: int) -> torch.Tensor:
    """One new token per row: rotate q and k (``fused.cos/sin`` [B, D] when ``fused.has_rope``), write k and v into
    cache rows 0..B-1 at slot ``fused.pos[b]``, attend over slots ``fused.lo[b]..fused.pos[b]``.
    ``qkv [B, (H + 2 Hkv) * D]`` float32 contiguous; caches [rows, Hkv, L, D] float32 contiguous. Returns [B, H * D]
    (a view of ``fused.ws``: valid until the next layer's call)."""
    B = qkv.shape[0]
    D = k_cache.shape[3]
    ws = fused.ws
    out = ws.get("att", (B, n_head * D))
    _attend(qkv.numpy(), fused.cos, fused.sin, fused.has_rope, k_cache.numpy(), v_cache.numpy(), fused.pos,
            fused.lo, n_head, n_kv_head, np.float32(1.0 / math.sqrt(D)), out,
            *ws.attention(B * n_kv_head, k_cache.shape[2], D))
    return torch.from_numpy(out)


class BlockPlan:
    """What a fused decode step needs of one block, worked out once per set of modules: which kernels run it
    (``kind``: "int8", "int4", "f32", "w8a8" or None), their numpy weight arguments, the norms, head counts."""

    __slots__ = ("key", "kind", "args", "norms", "width", "n_head", "n_kv_head", "scale", "lins")

    def __init__(self, key: tuple, block) -> None:
        self.key, self.kind = key, fused_block_kind(block)
        self.args = self.norms = self.lins = None
        self.width = 0
        if self.kind is None:
            return
        attn = block.attn
        self.n_head, self.n_kv_head = attn.n_head, attn.n_kv_head
        self.scale = np.float32(1.0 / math.sqrt(attn.head_dim))
        self.norms = (block.attn_norm.weight.numpy(), np.float32(block.attn_norm.eps),
                      block.mlp_norm.weight.numpy(), np.float32(block.mlp_norm.eps))
        self.lins = (attn.qkv, attn.proj, block.mlp.gate_up, block.mlp.down)
        if self.kind == "w8a8":
            self.args = tuple(m._kernel_args()[2:] for m in self.lins)  # the epilogues' (bias, has_bias)
            return
        self.args = tuple(_rows_args(m) for m in self.lins)
        # widest row a dequantisation tile holds (int4 rows are padded to whole groups)
        self.width = max(2 * a[0].shape[1] if a[0].dtype == np.uint8 else a[0].shape[1] for a in self.args)


def block_plan(block) -> BlockPlan:
    """The block's cached ``BlockPlan``, rebuilt when one of its linears or norms was replaced (quantisation swaps
    modules after construction). The check reads the module dicts directly: it runs for every layer of every step."""
    mods = block._modules
    a, m = mods["attn"]._modules, mods["mlp"]._modules
    key = (id(a["qkv"]), id(a["proj"]), id(m.get("gate_up")), id(m.get("down")),
           id(mods["attn_norm"]._parameters.get("weight")), id(mods["mlp_norm"]._parameters.get("weight")))
    plan = block.__dict__.get("_decode_plan")
    if plan is None or plan.key != key:
        plan = BlockPlan(key, block)
        block.__dict__["_decode_plan"] = plan
    return plan


_NO_AUX = np.zeros((1, 1), dtype=np.float32)


def _rows_args(lin) -> tuple:
    """(weight rows, scale, aux, bias, has_bias) of one linear for ``_rows_block``: int4 layers give scales and mins
    [out, groups]; int8 and float32 (unit scales) layers per-row scales and an unused aux."""
    args = lin._kernel_args()
    if len(args) == 5:  # Int4Linear: (qweight, scales, mins, bias, has_bias)
        return args
    w, scale, bias, has_bias = args
    return w, scale, _NO_AUX, bias, has_bias


def int8_block_step(block, x: torch.Tensor, layer: int, cache, fused, plan: BlockPlan | None = None) -> torch.Tensor:
    """One whole Llama block for one new token per row with int8 or int4 weight-only (or float32, with unit scales:
    see ``OneDNNLinear._kernel_args``) linears: two numba calls (attention half, MLP half), each doing norm + matmuls +
    the pointwise work + the residual add, all intermediates in ``fused.ws``. ``x [B, 1, C]`` float32. Returns a view
    of the workspace (layers alternate between two output buffers: a block never overwrites its own input)."""
    plan = plan or block_plan(block)
    (wq, sq, mq, bq, hbq), (wo, so, mo, bo, hbo), (wgu, sgu, mgu, bgu, hbgu), (wd, sd, md, bd, hbd) = plan.args
    n1, eps1, n2, eps2 = plan.norms
    nh, nkv = plan.n_head, plan.n_kv_head
    B, _, C = x.shape
    x2 = x.reshape(B, C)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    kc, vc = fused.caches(cache, layer)
    ws = fused.ws
    D, slots, inter = kc.shape[3], kc.shape[2], wgu.shape[0] // 2
    key = ("rows", B, C, slots, D, nh, nkv, wq.shape[0], inter, plan.width)
    v = ws.views(key)
    if v is None:
        v = ws.keep_views(key, (ws.get("mid", (B, C)), ws.get("x0", (B, C)), ws.get("x1", (B, C)),
                                ws.get("h", (B, C)), ws.get("qkv", (B, wq.shape[0])), ws.get("att", (B, nh * D)),
                                *ws.attention(B * nkv, slots, D), ws.get("gu", (B, 2 * inter)),
                                ws.get("a", (B, inter)), ws.tiles(plan.width)))
    mid, x0, x1, h, qkv, att, aq, asc, aacc, aib, gu, a, tiles = v
    out = x1 if layer % 2 else x0
    with _compile_context(wq):
        _int8_attn_layer(x2.numpy(), n1, eps1, wq, sq, mq, bq, hbq, fused.cos, fused.sin, fused.has_rope, kc, vc,
                         fused.pos, fused.lo, nh, nkv, plan.scale, wo, so, mo, bo, hbo, mid, h, qkv, att, aq, asc,
                         aacc, aib, tiles)
        _int8_mlp_layer(mid, n2, eps2, wgu, sgu, mgu, bgu, hbgu, wd, sd, md, bd, hbd, out, h, gu, a, tiles)
    return torch.from_numpy(out).view(B, 1, C)


def _compile_context(w: np.ndarray):
    """int4 blocks compile (on first use) with LLVM's SLP vectoriser on, which the int4 unpacking needs."""
    if w.dtype == np.uint8:
        from aigckit.text.quant import slp_vectorize

        return slp_vectorize()
    return contextlib.nullcontext()


def fused_block_kind(block) -> str | None:
    """Which fused block step can run this block: "int8", "int4" or "f32" (``int8_block_step``), "w8a8"
    (``w8a8_block_step``) or None. Llama blocks (RMSNorm, SwiGLU) whose four linears are all weight-only int8, all
    int4, all w8a8, or all float32 ``OneDNNLinear`` (which keep plain weight rows)."""
    from aigckit.text.fastpath import OneDNNLinear
    from aigckit.text.quant import Int4Linear, Int8Linear

    lins = (block.attn.qkv, block.attn.proj, getattr(block.mlp, "gate_up", None), getattr(block.mlp, "down", None))
    if not (AVAILABLE and block.mlp.arch == "llama" and block.attn_norm.weight.dtype == torch.float32):
        return None
    if all(type(m) is OneDNNLinear and m.weight is not None for m in lins):
        return "f32"  # float32 rows through the int8 kernels with unit scales (OneDNNLinear._kernel_args)
    if all(type(m) is Int4Linear for m in lins):
        return "int4"
    if not all(type(m) is Int8Linear for m in lins):
        return None
    modes = {m.act_quant for m in lins}
    if modes == {False}:
        return "int8"
    return "w8a8" if modes == {True} else None


def w8a8_block_step(block, x: torch.Tensor, layer: int, cache, fused, plan: BlockPlan | None = None) -> torch.Tensor:
    """One whole Llama block for one new token per row with w8a8 linears: four integer matmuls
    (``Int8Linear.int_product``), numba calls for everything between them (norm + activation quantisation,
    scaling + residual, attention) and torch's SiLU; no module calls. ``x [B, 1, C]`` float32. Intermediates live in
    ``fused.ws`` except the four integer products, which oneDNN allocates."""
    from aigckit.text.quant import _quant_act, _rows_scale

    plan = plan or block_plan(block)
    (l_qkv, l_o, l_gu, l_d), (e_qkv, e_o, e_gu, e_d), (n1, eps1, n2, eps2) = plan.lins, plan.args, plan.norms
    B, _, C = x.shape
    xn = x.reshape(B, C).contiguous().numpy()
    kc, vc = fused.caches(cache, layer)
    D = kc.shape[3]
    nh, nkv = plan.n_head, plan.n_kv_head
    inter = l_d.in_features
    ws = fused.ws
    slots, wide = kc.shape[2], max(C, nh * D, inter)
    key = ("w8a8", B, C, slots, D, nh, nkv, l_qkv.out_features, inter)
    v = ws.views(key)
    if v is None:
        v = ws.keep_views(key, (
            ws.get("h", (wide,)),
            ws.get("qc", (B, C), np.int8),  # int8 activations by width: model, attention output, MLP hidden
            ws.get("qa", (B, nh * D), np.int8), ws.get("qi", (B, inter), np.int8), ws.get("qs", (B,)),
            ws.get("xu", (B, wide), np.uint8),  # the uint8 (zero point 128) copy oneDNN reads
            ws.get("qkv", (B, l_qkv.out_features)), ws.get("att", (B, nh * D)),
            ws.attention(B * nkv, slots, D), ws.get("mid", (B, C)), ws.get("gu", (B, 2 * inter)),
            torch.from_numpy(ws.get("a", (B, inter))), ws.get("x0", (B, C)), ws.get("x1", (B, C))))
    h, qc, qa, qi, qs, xu, qkv, att, scratch, mid, gu, a, x0, x1 = v

    _rms_quant(xn, n1, eps1, qc, qs, h)
    _rows_scale(l_qkv.int_product(qc, xu), qs, *e_qkv, qkv)
    _attend(qkv, fused.cos, fused.sin, fused.has_rope, kc, vc, fused.pos, fused.lo, nh, nkv, plan.scale, att,
            *scratch)
    _quant_act(att, qa, qs)
    _scale_add(l_o.int_product(qa, xu), qs, *e_o, xn, mid)

    _rms_quant(mid, n2, eps2, qc, qs, h)
    _rows_scale(l_gu.int_product(qc, xu), qs, *e_gu, gu)
    g = torch.from_numpy(gu)
    torch.ops.aten.silu.out(g[:, :inter], out=a)  # torch's vectorised exp: ~2x faster than numba's scalar expf
    a.mul_(g[:, inter:])
    _quant_act(a.numpy(), qi, qs)
    out = x1 if layer % 2 else x0
    _scale_add(l_d.int_product(qi, xu), qs, *e_d, mid, out)
    return torch.from_numpy(out).view(B, 1, C)
