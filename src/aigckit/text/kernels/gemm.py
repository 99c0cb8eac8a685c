"""numba GEMM kernels: ``y = x @ W.T + bias`` for float32, int8 and int4 weight rows, and the exact int8 x int8
product of ``w8a8``, each one call per layer that reads the weights once for all M input rows.

Weight formats (see ``quant.py`` for the quantisers):

* float32 rows ``w [N, K]``;
* int8 rows ``q [N, K]`` with a per-row scale, ``w ~= q * scale[:, None]``;
* int4 groups ``qw [N, G*H]`` (uint8, two values per byte, GGUF Q4_1's layout for H = 16) with ``scales`` and
  ``mins [N, G]``, ``w ~= q * scale + min``.

Work is split into blocks of ``ROW_BLOCK`` output rows (one ``prange`` item each):

* M = 1 (decode): one weight row at a time is converted (int8) or unpacked into an L1-resident float32 row (int4:
  the 16 bytes of a group become two 16-float vectors) and dotted with the input row;
* M > 1: four weight rows are dequantised into a small float32 tile, then a 4 (weight rows) x 4 (input rows)
  register tile of 16 accumulators, each vectorised along K, computes all M outputs (16 FMAs per 8 loads).

``w8a8``'s integer product (``matmul_i8i8``) multiplies int8 by int8 in int16 and adds pairs into int32
(``pmaddwd``, on every x86 CPU since SSE2): exact on every ISA, no saturation. One or two rows take one weight
row at a time (``i8i8_block``, also in the fused decode steps); more rows the packed-pairs kernel of ``i8pairs.py``.

The int4 unpacking is straight-line code that only LLVM's SLP vectoriser turns into vector instructions; numba
leaves SLP off by default, so the kernels are compiled once, with it switched on, for their one signature
(``compile_kernels``). The block functions (``int8_block``, ``int4_block``, ``f32_block``, ``quant_row``) are
also the building blocks of the fused decode steps in ``decode.py``.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from aigckit.text.kernels import i8pairs
from aigckit.text.kernels._numba import ENABLED, njit, numba, prange

__all__ = ["ROW_BLOCK", "RowsArgs", "compile_kernels", "slp_vectorize", "matmul_f32", "matmul_int8",
           "matmul_int4", "matmul_i8i8", "PAIR_ROWS", "quantize_rows", "scale_rows", "linear_f32", "set_num_threads"]

ROW_BLOCK = 16  # output rows per parallel work item
PAIR_ROWS = 2  # w8a8: above this many rows, the packed-pairs kernel (i8pairs.py) computes the integer product


class RowsArgs(NamedTuple):
    """One linear's weights as the row-block kernels take them (numpy views, made once per layer).

    float32 rows: ``w`` float32 [N, K], ``scale`` ones [N], ``aux`` unused; int8 rows: ``w`` int8 [N, K], ``scale``
    [N], ``aux`` unused; int4 groups: ``w`` uint8 [N, G*H], ``scale`` and ``aux`` (the mins) float32 [N, G]."""

    w: np.ndarray
    scale: np.ndarray
    aux: np.ndarray
    bias: np.ndarray
    has_bias: bool


NO_AUX = np.zeros((1, 1), dtype=np.float32)
NO_BIAS = np.zeros(1, dtype=np.float32)

_f32 = np.float32
_u8 = np.uint8


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _tile(x, buf, nr, o0, bias, has_bias, y):  # pragma: no cover - compiled
    # y[m, o0 + r] = dot(x[m], buf[r, :K]) + bias[o0 + r] for r < nr (<= 4), every m. Register tile:
    # 4 weight rows x 4 input rows = 16 accumulators, each vectorised along k (16 FMAs per 8 loads).
    M, K = x.shape
    r = 0
    if nr == 4:
        b0 = buf[0]
        b1 = buf[1]
        b2 = buf[2]
        b3 = buf[3]
        c0 = bias[o0] if has_bias else _f32(0.0)
        c1 = bias[o0 + 1] if has_bias else _f32(0.0)
        c2 = bias[o0 + 2] if has_bias else _f32(0.0)
        c3 = bias[o0 + 3] if has_bias else _f32(0.0)
        m = 0
        while m + 4 <= M:
            x0 = x[m]
            x1 = x[m + 1]
            x2 = x[m + 2]
            x3 = x[m + 3]
            a00 = a01 = a02 = a03 = _f32(0.0)
            a10 = a11 = a12 = a13 = _f32(0.0)
            a20 = a21 = a22 = a23 = _f32(0.0)
            a30 = a31 = a32 = a33 = _f32(0.0)
            for k in range(K):
                w0 = b0[k]
                w1 = b1[k]
                w2 = b2[k]
                w3 = b3[k]
                v0 = x0[k]
                v1 = x1[k]
                v2 = x2[k]
                v3 = x3[k]
                a00 += w0 * v0
                a01 += w0 * v1
                a02 += w0 * v2
                a03 += w0 * v3
                a10 += w1 * v0
                a11 += w1 * v1
                a12 += w1 * v2
                a13 += w1 * v3
                a20 += w2 * v0
                a21 += w2 * v1
                a22 += w2 * v2
                a23 += w2 * v3
                a30 += w3 * v0
                a31 += w3 * v1
                a32 += w3 * v2
                a33 += w3 * v3
            y[m, o0] = a00 + c0
            y[m + 1, o0] = a01 + c0
            y[m + 2, o0] = a02 + c0
            y[m + 3, o0] = a03 + c0
            y[m, o0 + 1] = a10 + c1
            y[m + 1, o0 + 1] = a11 + c1
            y[m + 2, o0 + 1] = a12 + c1
            y[m + 3, o0 + 1] = a13 + c1
            y[m, o0 + 2] = a20 + c2
            y[m + 1, o0 + 2] = a21 + c2
            y[m + 2, o0 + 2] = a22 + c2
            y[m + 3, o0 + 2] = a23 + c2
            y[m, o0 + 3] = a30 + c3
            y[m + 1, o0 + 3] = a31 + c3
            y[m + 2, o0 + 3] = a32 + c3
            y[m + 3, o0 + 3] = a33 + c3
            m += 4
        while m < M:  # leftover input rows: 4 weight rows x 1
            x0 = x[m]
            a0 = a1 = a2 = a3 = _f32(0.0)
            for k in range(K):
                v = x0[k]
                a0 += b0[k] * v
                a1 += b1[k] * v
                a2 += b2[k] * v
                a3 += b3[k] * v
            y[m, o0] = a0 + c0
            y[m, o0 + 1] = a1 + c1
            y[m, o0 + 2] = a2 + c2
            y[m, o0 + 3] = a3 + c3
            m += 1
        r = 4
    while r < nr:  # leftover weight rows (the last block of a matrix with out % 4 != 0)
        b0 = buf[r]
        c0 = bias[o0 + r] if has_bias else _f32(0.0)
        for m in range(M):
            x0 = x[m]
            a0 = _f32(0.0)
            for k in range(K):
                a0 += b0[k] * x0[k]
            y[m, o0 + r] = a0 + c0
        r += 1


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _dequant8_rows(w, scale, o0, nr, buf):  # pragma: no cover - compiled
    K = w.shape[1]
    for r in range(nr):
        s = scale[o0 + r]
        src = w[o0 + r]
        dst = buf[r]
        for k in range(K):
            dst[k] = _f32(src[k]) * s


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def int8_block(x, w, scale, bias, has_bias, y, b, buf):  # pragma: no cover - compiled
    # output rows [b * ROW_BLOCK, ...) of x [M, K] f32 @ (w [N, K] i8 * scale [N] f32).T + bias -> y [M, N];
    # buf: float32 scratch of at least [4, K] for M > 1 (the calling thread's own)
    M, K = x.shape
    N = w.shape[0]
    o0 = b * ROW_BLOCK
    o1 = min(o0 + ROW_BLOCK, N)
    if M == 1:  # GEMV: one row at a time (LLVM interleaves the single reduction; fastest measured)
        x0 = x[0]
        for o in range(o0, o1):
            row = w[o]
            acc = _f32(0.0)
            for k in range(K):
                acc += _f32(row[k]) * x0[k]
            y[0, o] = acc * scale[o] + (bias[o] if has_bias else _f32(0.0))
    else:  # dequantise 4 rows into the scratch tile, then the 4x4 register tile over all M inputs
        for p in range(o0, o1, 4):
            nr = min(4, o1 - p)
            _dequant8_rows(w, scale, p, nr, buf)
            _tile(x, buf, nr, p, bias, has_bias, y)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _int8_kernel(x, w, scale, bias, has_bias, y):  # pragma: no cover - compiled
    for b in prange((w.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        buf = np.empty((4 if x.shape[0] > 1 else 0, x.shape[1]), dtype=np.float32)
        int8_block(x, w, scale, bias, has_bias, y, b, buf)


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _dequant4_rows(qw, scales, mins, o0, nr, buf):  # pragma: no cover - compiled
    # buf[r, :ngroups*G] = dequantised row o0 + r. For G = 32 the 16 bytes of a group are loaded into
    # scalars first and then written out: straight-line code the SLP vectoriser turns into
    # zero-extend / convert / FMA on whole 16-float vectors (see _compile_kernels).
    ng = scales.shape[1]
    H = qw.shape[1] // ng
    G = 2 * H
    for r in range(nr):
        o = o0 + r
        row = qw[o]
        dst = buf[r]
        if H == 16:
            for g in range(ng):
                q = row[g * 16:g * 16 + 16]
                q0, q1, q2, q3, q4, q5, q6, q7 = q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]
                q8, q9, q10, q11, q12, q13, q14, q15 = q[8], q[9], q[10], q[11], q[12], q[13], q[14], q[15]
                s = scales[o, g]
                mn = mins[o, g]
                d = dst[g * 32:g * 32 + 32]
                m4 = _u8(15)
                d[0] = _f32(q0 & m4) * s + mn
                d[1] = _f32(q1 & m4) * s + mn
                d[2] = _f32(q2 & m4) * s + mn
                d[3] = _f32(q3 & m4) * s + mn
                d[4] = _f32(q4 & m4) * s + mn
                d[5] = _f32(q5 & m4) * s + mn
                d[6] = _f32(q6 & m4) * s + mn
                d[7] = _f32(q7 & m4) * s + mn
                d[8] = _f32(q8 & m4) * s + mn
                d[9] = _f32(q9 & m4) * s + mn
                d[10] = _f32(q10 & m4) * s + mn
                d[11] = _f32(q11 & m4) * s + mn
                d[12] = _f32(q12 & m4) * s + mn
                d[13] = _f32(q13 & m4) * s + mn
                d[14] = _f32(q14 & m4) * s + mn
                d[15] = _f32(q15 & m4) * s + mn
                sh = _u8(4)
                d[16] = _f32(q0 >> sh) * s + mn
                d[17] = _f32(q1 >> sh) * s + mn
                d[18] = _f32(q2 >> sh) * s + mn
                d[19] = _f32(q3 >> sh) * s + mn
                d[20] = _f32(q4 >> sh) * s + mn
                d[21] = _f32(q5 >> sh) * s + mn
                d[22] = _f32(q6 >> sh) * s + mn
                d[23] = _f32(q7 >> sh) * s + mn
                d[24] = _f32(q8 >> sh) * s + mn
                d[25] = _f32(q9 >> sh) * s + mn
                d[26] = _f32(q10 >> sh) * s + mn
                d[27] = _f32(q11 >> sh) * s + mn
                d[28] = _f32(q12 >> sh) * s + mn
                d[29] = _f32(q13 >> sh) * s + mn
                d[30] = _f32(q14 >> sh) * s + mn
                d[31] = _f32(q15 >> sh) * s + mn
        else:  # other group sizes: plain loops (correct, not tuned)
            for g in range(ng):
                s = scales[o, g]
                mn = mins[o, g]
                for j in range(H):
                    byte = row[g * H + j]
                    dst[g * G + j] = _f32(byte & _u8(15)) * s + mn
                    dst[g * G + H + j] = _f32(byte >> _u8(4)) * s + mn


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def int4_block(x, qw, scales, mins, bias, has_bias, y, b, buf):  # pragma: no cover - compiled
    # x [M, K] f32, qw [N, G*H] u8, scales/mins [N, G] f32, y [M, N] f32 (written); H = group_size / 2;
    # buf: float32 scratch of at least [4 (1 when M == 1), G*H*2] (the calling thread's own)
    M, K = x.shape
    N = qw.shape[0]
    o0 = b * ROW_BLOCK
    o1 = min(o0 + ROW_BLOCK, N)
    if M == 1:  # dequantise one row (stays in L1) and dot it at once
        b0 = buf[0]
        x0 = x[0]
        for o in range(o0, o1):
            _dequant4_rows(qw, scales, mins, o, 1, buf)
            acc = _f32(0.0)
            for k in range(K):
                acc += b0[k] * x0[k]
            y[0, o] = acc + (bias[o] if has_bias else _f32(0.0))
    else:
        for p in range(o0, o1, 4):
            nr = min(4, o1 - p)
            _dequant4_rows(qw, scales, mins, p, nr, buf)
            _tile(x, buf, nr, p, bias, has_bias, y)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _int4_kernel(x, qw, scales, mins, bias, has_bias, y):  # pragma: no cover - compiled
    for b in prange((qw.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        buf = np.empty((4 if x.shape[0] > 1 else 1, 2 * qw.shape[1]), dtype=np.float32)
        int4_block(x, qw, scales, mins, bias, has_bias, y, b, buf)


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def f32_block(x, w, bias, has_bias, y, b):  # pragma: no cover - compiled
    # output rows [b * ROW_BLOCK, ...) of x [M, K] f32 @ w [N, K] f32 .T + bias -> y [M, N]
    M, K = x.shape
    N = w.shape[0]
    o0 = b * ROW_BLOCK
    o1 = min(o0 + ROW_BLOCK, N)
    if M == 1:
        x0 = x[0]
        for o in range(o0, o1):
            row = w[o]
            acc = _f32(0.0)
            for k in range(K):
                acc += row[k] * x0[k]
            y[0, o] = acc + (bias[o] if has_bias else _f32(0.0))
    else:  # the weight rows are already float32: the register tile reads them in place
        for p in range(o0, o1, 4):
            nr = min(4, o1 - p)
            _tile(x, w[p:p + nr], nr, p, bias, has_bias, y)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _f32_kernel(x, w, bias, has_bias, y):  # pragma: no cover - compiled
    for b in prange((w.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        f32_block(x, w, bias, has_bias, y, b)


# Not inlined: callers keep these flags. Reassociation lets the max-reduction vectorise (a max is exact in any order).
@njit(fastmath={"reassoc", "nnan", "ninf", "nsz"}, cache=True, nogil=True)
def _row_amax(row):  # pragma: no cover - compiled
    # max |row[k]|
    amax = _f32(0.0)
    for k in range(row.shape[0]):
        a = abs(row[k])
        if a > amax:
            amax = a
    return amax


# No 'reassoc' (nor 'arcp', 'contract') here: with it LLVM turned row[k] * (127 / amax) into (row[k] * 127) / amax
# on an AVX2 CPU, which rounds differently: a SmolLM2 activation that PyTorch takes to -11.499999 (-> -11) became
# -11.5 (-> -12). 127 / amax is one correctly rounded division, the product is rounded to float32, then rint: the
# bits of the reference path (quant.act_inv_scale).
@njit(fastmath={"nnan", "ninf", "nsz"}, cache=True, nogil=True)
def quant_row(row, dst):  # pragma: no cover - compiled
    # dst = round(row * (127 / max|row|)) as int8; returns the row's scale max|row| / 127
    K = row.shape[0]
    amax = _row_amax(row)
    if amax > 0:
        inv = _f32(127.0) / amax
        for k in range(K):
            dst[k] = np.int8(np.rint(row[k] * inv))
    else:
        for k in range(K):
            dst[k] = 0
    return amax / _f32(127.0)


@njit(cache=True, nogil=True)
def _quant_act(x, xq, xs):  # pragma: no cover - compiled
    # per-row symmetric int8 activations (see _quant_row)
    for m in range(x.shape[0]):
        xs[m] = quant_row(x[m], xq[m])


# no 'contract': a multiply and an add, each rounded, as PyTorch's reference computes them (no FMA), so the w8a8
# kernels and the reference path (quant.Int8Linear) give the same bits
@njit(fastmath={"nnan", "ninf", "nsz"}, cache=True, nogil=True)
def _rows_scale(yw, xs, bias, has_bias, y):  # pragma: no cover - compiled
    # y[m, n] = yw[m, n] * xs[m] + bias[n]; yw = the integer product already times the weight scales
    M, N = yw.shape
    for m in range(M):
        s = xs[m]
        src = yw[m]
        dst = y[m]
        if has_bias:
            for n in range(N):
                dst[n] = src[n] * s + bias[n]
        else:
            for n in range(N):
                dst[n] = src[n] * s


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def i8i8_block(xq, w, ws, yw, b):  # pragma: no cover - compiled
    # output rows [b * ROW_BLOCK, ...): yw[m, o] = float32(sum_k xq[m, k] * w[o, k]) * ws[o], the sum exact in int32
    # (|sum| <= 16129 K < 2**31). The accumulator is cut back to int32 at every step: numba's int32 + int32 is
    # int64, which LLVM vectorises as 64-bit lanes; in 32 bits it forms pmaddwd (int16 pairs into int32).
    M, K = xq.shape
    N = w.shape[0]
    o0 = b * ROW_BLOCK
    o1 = min(o0 + ROW_BLOCK, N)
    for o in range(o0, o1):
        row = w[o]
        s = ws[o]
        for m in range(M):
            xr = xq[m]
            acc = np.int32(0)
            for k in range(K):
                acc = np.int32(acc + np.int32(row[k]) * np.int32(xr[k]))
            yw[m, o] = _f32(acc) * s


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _i8i8_kernel(xq, w, ws, yw):  # pragma: no cover - compiled
    for b in prange((w.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        i8i8_block(xq, w, ws, yw, b)


_COMPILED: set[str] = set()
_SIGS: dict = {}
if numba is not None:
    _F2, _F1, _B = numba.float32[:, ::1], numba.float32[::1], numba.boolean
    _I8 = numba.int8[:, ::1]
    _SIGS = {
        "int8": ((_int8_kernel, (_F2, _I8, _F1, _F1, _B, _F2)),),
        "int4": ((_int4_kernel, (_F2, numba.uint8[:, ::1], _F2, _F2, _F1, _B, _F2)),),
        "f32": ((_f32_kernel, (_F2, _F2, _F1, _B, _F2)),),
        "w8a8": ((_quant_act, (_F2, _I8, _F1)), (_rows_scale, (_F2, _F1, _F1, _B, _F2)),
                 (_i8i8_kernel, (_I8, _I8, _F1, _F2)), (i8pairs._packed_kernel, i8pairs.SIGNATURE)),
    }


@contextlib.contextmanager
def slp_vectorize():
    """numba compiles with LLVM's SLP vectoriser on inside this context (numba leaves it off by default; the int4
    unpacking needs it: ~5x faster). For ``compile_kernels`` and for kernels compiled on first use with new
    argument types, e.g. the fused decode blocks on int4 weights."""
    cfg = numba.config
    old = getattr(cfg, "SLP_VECTORIZE", None)
    cfg.SLP_VECTORIZE = 1
    try:
        yield
    finally:
        if old is not None:
            cfg.SLP_VECTORIZE = old


def compile_kernels(kind: str) -> None:
    """Compile (or load from numba's on-disk cache, whose entries are keyed by the CPU name and features numba
    targets, so a cache made on another CPU is never loaded here) the ``kind`` kernels ("f32", "int8", "int4",
    "w8a8") for their one signature, with LLVM's SLP vectoriser on, then freeze the dispatchers so that no other,
    unvectorised specialisation is ever compiled behind our back."""
    if kind in _COMPILED:
        return
    if not ENABLED:
        raise RuntimeError("the numba kernels are off (numba missing or AIGC_NO_NUMBA set)")
    with slp_vectorize():
        for kernel, sig in _SIGS[kind]:
            kernel.compile(sig)
    for kernel, _ in _SIGS[kind]:
        kernel.disable_compile()
    _COMPILED.add(kind)


# ---------------------------------------------------------------------------------------- numpy-level entry points
# x / xq: [M, K] C-contiguous rows; y / yw: [M, N] float32 written in place; bias: [N] (or NO_BIAS with has_bias False)


def matmul_f32(x, w, bias, has_bias, y) -> None:
    compile_kernels("f32")
    _f32_kernel(x, w, bias, has_bias, y)


def matmul_int8(x, w, scale, bias, has_bias, y) -> None:
    compile_kernels("int8")
    _int8_kernel(x, w, scale, bias, has_bias, y)


def matmul_int4(x, qw, scales, mins, bias, has_bias, y) -> None:
    compile_kernels("int4")
    _int4_kernel(x, qw, scales, mins, bias, has_bias, y)


def matmul_i8i8(xq, w, ws, yw, wp=None) -> None:
    """``yw = float32(xq @ w.T) * ws`` for int8 ``xq [M, K]`` and ``w [N, K]``: the integer sum is exact. Up to
    ``PAIR_ROWS`` rows one row of ``w`` at a time; more rows through ``i8pairs`` on ``wp = i8pairs.pack_pairs(w)``
    (packed here when not given: callers that run a layer more than once keep it)."""
    compile_kernels("w8a8")
    if xq.shape[0] <= PAIR_ROWS:
        _i8i8_kernel(xq, w, ws, yw)
    else:
        i8pairs.packed_product(xq, i8pairs.pack_pairs(w) if wp is None else wp, ws, yw)


def quantize_rows(x, xq, xs) -> None:
    """Per-row symmetric int8: ``xq[m] = round(x[m] * 127 / max|x[m]|)``, ``xs[m] = max|x[m]| / 127``."""
    compile_kernels("w8a8")
    _quant_act(x, xq, xs)


def scale_rows(yw, xs, bias, has_bias, y) -> None:
    """``y = yw * xs[:, None] + bias``."""
    compile_kernels("w8a8")
    _rows_scale(yw, xs, bias, has_bias, y)


def linear_f32(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` for float32 CPU inference through the register-tile kernel (reads each weight row once for all
    input rows; faster than oneDNN here up to 16 rows, see ``onednn.py``). ``x [M, K]``, ``weight [N, K]``, both
    float32 and contiguous."""
    if not ENABLED:
        return torch.nn.functional.linear(x, weight, bias)
    y = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)
    b, has_b = (NO_BIAS, False) if bias is None else (bias.numpy(), True)
    matmul_f32(x.numpy(), weight.numpy(), b, has_b, y)
    return torch.from_numpy(y)


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for torch and for the numba kernels (numba's setting is per calling thread)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    if numba is not None:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
