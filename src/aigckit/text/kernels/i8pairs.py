"""Exact int8 x int8 products for several rows (``w8a8`` with more than two rows where oneDNN's u8 x s8 kernel is
not exact, i.e. CPUs without VNNI): weights packed in pairs, a 4 x 16 register tile written in LLVM IR.

Why not plain numba code: LLVM vectorises ``sum(int32(w[k]) * int32(x[k]))`` along k, which needs a horizontal
reduction per output and, in a register tile, more accumulators than there are registers (the 2 x 4 tile this
replaced: 55-80 GOPS on a 2-core Zen 3; ``gemm.i8i8_block``, one weight row at a time: 50-73). Here the product runs
along the outputs instead (140-224 GOPS, ``bench/i8i8_speed.py``):

* the weights ``w [N, K]`` are packed once per layer (``pack_pairs``) into ``wp [N/16, K/2, 32]``: for every
  block of 16 output rows and every pair of inputs ``(2j, 2j+1)``, the 16 rows' two weights side by side;
* the activation rows become int32 words of two int16 values ``(x[2j], x[2j+1])``, so one word broadcast over a
  vector lines up with 16 weight pairs;
* ``_tile`` is one loop over the K/2 pairs that keeps 4 rows x 16 outputs in eight 8 x int32 accumulators: per
  pair, two weight loads (16 x int8 -> int16 each), four broadcasts and eight "multiply int16 pairs, add both
  products into int32" operations. It is written as portable LLVM vector IR (sign-extend, multiply, add the even
  and odd lanes); x86's instruction selector turns that into ``pmaddwd`` (SSE2 and later), other targets into their
  own widening multiplies. The sums are exact on every CPU: int16 x int16
  products added in int32 (|sum| <= 16129 K < 2**31 for K < 133,000), no saturating instruction anywhere.

Rows are padded to a multiple of 4 and outputs to a multiple of 16 (zeros; the padded results are not written).
"""

from __future__ import annotations

import numpy as np

from aigckit.text.kernels._numba import ENABLED, njit, numba, prange

__all__ = ["TILE_ROWS", "TILE_OUT", "NO_PAIRS", "pack_pairs", "pair_row", "pair_rows", "pairs_block", "packed_product"]

TILE_ROWS = 4  # activation rows per register tile
TILE_OUT = 16  # output rows (weight rows) per register tile and per packed block
NO_PAIRS = np.zeros((0, 1, 2 * TILE_OUT), dtype=np.int8)  # "no packed weights" for kernels that take them optionally


