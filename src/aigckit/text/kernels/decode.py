"""Fused decode steps: one new token per row of a float32 model on the CPU, with no per-layer allocations.

``prepare(model, tokens, pos2d, start, cache, rows)`` says whether a forward call is such a step and builds its
``DecodeStep`` (each row's cache slot and first valid slot, RoPE cos/sin, the calling thread's buffers);
``forward(model, tokens, step)`` runs the whole step and returns the logits. ``model.py`` calls the two behind one
``if`` and stays the PyTorch reference, which tests compare with this path.

Per block (``BlockPlan`` works out once which kernels can run it):

* Llama blocks whose four linears are all float32 (``OneDNNLinear``, up to ``onednn.SMALL_ROWS`` rows), int8 or
  int4 weight rows: two numba calls, the attention half and the MLP half, each doing norm + matmuls + the
  pointwise work + the residual add (``_rows_attn_layer``, ``_rows_mlp_layer``; the weight format is chosen at
  compile time by ``_rows_block``);
* Llama blocks with ``w8a8`` linears: the same two calls with exact int8 x int8 products (``gemm.i8i8_block`` up
  to ``gemm.PAIR_ROWS`` rows, ``i8pairs.pairs_block`` on weights packed in pairs for more) for up to
  ``W8A8_FUSED_ROWS`` rows, or on CPUs where oneDNN's u8 x s8 product is not exact (``cpu.py``); else oneDNN's
  products with numba calls for everything between them (``_w8a8_onednn_block``);
* any other block (GPT-2, mixed formats): its PyTorch modules, with the fused attention kernel.

Every intermediate lives in the thread's ``Workspace`` (``DecodeBuffers`` names each buffer and its shape); block
outputs alternate between two buffers, so a block never overwrites its own input. A step allocates its logits.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from aigckit.text.kernels import cpu, gemm, i8pairs, onednn
from aigckit.text.kernels._numba import ENABLED, njit, numba, prange
from aigckit.text.kernels.attention import AttentionScratch, attend, attend_one
from aigckit.text.kernels.gemm import ROW_BLOCK, f32_block, i8i8_block, int4_block, int8_block, quant_row
from aigckit.text.kernels.i8pairs import NO_PAIRS, pair_row, pairs_block

__all__ = ["DecodeBuffers", "DecodeStep", "Workspace", "BlockPlan", "workspace", "prepare", "forward",
           "block_plan", "fused_block_kind", "rms_norm", "W8A8_FUSED_ROWS"]

# w8a8 rows up to which the numba integer products (fused into the block kernels) beat oneDNN's VNNI kernel
# (576x3072, 2 threads: numba 46 / 87 / 120 us at 1 / 2 / 3 rows, oneDNN 89 / 94 / 93 us; smaller matrices cross
# later, ~4-6 rows; fused blocks also save the calls between the products)
W8A8_FUSED_ROWS = 2

_f32 = np.float32

# ------------------------------------------------------------------------------------------------ numba kernels


def _rows_block(x, w, scale, aux, bias, has_bias, y, b, buf):  # pragma: no cover - typed by the overload
    raise NotImplementedError


if numba is not None:
    from numba.core import types as _types
    from numba.extending import overload as _overload

    @_overload(_rows_block)
    def _rows_block_impl(x, w, scale, aux, bias, has_bias, y, b, buf):
        # output rows of block b of one linear inside a fused block kernel, by weight type at compile time:
        # float32 rows read in place (scale, aux, buf unused); int8 rows times per-row scales (aux unused);
        # int4 groups (uint8 pairs) with scales and mins (aux) [out, groups]; int8/int4 dequantise through buf
        if isinstance(w.dtype, _types.Float):
            return lambda x, w, scale, aux, bias, has_bias, y, b, buf: f32_block(x, w, bias, has_bias, y, b)
        if w.dtype == _types.uint8:
            return lambda x, w, scale, aux, bias, has_bias, y, b, buf: int4_block(x, w, scale, aux, bias,
                                                                                   has_bias, y, b, buf)
        return lambda x, w, scale, aux, bias, has_bias, y, b, buf: int8_block(x, w, scale, bias, has_bias, y, b,
                                                                               buf)


# not inlined: every caller runs the same machine code, so a row's sum of squares is added in the same order whether
# its step has one row or many (inlined, LLVM vectorised the reduction differently per call site under SSE4)
@njit(fastmath=True, cache=True, nogil=True)
def _rms_row(row, w, eps, dst):  # pragma: no cover - compiled
    K = row.shape[0]
    ss = _f32(0.0)
    for k in range(K):
        ss += row[k] * row[k]
    r = _f32(1.0) / np.sqrt(ss / _f32(K) + eps)
    for k in range(K):
        dst[k] = row[k] * r * w[k]


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _rms_rows(x, w, eps, y):  # pragma: no cover - compiled
    for m in range(x.shape[0]):
        _rms_row(x[m], w, eps, y[m])


@njit(fastmath=True, cache=True, nogil=True)
def _rms_norm(x, w, eps, y):  # pragma: no cover - compiled
    _rms_rows(x, w, eps, y)


@njit(fastmath=True, cache=True, nogil=True)
def _silu_row(g, a):  # pragma: no cover - compiled
    # a[j] = silu(gate) * up for one row g = [gate | up] (not inlined: the same code for every caller)
    inter = a.shape[0]
    for j in range(inter):
        gt = g[j]
        a[j] = gt / (_f32(1.0) + np.exp(-gt)) * g[inter + j]


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _silu_mul(gu, a):  # pragma: no cover - compiled
    # a[b] = silu(gate) * up for [gate | up] = gu[b]
    for b in range(a.shape[0]):
        _silu_row(gu[b], a[b])


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _add_rows(out, x):  # pragma: no cover - compiled
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[b, c] += x[b, c]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _rows_attn_layer(x, nw, eps, wq, sq, mq, bq, has_bq, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale,
                     wo, so, mo, bo, has_bo, out, h, qkv, att, q_rot, scores, accs, exp_bits,
                     tiles):  # pragma: no cover - compiled
    # out = x + proj(attention(rope(qkv(rms_norm(x))))) for one new token per row; x, out [B, C];
    # h [B, C], qkv [B, Nqkv], att [B, nh * D], q_rot..exp_bits (AttentionScratch), tiles [threads, 4, >= C]
    B = x.shape[0]
    _rms_rows(x, nw, eps, h)
    for blk in prange((wq.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        _rows_block(h, wq, sq, mq, bq, has_bq, qkv, blk, tiles[numba.get_thread_id()])
    for i in prange(B * nkv):
        attend_one(i, qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, att, q_rot, scores, accs, exp_bits)
    for blk in prange((wo.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        _rows_block(att, wo, so, mo, bo, has_bo, out, blk, tiles[numba.get_thread_id()])
    _add_rows(out, x)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _rows_mlp_layer(x, nw, eps, wgu, sgu, mgu, bgu, has_bgu, wd, sd, md, bd, has_bd, out, h, gu, a,
                    tiles):  # pragma: no cover - compiled
    # out = x + down(silu(gate) * up), [gate | up] = gate_up(rms_norm(x)); x, out [B, C];
    # h [B, C], gu [B, 2 inter], a [B, inter], tiles [threads, 4, >= inter]: scratch
    _rms_rows(x, nw, eps, h)
    for blk in prange((wgu.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        _rows_block(h, wgu, sgu, mgu, bgu, has_bgu, gu, blk, tiles[numba.get_thread_id()])
    _silu_mul(gu, a)
    for blk in prange((wd.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        _rows_block(a, wd, sd, md, bd, has_bd, out, blk, tiles[numba.get_thread_id()])
    _add_rows(out, x)


# ---- w8a8: per-row int8 activations, exact integer products, then y = product * w_scale * x_scale + bias


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _rms_quant_rows(x, w, eps, xq, xs, h):  # pragma: no cover - compiled
    # xq, xs = per-row int8 of rms_norm(x) * w; h: float32 scratch [B, K] (the normalised rows)
    for m in range(x.shape[0]):
        _rms_row(x[m], w, eps, h[m])
        xs[m] = quant_row(h[m], xq[m])


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _quant_rows(x, xq, xs):  # pragma: no cover - compiled
    for m in range(x.shape[0]):
        xs[m] = quant_row(x[m], xq[m])


# not inlined and no 'contract' (see gemm._rows_scale): each multiply and add rounded, as in the reference path
@njit(fastmath={"nnan", "ninf", "nsz"}, cache=True, nogil=True)
def _epilogue_cols(yw, xs, bias, has_bias, res, has_res, y, o0, o1):  # pragma: no cover - compiled
    # y = yw * xs[:, None] + bias (+ res) in the output columns [o0, o1) of every row; yw = the integer product times
    # the weight scales
    for m in range(yw.shape[0]):
        s = xs[m]
        for n in range(o0, o1):
            v = yw[m, n] * s
            if has_bias:
                v += bias[n]
            if has_res:
                v += res[m, n]
            y[m, n] = v


@njit(fastmath={"nnan", "ninf", "nsz"}, cache=True, nogil=True)
def _epilogue(yw, xs, bias, has_bias, res, has_res, y):  # pragma: no cover - compiled
    _epilogue_cols(yw, xs, bias, has_bias, res, has_res, y, 0, yw.shape[1])


@njit(fastmath=True, cache=True, nogil=True)
def _rms_quant(x, w, eps, xq, xs, h):  # pragma: no cover - compiled
    _rms_quant_rows(x, w, eps, xq, xs, h)


@njit(fastmath=True, cache=True, nogil=True)
def _quant(x, xq, xs):  # pragma: no cover - compiled
    _quant_rows(x, xq, xs)


@njit(fastmath=True, cache=True, nogil=True)
def _scale_add(yw, xs, bias, has_bias, res, has_res, y):  # pragma: no cover - compiled
    _epilogue(yw, xs, bias, has_bias, res, has_res, y)


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _pairs_product(x32, wp, ws, xs, bias, has_bias, res, has_res, acc, yw, y):  # pragma: no cover - compiled
    # y = float32(xq @ w.T) * ws * xs + bias (+ res) on the packed weights wp, xq already paired into x32; each
    # parallel item computes 16 outputs of every row and applies the epilogue to them (yw: the products)
    N = yw.shape[1]
    for blk in prange(wp.shape[0]):
        pairs_block(x32, yw.shape[0], wp, ws, yw, blk, acc[numba.get_thread_id()])
        o0 = blk * ROW_BLOCK
        _epilogue_cols(yw, xs, bias, has_bias, res, has_res, y, o0, min(o0 + ROW_BLOCK, N))


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _rows_product(xq, w, ws, yw):  # pragma: no cover - compiled
    for blk in prange((w.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        i8i8_block(xq, w, ws, yw, blk)


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _norm_product(x, nw, eps, w, s, p, bias, has_bias, y, h, qc, qs, x32, pacc, pairs):  # pragma: no cover - compiled
    # y = (int8 rows of rms_norm(x) * nw) @ w.T, exact, times the scales, + bias: one weight row at a time, or
    # (pairs) on the packed weights p with the per-row work in parallel (h [B, C] the normalised rows)
    if pairs:
        for m in prange(x.shape[0]):
            _rms_row(x[m], nw, eps, h[m])
            qs[m] = quant_row(h[m], qc[m])
            pair_row(qc[m], x32[m])
        _pairs_product(x32, p, s, qs, bias, has_bias, y, False, pacc, y, y)
    else:  # the same per-row calls, one row after the other
        _rms_quant_rows(x, nw, eps, qc, qs, h)
        _rows_product(qc, w, s, y)
        _epilogue(y, qs, bias, has_bias, y, False, y)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _w8a8_attn_layer(x, nw, eps, wq, sq, pq, bq, has_bq, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, wo,
                     so, po, bo, has_bo, out, qc, qa, qs, qkv, att, q_rot, scores, accs, exp_bits, yo, h, xc,
                     xa, pacc, pairs):  # pragma: no cover - compiled
    # out = x + proj(attention(rope(qkv(rms_norm(x))))) with int8 activations and exact integer products;
    # h [B, C], qc int8 [B, C], qa int8 [B, nh * D], qs [B], qkv [B, Nqkv], att [B, nh * D], yo [B, C]: scratch.
    # pairs (more than two rows): products on the packed weights pq, po with xc, xa int32 [B rounded up to 4,
    # C / 2 and nh * D / 2], and the per-row work in parallel too
    B = x.shape[0]
    _norm_product(x, nw, eps, wq, sq, pq, bq, has_bq, qkv, h, qc, qs, xc, pacc, pairs)
    for i in prange(B * nkv):
        attend_one(i, qkv, cos, sin, has_rope, kc, vc, pos, lo, nh, nkv, scale, att, q_rot, scores, accs, exp_bits)
    if pairs:
        for m in prange(B):
            qs[m] = quant_row(att[m], qa[m])
            pair_row(qa[m], xa[m])
        _pairs_product(xa, po, so, qs, bo, has_bo, x, True, pacc, yo, out)
    else:
        _quant_rows(att, qa, qs)
        _rows_product(qa, wo, so, yo)
        _epilogue(yo, qs, bo, has_bo, x, True, out)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _w8a8_mlp_layer(x, nw, eps, wgu, sgu, pgu, bgu, has_bgu, wd, sd, pd, bd, has_bd, out, qc, qi, qs, gu, a,
                    yo, h, xc, xi, pacc, pairs):  # pragma: no cover - compiled
    # out = x + down(silu(gate) * up) with int8 activations and exact integer products;
    # h [B, C], qc int8 [B, C], qi int8 [B, inter], qs [B], gu [B, 2 inter], a [B, inter], yo [B, C]: scratch;
    # pairs: as in _w8a8_attn_layer, xi int32 [B rounded up to 4, inter / 2]
    B = x.shape[0]
    _norm_product(x, nw, eps, wgu, sgu, pgu, bgu, has_bgu, gu, h, qc, qs, xc, pacc, pairs)
    if pairs:
        for m in prange(B):
            _silu_row(gu[m], a[m])
            qs[m] = quant_row(a[m], qi[m])
            pair_row(qi[m], xi[m])
        _pairs_product(xi, pd, sd, qs, bd, has_bd, x, True, pacc, yo, out)
    else:
        _silu_mul(gu, a)
        _quant_rows(a, qi, qs)
        _rows_product(qi, wd, sd, yo)
        _epilogue(yo, qs, bd, has_bd, x, True, out)


# ------------------------------------------------------------------------------------------------ buffers


@dataclass
class DecodeBuffers:
    """Every intermediate of one fused decode step for B rows (C = n_embd, D = head_dim, H / Hkv = query / KV
    heads, Q = (H + 2 Hkv) D, I = intermediate size, S = cache slots, W = the widest dequantisation tile row,
    T = numba threads, X = max(C, H D, I)). float32 unless noted."""

    pos: np.ndarray  # int64 [B] the cache slot each row's token goes to
    lo: np.ndarray  # int64 [B] each row's first valid slot
    rel: np.ndarray  # [B, 1] position as RoPE sees it (pos - lo)
    ang: np.ndarray  # [B, D/2] RoPE angles
    trig: np.ndarray  # [B, D/2] cos or sin of the angles
    cos: np.ndarray  # [B, D]
    sin: np.ndarray  # [B, D]
    emb: np.ndarray  # [B, C] token embeddings
    x0: np.ndarray  # [B, C] block outputs, even layers
    x1: np.ndarray  # [B, C] block outputs, odd layers
    mid: np.ndarray  # [B, C] after the attention half of a block
    h: np.ndarray  # [B, C] normalised rows
    qkv: np.ndarray  # [B, Q]
    att: np.ndarray  # [B, H D] attention output
    attn: AttentionScratch  # [B Hkv, D], [B Hkv, S], [B Hkv, D], int32 [B Hkv, S]
    gu: np.ndarray  # [B, 2 I] gate | up
    act: np.ndarray  # [B, I] silu(gate) * up
    tiles: np.ndarray  # [T, 4, W] one dequantisation tile per numba thread
    final: np.ndarray  # [B, C] the final norm's output
    qc: np.ndarray  # int8 [B, C] w8a8 activations of width C
    qa: np.ndarray  # int8 [B, H D] w8a8 activations of the attention output
    qi: np.ndarray  # int8 [B, I] w8a8 activations of the MLP hidden rows
    qs: np.ndarray  # [B] w8a8 activation scales
    yo: np.ndarray  # [B, C] w8a8 integer products before the epilogue
    xu: np.ndarray  # uint8 [B, X] w8a8: oneDNN's zero-point-128 copy of the activations
    xc: np.ndarray  # int32 [P, C / 2] w8a8 on packed pairs (P = B rounded up to 4): qc as int16 pairs
    xa: np.ndarray  # int32 [P, H D / 2] the same for qa
    xi: np.ndarray  # int32 [P, I / 2] the same for qi
    pacc: np.ndarray  # int32 [T, 64] one register tile's sums per numba thread


class Workspace:
    """Scratch memory of the fused decode path for one model and one thread (``workspace(model)``; concurrent
    callers never share one). Buffers grow to the largest batch / cache seen and are then reused; ``allocations``
    counts how often one had to be (re)allocated."""

    def __init__(self) -> None:
        self._store: dict[str, np.ndarray] = {}
        self._bufs: dict[tuple, tuple[int, DecodeBuffers]] = {}
        self.allocations = 0

    def _get(self, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        n = math.prod(shape)
        buf = self._store.get(name)
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = np.empty(max(n, 2 * buf.size if buf is not None and buf.dtype == dtype else n), dtype=dtype)
            self._store[name] = buf
            self.allocations += 1
        return buf[:n].reshape(shape)

    def buffers(self, B: int, cfg, slots: int, width: int) -> DecodeBuffers:
        """Views of this workspace for a step of B rows of a model with config ``cfg`` over ``slots`` cache slots
        (``width``: widest tile row), built once per shape and kept while no buffer is reallocated."""
        key = (B, slots, width, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.intermediate_size)
        hit = self._bufs.get(key)
        if hit is not None and hit[0] == self.allocations:
            return hit[1]
        C, H, Hkv, D, inter = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.intermediate_size
        X = max(C, H * D, inter)
        i64, i32, i8 = np.int64, np.int32, np.int8
        P = -(-B // i8pairs.TILE_ROWS) * i8pairs.TILE_ROWS
        threads = numba.config.NUMBA_NUM_THREADS if numba is not None else 1
        shapes = {
            "pos": ((B,), i64), "lo": ((B,), i64), "rel": ((B, 1),), "ang": ((B, D // 2),), "trig": ((B, D // 2),),
            "cos": ((B, D),), "sin": ((B, D),), "emb": ((B, C),), "x0": ((B, C),), "x1": ((B, C),),
            "mid": ((B, C),), "h": ((B, C),), "qkv": ((B, (H + 2 * Hkv) * D),), "att": ((B, H * D),),
            "gu": ((B, 2 * inter),), "act": ((B, inter),), "tiles": ((threads, 4, width),), "final": ((B, C),),
            "qc": ((B, C), i8), "qa": ((B, H * D), i8), "qi": ((B, inter), i8), "qs": ((B,),),
            "yo": ((B, C),), "xu": ((B, X), np.uint8), "xc": ((P, -(-C // 2)), i32), "xa": ((P, -(-H * D // 2)), i32),
            "xi": ((P, -(-inter // 2)), i32), "pacc": ((threads, i8pairs.TILE_ROWS * i8pairs.TILE_OUT), i32),
        }
        views = {f.name: self._get(f.name, *shapes[f.name]) for f in fields(DecodeBuffers) if f.name != "attn"}
        items = B * Hkv
        attn = AttentionScratch(self._get("q_rot", (items, D)), self._get("scores", (items, slots)),
                                self._get("accs", (items, D)), self._get("exp_bits", (items, slots), np.int32))
        bufs = DecodeBuffers(attn=attn, **views)
        self._bufs[key] = (self.allocations, bufs)
        return bufs


_WORKSPACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WS_LOCK = threading.Lock()


def workspace(model) -> Workspace:
    """The calling thread's ``Workspace`` for ``model``; threads that have ended leave theirs to be dropped the next
    time a thread takes a new one."""
    tid = threading.get_ident()
    per_thread = _WORKSPACES.get(model)
    ws = per_thread.get(tid) if per_thread is not None else None
    if ws is None:
        with _WS_LOCK:
            per_thread = _WORKSPACES.setdefault(model, {})
            alive = {t.ident for t in threading.enumerate()}
            for dead in [t for t in per_thread if t not in alive]:
                per_thread.pop(dead, None)
            ws = per_thread[tid] = Workspace()
    return ws


# ------------------------------------------------------------------------------------------------ block plans


def fused_block_kind(block) -> str | None:
    """Which fused block kernels can run this block: "f32", "int8", "int4", "w8a8", or None. Llama blocks (RMSNorm,
    SwiGLU) whose four linears share one ``kernel_format`` (``OneDNNLinear`` with plain rows, ``Int8Linear``,
    ``Int4Linear``)."""
    lins = (block.attn.qkv, block.attn.proj, getattr(block.mlp, "gate_up", None), getattr(block.mlp, "down", None))
    if not (ENABLED and block.mlp.arch == "llama" and block.attn_norm.weight.dtype == torch.float32):
        return None
    kinds = {getattr(m, "kernel_format", None) for m in lins}
    return kinds.pop() if len(kinds) == 1 else None


class Four(NamedTuple):
    """One value per linear of a Llama block, in the order a step runs them."""

    qkv: object
    proj: object
    gate_up: object
    down: object


class Norms(NamedTuple):
    attn_w: np.ndarray
    attn_eps: np.float32
    mlp_w: np.ndarray
    mlp_eps: np.float32


class BlockPlan:
    """What a fused decode step needs of one block, worked out once per set of modules: which kernels run it
    (``kind``), the four linears (``lins``) and their weight arguments (``args``, each a ``gemm.RowsArgs``), the
    norms and the head counts."""

    __slots__ = ("key", "kind", "args", "lins", "norms", "width", "n_head", "n_kv_head", "scale")

    def __init__(self, key: tuple, block) -> None:
        self.key, self.kind = key, fused_block_kind(block)
        self.args = self.norms = self.lins = None
        self.width = 1
        if self.kind is None:
            return
        attn = block.attn
        self.n_head, self.n_kv_head = attn.n_head, attn.n_kv_head
        self.scale = np.float32(1.0 / math.sqrt(attn.head_dim))
        self.norms = Norms(block.attn_norm.weight.numpy(), np.float32(block.attn_norm.eps),
                           block.mlp_norm.weight.numpy(), np.float32(block.mlp_norm.eps))
        self.lins = Four(attn.qkv, attn.proj, block.mlp.gate_up, block.mlp.down)
        self.args = Four(*(m.rows_args() for m in self.lins))
        # widest row a dequantisation tile holds (int4 rows are padded to whole groups)
        self.width = max(2 * a.w.shape[1] if a.w.dtype == np.uint8 else a.w.shape[1] for a in self.args)


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


# ------------------------------------------------------------------------------------------------ one step


@dataclass
class DecodeStep:
    """One fused decode step of B rows: the cache as numpy views per layer, the buffers, whether RoPE applies."""

    caches: list  # per layer (keys, values) [rows, Hkv, S, D]
    bufs: DecodeBuffers
    has_rope: bool
    B: int


def prepare(model, tokens: Tensor, pos2d: Tensor, start: Tensor | None, cache, rows: Tensor | None
            ) -> DecodeStep | None:
    """A ``DecodeStep`` when ``model(tokens, ...)`` is one new token per row of a float32 model and cache on the CPU
    in inference mode (no gradient), with the cache's own rows and no padding query; else None (the reference path
    runs). Fills each row's slot, first valid slot and the RoPE tables (with the reference path's float32 ops)."""
    if (not ENABLED or cache is None or rows is not None or pos2d.shape[1] != 1 or tokens.device.type != "cpu"
            or torch.is_grad_enabled() or model.tok_emb.weight.dtype != torch.float32
            or cache.k[0].dtype != torch.float32):
        return None
    B = tokens.shape[0]
    width = max(block_plan(b).width for b in model.blocks)
    bufs = workspace(model).buffers(B, model.config, cache.max_len, width)
    np.copyto(bufs.pos, pos2d[:, 0].numpy())
    if start is None:
        bufs.lo.fill(0)
    else:
        np.copyto(bufs.lo, start.numpy())
    if (bufs.pos < bufs.lo).any():  # a padding query: leave it to the masked reference path
        return None
    has_rope = model.config.arch == "llama"
    if has_rope:  # (pos - lo) * inv_freq, cos/sin, both halves: bit-equal to the reference path
        half = model.inv_freq.shape[0]
        rel, ang, trig = (torch.from_numpy(a) for a in (bufs.rel, bufs.ang, bufs.trig))
        torch.sub(pos2d, start[:, None], out=rel) if start is not None else rel.copy_(pos2d)
        torch.mul(rel, model.inv_freq, out=ang)
        for fn, dst in ((torch.cos, bufs.cos), (torch.sin, bufs.sin)):
            fn(ang, out=trig)
            dst[:, :half] = bufs.trig
            dst[:, half:] = bufs.trig
    return DecodeStep(cache.numpy_views(), bufs, has_rope, B)


def forward(model, tokens: Tensor, step: DecodeStep) -> Tensor:
    """Logits [B, 1, V] of one decode step prepared by ``prepare``."""
    bufs, B = step.bufs, step.B
    x = torch.from_numpy(bufs.emb)
    torch.index_select(model.tok_emb.weight, 0, tokens.view(-1), out=x)
    if model.config.arch == "gpt2":
        x = x + model.pos_emb(torch.from_numpy(bufs.pos - bufs.lo))
    xn = x.numpy()
    for i, block in enumerate(model.blocks):
        plan = block_plan(block)
        out = bufs.x1 if i % 2 else bufs.x0
        kind = plan.kind
        if kind in ("int8", "int4") or (kind == "f32" and B <= onednn.SMALL_ROWS):
            _rows_block_step(plan, xn, out, step, i)
        elif kind == "w8a8" and (B <= W8A8_FUSED_ROWS or not cpu.onednn_u8s8_exact()):
            _w8a8_block_step(plan, xn, out, step, i)
        elif kind == "w8a8":
            _w8a8_onednn_block(plan, xn, out, step, i)
        else:
            out = _module_block(block, xn, out, step, i)
        xn = out
    norm = model.norm
    if model.config.arch == "llama":  # RMSNorm
        _rms_norm(xn, norm.weight.numpy(), np.float32(norm.eps), bufs.final)
        y = torch.from_numpy(bufs.final)
    else:
        y = norm(torch.from_numpy(xn))
    return model.lm_head(y.view(B, 1, -1))


def _rows_block_step(plan: BlockPlan, x: np.ndarray, out: np.ndarray, step: DecodeStep, layer: int) -> None:
    """A Llama block with float32 / int8 / int4 weight rows: two numba calls (``_rows_attn_layer``,
    ``_rows_mlp_layer``)."""
    (wq, sq, mq, bq, hbq), (wo, so, mo, bo, hbo), (wgu, sgu, mgu, bgu, hbgu), (wd, sd, md, bd, hbd) = plan.args
    n1, eps1, n2, eps2 = plan.norms
    b = step.bufs
    kc, vc = step.caches[layer]
    with gemm.slp_vectorize() if wq.dtype == np.uint8 else contextlib.nullcontext():  # int4 compiles with SLP
        _rows_attn_layer(x, n1, eps1, wq, sq, mq, bq, hbq, b.cos, b.sin, step.has_rope, kc, vc, b.pos, b.lo,
                         plan.n_head, plan.n_kv_head, plan.scale, wo, so, mo, bo, hbo, b.mid, b.h, b.qkv, b.att,
                         *b.attn, b.tiles)
        _rows_mlp_layer(b.mid, n2, eps2, wgu, sgu, mgu, bgu, hbgu, wd, sd, md, bd, hbd, out, b.h, b.gu, b.act,
                        b.tiles)


def _w8a8_block_step(plan: BlockPlan, x: np.ndarray, out: np.ndarray, step: DecodeStep, layer: int) -> None:
    """A Llama block with w8a8 linears, integer products in numba: two calls (``_w8a8_attn_layer``,
    ``_w8a8_mlp_layer``), one weight row at a time up to ``gemm.PAIR_ROWS`` rows, else on weights packed in
    pairs (``i8pairs.py``)."""
    (wq, sq, _, bq, hbq), (wo, so, _, bo, hbo), (wgu, sgu, _, bgu, hbgu), (wd, sd, _, bd, hbd) = plan.args
    n1, eps1, n2, eps2 = plan.norms
    b = step.bufs
    kc, vc = step.caches[layer]
    pairs = step.B > gemm.PAIR_ROWS
    pq, po, pgu, pd = (lin.packed_pairs() for lin in plan.lins) if pairs else (NO_PAIRS,) * 4
    _w8a8_attn_layer(x, n1, eps1, wq, sq, pq, bq, hbq, b.cos, b.sin, step.has_rope, kc, vc, b.pos, b.lo, plan.n_head,
                     plan.n_kv_head, plan.scale, wo, so, po, bo, hbo, b.mid, b.qc, b.qa, b.qs, b.qkv, b.att,
                     *b.attn, b.yo, b.h, b.xc, b.xa, b.pacc, pairs)
    _w8a8_mlp_layer(b.mid, n2, eps2, wgu, sgu, pgu, bgu, hbgu, wd, sd, pd, bd, hbd, out, b.qc, b.qi, b.qs,
                    b.gu, b.act, b.yo, b.h, b.xc, b.xi, b.pacc, pairs)


def _w8a8_onednn_block(plan: BlockPlan, x: np.ndarray, out: np.ndarray, step: DecodeStep, layer: int) -> None:
    """A Llama block with w8a8 linears for many rows on a CPU with exact oneDNN products (VNNI): four
    ``Int8Linear.int_product`` calls, numba calls for everything between them and torch's SiLU."""
    l_qkv, l_o, l_gu, l_d = plan.lins
    a_qkv, a_o, a_gu, a_d = plan.args
    n1, eps1, n2, eps2 = plan.norms
    b = step.bufs
    kc, vc = step.caches[layer]
    inter = b.act.shape[1]
    _rms_quant(x, n1, eps1, b.qc, b.qs, b.h)
    _scale_add(l_qkv.int_product(b.qc, b.xu), b.qs, a_qkv.bias, a_qkv.has_bias, b.qkv, False, b.qkv)
    attend(b.qkv, b.cos, b.sin, step.has_rope, kc, vc, b.pos, b.lo, plan.n_head, plan.n_kv_head, b.att, b.attn)
    _quant(b.att, b.qa, b.qs)
    _scale_add(l_o.int_product(b.qa, b.xu), b.qs, a_o.bias, a_o.has_bias, x, True, b.mid)
    _rms_quant(b.mid, n2, eps2, b.qc, b.qs, b.h)
    _scale_add(l_gu.int_product(b.qc, b.xu), b.qs, a_gu.bias, a_gu.has_bias, b.gu, False, b.gu)
    g, a = torch.from_numpy(b.gu), torch.from_numpy(b.act)
    torch.ops.aten.silu.out(g[:, :inter], out=a)  # torch's vectorised exp: ~2x faster than numba's scalar expf
    a.mul_(g[:, inter:])
    _quant(b.act, b.qi, b.qs)
    _scale_add(l_d.int_product(b.qi, b.xu), b.qs, a_d.bias, a_d.has_bias, b.mid, True, out)