def pack_pairs(w: np.ndarray) -> np.ndarray:
    """``w [N, K]`` int8 -> ``wp [ceil(N / 16), ceil(K / 2), 32]`` int8 with ``wp[b, j, 2 r + t] = w[16 b + r,
    2 j + t]`` (zeros beyond N and K)."""
    if w.dtype != np.int8 or w.ndim != 2:
        raise ValueError(f"pack_pairs takes int8 [N, K] weights, got {w.dtype} {list(w.shape)}")
    n, k = w.shape
    nb, k2 = -(-n // TILE_OUT), -(-k // 2)
    pad = np.zeros((nb * TILE_OUT, 2 * k2), dtype=np.int8)
    pad[:n, :k] = w
    return np.ascontiguousarray(pad.reshape(nb, TILE_OUT, k2, 2).transpose(0, 2, 1, 3)).reshape(nb, k2, 2 * TILE_OUT)


if numba is not None:
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    _I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
    _V16I8, _V16I16 = ir.VectorType(_I8, 16), ir.VectorType(_I16, 16)
    _V8I32, _V16I32 = ir.VectorType(_I32, 8), ir.VectorType(_I32, 16)
    _EVEN = ir.Constant(_V8I32, list(range(0, 16, 2)))
    _ODD = ir.Constant(_V8I32, list(range(1, 16, 2)))
    _ZEROS = ir.Constant(_V8I32, [0] * 8)

    def _madd(builder, a, b):
        # <16 x i16> a, b -> <8 x i32>: a[2i] b[2i] + a[2i+1] b[2i+1], exact. This form (products of the
        # sign-extended lanes, then even + odd lanes) is the one x86's backend selects as pmaddwd.
        p = builder.mul(builder.sext(a, _V16I32), builder.sext(b, _V16I32))
        return builder.add(builder.shuffle_vector(p, p, _EVEN), builder.shuffle_vector(p, p, _ODD))

    @intrinsic
    def _tile(typingctx, wp, woff, xp, xoff, ldx, npairs, acc):
        """acc[16 r + c] = sum_j pair_dot(wp.flat[woff + 32 j + 2 c : +2], xp.flat[xoff + ldx r + j]) for r < 4,
        c < 16 (acc: int32 [64], overwritten)."""
        sig = types.void(wp, woff, xp, xoff, ldx, npairs, acc)

        def codegen(context, builder, sig, args):
            wa, woff, xa, xoff, ldx, npairs, aa = args
            wd = context.make_array(sig.args[0])(context, builder, wa).data
            xd = context.make_array(sig.args[2])(context, builder, xa).data
            ad = context.make_array(sig.args[6])(context, builder, aa).data
            intp = woff.type
            # accumulators live in allocas that LLVM promotes to registers (eight ymm on AVX2)
            accs = [[cgutils.alloca_once_value(builder, _ZEROS) for _ in range(2)] for _ in range(TILE_ROWS)]
            with cgutils.for_range(builder, npairs) as loop:
                j = loop.index
                wrow = builder.gep(wd, [builder.add(woff, builder.mul(j, ir.Constant(intp, 2 * TILE_OUT)))])
                wv = []
                for c in range(2):
                    p = builder.bitcast(builder.gep(wrow, [ir.Constant(intp, 16 * c)]), _V16I8.as_pointer())
                    wv.append(builder.sext(builder.load(p, align=1), _V16I16))
                for r in range(TILE_ROWS):
                    xi = builder.add(builder.add(xoff, builder.mul(ldx, ir.Constant(intp, r))), j)
                    word = builder.load(builder.gep(xd, [xi]))
                    v = builder.insert_element(ir.Constant(_V8I32, ir.Undefined), word, ir.Constant(_I32, 0))
                    pair = builder.bitcast(builder.shuffle_vector(v, v, _ZEROS), _V16I16)  # (x0, x1) 8 times
                    for c in range(2):
                        builder.store(builder.add(builder.load(accs[r][c]), _madd(builder, wv[c], pair)), accs[r][c])
            for r in range(TILE_ROWS):
                for c in range(2):
                    p = builder.bitcast(builder.gep(ad, [ir.Constant(intp, r * TILE_OUT + 8 * c)]), _V8I32.as_pointer())
                    builder.store(builder.load(accs[r][c]), p, align=4)
            return context.get_dummy_value()

        return sig, codegen
else:  # pragma: no cover - without numba nothing here is called (ENABLED is False)
    def _tile(*args):
        raise RuntimeError("the numba kernels are off")


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def pair_row(q, x32):  # pragma: no cover - compiled
    # x32[j] = the int16 pair (q[2j], q[2j+1]) as one int32 word (q: one int8 activation row)
    K = q.shape[0]
    for j in range(K // 2):
        x32[j] = (np.int32(q[2 * j]) & 0xFFFF) | (np.int32(q[2 * j + 1]) << 16)
    if K % 2:
        x32[K // 2] = np.int32(q[K - 1]) & 0xFFFF


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def pair_rows(xq, x32):  # pragma: no cover - compiled
    # pair_row for every row of xq (x32 may have more rows: padding up to a multiple of TILE_ROWS, whose results
    # are computed and dropped)
    for m in range(xq.shape[0]):
        pair_row(xq[m], x32[m])


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def pairs_block(x32, M, wp, ws, yw, b, acc):  # pragma: no cover - compiled
    # output rows [16 b, 16 b + 16) of yw[m, o] = float32(sum_k xq[m, k] w[o, k]) * ws[o] for the first M rows;
    # x32: pair_rows(xq) with at least M rounded up to TILE_ROWS rows; acc: int32 [>= 64] scratch (the thread's own)
    N = yw.shape[1]
    k2 = wp.shape[1]
    o0 = b * TILE_OUT
    no = min(TILE_OUT, N - o0)
    for m0 in range(0, M, TILE_ROWS):
        _tile(wp, b * k2 * 2 * TILE_OUT, x32, m0 * k2, k2, k2, acc)
        for r in range(min(TILE_ROWS, M - m0)):
            for c in range(no):
                yw[m0 + r, o0 + c] = np.float32(acc[r * TILE_OUT + c]) * ws[o0 + c]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _packed_kernel(xq, wp, ws, yw):  # pragma: no cover - compiled
    # yw[m, o] = float32(sum_k xq[m, k] * w[o, k]) * ws[o] for wp = pack_pairs(w)
    M = xq.shape[0]
    x32 = np.empty(((M + TILE_ROWS - 1) // TILE_ROWS * TILE_ROWS, wp.shape[1]), dtype=np.int32)
    pair_rows(xq, x32)
    for b in prange(wp.shape[0]):
        acc = np.empty(TILE_ROWS * TILE_OUT, dtype=np.int32)
        pairs_block(x32, M, wp, ws, yw, b, acc)


SIGNATURE = ()
if numba is not None:
    SIGNATURE = (numba.int8[:, ::1], numba.int8[:, :, ::1], numba.float32[::1], numba.float32[:, ::1])


def packed_product(xq: np.ndarray, wp: np.ndarray, ws: np.ndarray, yw: np.ndarray) -> None:
    """``yw = float32(xq @ w.T) * ws`` for int8 ``xq [M, K]`` and ``wp = pack_pairs(w)``; the integer sums exact.
    Compiled by ``gemm.compile_kernels("w8a8")``."""
    if not ENABLED:
        raise RuntimeError("the numba kernels are off (numba missing or AIGC_NO_NUMBA set)")
    if wp.shape[1] != -(-xq.shape[1] // 2) or wp.shape[0] * TILE_OUT < yw.shape[1]:
        raise ValueError(f"packed weights {list(wp.shape)} do not fit activations {list(xq.shape)} -> "
                         f"{list(yw.shape)}")
    _packed_kernel(xq, wp, ws, yw)