def _module_block(block, x: np.ndarray, out: np.ndarray, step: DecodeStep, layer: int) -> np.ndarray:
    """Any other block (GPT-2, mixed formats): its own PyTorch modules, with the fused attention kernel."""
    b = step.bufs
    B = step.B
    xt = torch.from_numpy(x).view(B, 1, -1)
    attn = block.attn
    qkv = attn.qkv(block.attn_norm(xt)).reshape(B, -1).contiguous()
    kc, vc = step.caches[layer]
    attend(qkv.numpy(), b.cos, b.sin, step.has_rope, kc, vc, b.pos, b.lo, attn.n_head, attn.n_kv_head, b.att, b.attn)
    h = xt + attn.proj(torch.from_numpy(b.att).view(B, 1, -1))
    y = h + block.mlp(block.mlp_norm(h))
    return y.view(B, -1).contiguous().numpy()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of float32 ``x [..., K]`` (contiguous) with a float32 ``weight [K]`` in one numba call."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    y = np.empty(x2.shape, dtype=np.float32)
    _rms_norm(x2.numpy(), weight.numpy(), np.float32(eps), y)
    return torch.from_numpy(y).view(x.shape)


assert ROW_BLOCK == i8pairs.TILE_OUT  # a fused block's parallel items cover the same outputs in either product
