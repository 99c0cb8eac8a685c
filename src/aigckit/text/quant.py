"""Weight-only quantised linear layers with fast CPU kernels.

Two formats, both weight-only (activations stay fp32):

* **int8**, symmetric per output row: ``w[o, k] ~= q[o, k] * scale[o]`` with ``q`` in [-127, 127]
  (``scale = max|w[o, :]| / 127``). Rounding error per element is at most ``scale[o] / 2``.
* **int4**, asymmetric group-wise (like GGUF Q4_1): the input dimension is cut into groups of ``group_size``
  (even, default 32) and ``w ~= q * scale[o, g] + min[o, g]`` with ``q`` in [0, 15],
  ``scale = (max - min) / 15`` over the group. Packing, two values per byte: byte ``j`` (0 <= j < G/2) of
  group ``g`` in row ``o`` holds element ``g*G + j`` in its low nibble and element ``g*G + G/2 + j`` in its high
  nibble -- for G = 32 this is exactly GGUF's Q4_1 block layout, so Q4_1 blocks can be used directly
  (``qweight = qs``, ``scales = d``, ``mins = m``). Scales and mins are stored as float32 (Q4_1 uses f16).
  When ``in_features`` is not a multiple of ``group_size`` the last group is padded (with a copy of the row's
  last value, so min/max stay those of the real values); the kernels never read the padded elements.

Kernels: numba ``@njit(parallel=True, fastmath=True, cache=True)``, one call per layer that reads the packed
weights once for all M = B*T input rows; a parallel loop over blocks of 16 output rows.

* M = 1 (decode): int8 rows are converted and dotted in one loop; int4 rows are unpacked into an L1-resident
  fp32 row (the 16 bytes of a group -> two 16-float vectors: zero-extend, convert, ``q*scale + min``) and dotted.
* M > 1: 4 rows are dequantised into a small fp32 tile, then a 4 (weight rows) x 4 (input rows) register tile
  of 16 accumulators, each vectorised along ``in``, computes all M outputs (16 FMAs per 8 loads).

The int4 unpacking is straight-line code that only LLVM's SLP vectoriser turns into vector instructions; numba
leaves SLP off by default, so the kernels are compiled once, with it switched on, for their one signature
(:func:`_compile_kernels`). Without numba, for M >= :data:`FALLBACK_MIN_ROWS`, for inputs that need a gradient
or with ``use_kernel=False``, the layer dequantises to fp32 and calls ``F.linear`` instead.

Cache packed weights with :func:`save_quantized` / :func:`load_quantized` (safetensors + a JSON layout in the
file's metadata; no pickle).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

QUANT_MODES = ("int8", "int4", "w8a8")

__all__ = [
    "QuantMode",
    "quantize_int8",
    "dequantize_int8",
    "quantize_int4",
    "dequantize_int4",
    "Int8Linear",
    "Int4Linear",
    "quantize_model",
    "quant_layout",
    "prepare_quantized",
    "quantized_state_dict",
    "save_quantized",
    "load_quantized",
    "set_num_threads",
    "HAVE_NUMBA",
    "FALLBACK_MIN_ROWS",
    "fake_quant_act",
    "linear_f32",
]

QuantMode = Literal["int8", "int4", "w8a8"]
_MODES = ("int8", "int4", "w8a8")
_META_KEY = "aigckit.quant"

# At and above this many input rows the layer dequantises and calls F.linear instead of the numba kernels. On the
# 2-core AVX-512 dev machine the kernels were still ~1.7x faster than dequantise + fp32 F.linear at M = 512
# (bench/kernels.py --rows 256 512), so this only bounds very long prefills. Override: AIGC_QUANT_FALLBACK_ROWS.
FALLBACK_MIN_ROWS = int(os.environ.get("AIGC_QUANT_FALLBACK_ROWS", "1024"))

# --------------------------------------------------------------------------------------------- kernels (numba)

try:  # numba is optional: without it every call takes the dequantise-and-matmul path
    import numba as _numba
    from numba import njit, prange

    HAVE_NUMBA = os.environ.get("AIGC_NO_NUMBA", "") == ""
except ImportError:  # pragma: no cover - exercised only where numba is absent
    _numba = None
    HAVE_NUMBA = False

_ROW_BLOCK = 16  # output rows per parallel work item

if _numba is not None:
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
    def _int8_block(x, w, scale, bias, has_bias, y, b, buf):  # pragma: no cover - compiled
        # output rows [b * _ROW_BLOCK, ...) of x [M, K] f32 @ (w [N, K] i8 * scale [N] f32).T + bias -> y [M, N];
        # buf: float32 scratch of at least [4, K] for M > 1 (the calling thread's own)
        M, K = x.shape
        N = w.shape[0]
        o0 = b * _ROW_BLOCK
        o1 = min(o0 + _ROW_BLOCK, N)
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
        for b in prange((w.shape[0] + _ROW_BLOCK - 1) // _ROW_BLOCK):
            buf = np.empty((4 if x.shape[0] > 1 else 0, x.shape[1]), dtype=np.float32)
            _int8_block(x, w, scale, bias, has_bias, y, b, buf)

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
    def _int4_block(x, qw, scales, mins, bias, has_bias, y, b, buf):  # pragma: no cover - compiled
        # x [M, K] f32, qw [N, G*H] u8, scales/mins [N, G] f32, y [M, N] f32 (written); H = group_size / 2;
        # buf: float32 scratch of at least [4 (1 when M == 1), G*H*2] (the calling thread's own)
        M, K = x.shape
        N = qw.shape[0]
        o0 = b * _ROW_BLOCK
        o1 = min(o0 + _ROW_BLOCK, N)
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
        for b in prange((qw.shape[0] + _ROW_BLOCK - 1) // _ROW_BLOCK):
            buf = np.empty((4 if x.shape[0] > 1 else 1, 2 * qw.shape[1]), dtype=np.float32)
            _int4_block(x, qw, scales, mins, bias, has_bias, y, b, buf)

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def _f32_block(x, w, bias, has_bias, y, b):  # pragma: no cover - compiled
        # output rows [b * _ROW_BLOCK, ...) of x [M, K] f32 @ w [N, K] f32 .T + bias -> y [M, N]
        M, K = x.shape
        N = w.shape[0]
        o0 = b * _ROW_BLOCK
        o1 = min(o0 + _ROW_BLOCK, N)
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
        for b in prange((w.shape[0] + _ROW_BLOCK - 1) // _ROW_BLOCK):
            _f32_block(x, w, bias, has_bias, y, b)

    # reassociation lets the max-reduction vectorise; no 'arcp', so 127 / amax stays a correctly rounded division
    # (the torch reference computes the same float32 reciprocal). Not inlined: callers keep these flags.
    @njit(fastmath={"reassoc", "nnan", "ninf", "nsz"}, cache=True, nogil=True)
    def _quant_row(row, dst):  # pragma: no cover - compiled
        # dst = round(row * (127 / max|row|)) as int8; returns the row's scale max|row| / 127
        K = row.shape[0]
        amax = _f32(0.0)
        for k in range(K):
            a = abs(row[k])
            if a > amax:
                amax = a
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
            xs[m] = _quant_row(x[m], xq[m])

    @njit(fastmath=True, cache=True, nogil=True)
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

    @njit(fastmath=True, cache=True, nogil=True)
    def _acc_scale(acc, ws, yw):  # pragma: no cover - compiled
        # the torch._int_mm fallback: yw = float32(acc) * ws, as oneDNN's qlinear computes it
        M, N = acc.shape
        for m in range(M):
            for n in range(N):
                yw[m, n] = _f32(acc[m, n]) * ws[n]

    _F2 = _numba.float32[:, ::1]
    _F1 = _numba.float32[::1]
    _SIG8 = (_F2, _numba.int8[:, ::1], _F1, _F1, _numba.boolean, _F2)
    _SIG4 = (_F2, _numba.uint8[:, ::1], _F2, _F2, _F1, _numba.boolean, _F2)
    _KERNEL_SIGS = {
        "int8": ((_int8_kernel,), _SIG8),
        "int4": ((_int4_kernel,), _SIG4),
        "f32": ((_f32_kernel,), (_F2, _F2, _F1, _numba.boolean, _F2)),
        "w8a8": ((_quant_act, _rows_scale, _acc_scale),
                 [(_F2, _numba.int8[:, ::1], _F1), (_F2, _F1, _F1, _numba.boolean, _F2),
                  (_numba.int32[:, ::1], _F1, _F2)]),
    }

_COMPILED: set[str] = set()


@contextlib.contextmanager
def slp_vectorize():
    """numba compiles with LLVM's SLP vectoriser on inside this context (numba leaves it off by default; the int4
    unpacking needs it: ~5x faster). For ``_compile_kernels`` and for kernels compiled on first use with new
    argument types, e.g. the fused decode blocks on int4 weights."""
    cfg = _numba.config
    old = getattr(cfg, "SLP_VECTORIZE", None)
    cfg.SLP_VECTORIZE = 1
    try:
        yield
    finally:
        if old is not None:
            cfg.SLP_VECTORIZE = old


def _compile_kernels(kind: str) -> None:
    """Compile (or load from numba's on-disk cache) the ``kind`` kernel for its one signature, with LLVM's SLP
    vectoriser switched on (``slp_vectorize``), then freeze the dispatcher so that no other, unvectorised
    specialisation is ever compiled behind our back."""
    if kind in _COMPILED:
        return
    kernels, sig = _KERNEL_SIGS[kind]
    with slp_vectorize():
        sigs = sig if isinstance(sig, list) else [sig] * len(kernels)
        for kernel, one in zip(kernels, sigs):
            kernel.compile(one)
    for kernel in kernels:
        kernel.disable_compile()
    _COMPILED.add(kind)


_EMPTY_BIAS = torch.zeros(1, dtype=torch.float32)


def linear_f32(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` for float32 CPU inference through the numba register-tile kernel (reads each weight row once
    for all input rows; faster than oneDNN here up to 16 rows, see ``fastpath``). ``x [M, K]``, ``weight [N, K]``,
    both float32 and contiguous."""
    if _numba is None or not HAVE_NUMBA:
        return F.linear(x, weight, bias)
    _compile_kernels("f32")
    y = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)
    b, has_b = (_EMPTY_BIAS, False) if bias is None else (bias, True)
    _f32_kernel(x.numpy(), weight.numpy(), b.numpy(), has_b, y)
    return torch.from_numpy(y)


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for torch and for the numba kernels (numba's setting is per calling thread)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    if _numba is not None:
        _numba.set_num_threads(min(n, _numba.config.NUMBA_NUM_THREADS))


# ------------------------------------------------------------------------------------------------ quantisers


def _check_weight(w: Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"weight must be floating point, got {w.dtype}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(w.shape)}")


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: returns ``(q int8 [out, in], scale f32 [out])`` with ``w ~= q * scale[:, None]``."""
    _check_weight(w)
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    return q.to(torch.float32).mul_(scale.float()[:, None])


def _check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even integer >= 2, got {group_size!r}")


def quantize_int4(w: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise 4-bit (Q4_1-like). Returns ``(qweight, scales, mins)``:

    * ``qweight`` uint8 [out, ngroups * group_size // 2], packed as described in the module docstring,
    * ``scales``, ``mins`` float32 [out, ngroups]; ``w ~= q * scale + min``, ``q`` in [0, 15],
    * ``ngroups = ceil(in / group_size)``; the last group is padded when ``in % group_size != 0``.
    """
    _check_weight(w)
    _check_group_size(group_size)
    w = w.detach().float()
    out_f, in_f = w.shape
    ngroups = -(-in_f // group_size)
    pad = ngroups * group_size - in_f
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)
    wg = w.view(out_f, ngroups, group_size)
    lo = wg.amin(dim=2)
    hi = wg.amax(dim=2)
    scales = (hi - lo) / 15.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round((wg - lo[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
    half = group_size // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return packed.reshape(out_f, ngroups * half).contiguous(), scales.contiguous(), lo.contiguous()


def dequantize_int4(qweight: Tensor, scales: Tensor, mins: Tensor, in_features: int) -> Tensor:
    """Inverse of :func:`quantize_int4` (drops the padding): float32 [out, in_features]."""
    out_f, ngroups = scales.shape
    half = qweight.shape[1] // ngroups
    p = qweight.view(out_f, ngroups, half)
    q = torch.cat([p & 15, p >> 4], dim=2).to(torch.float32)
    w = q.mul_(scales[..., None].float()).add_(mins[..., None].float())
    return w.reshape(out_f, ngroups * 2 * half)[:, :in_features]


# ------------------------------------------------------------------------------------------------ modules


def _as_rows(x: Tensor, in_features: int) -> Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"expected input with last dimension {in_features}, got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, in_features)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    return x2.contiguous()


def _prepack(qweight: Tensor):
    """oneDNN's packed layout of an int8 [out, in] weight for ``qlinear_pointwise``, or None where unavailable."""
    ops = getattr(torch.ops, "onednn", None)
    if ops is None or not hasattr(ops, "qlinear_prepack") or not torch.backends.mkldnn.is_available():
        return None
    try:
        return ops.qlinear_prepack(qweight.contiguous(), None)
    except RuntimeError:  # pragma: no cover - CPUs without the needed ISA
        return None


_ZP: dict[int, Tensor] = {}


def _zero_points(n: int) -> Tensor:
    zp = _ZP.get(n)
    if zp is None:
        zp = _ZP[n] = torch.zeros(n, dtype=torch.int32)
    return zp


class _QuantLinear(nn.Module):
    in_features: int
    out_features: int
    bias: Tensor | None

    def _dequantized(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dequantize(self) -> Tensor:
        """The float32 weight [out, in] these packed weights stand for."""
        return self._dequantized()

    def _np_args(self) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def _kernel_args(self) -> tuple:
        """The kernel's weight arguments as numpy views, cached while the buffers stay the same tensors."""
        key = self._buffer_key()
        cached = self.__dict__.get("_np_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._np_args())
            self.__dict__["_np_cache"] = cached
        return cached[1]

    def _buffer_key(self) -> tuple:
        # ids suffice: the cached numpy views keep their tensors alive, so an id cannot be reused meanwhile
        return tuple(map(id, self._buffers.values()))

    def forward(self, x: Tensor, *, use_kernel: bool | None = None) -> Tensor:
        """``x [..., in] -> [..., out]`` in ``x``'s dtype (computed in fp32).

        ``use_kernel``: None chooses (numba when available and M < FALLBACK_MIN_ROWS); False forces the
        dequantise-and-matmul path; True forces the numba kernel (raises if numba is missing; no autograd).
        The automatic choice also falls back when ``x`` needs a gradient (the fallback is differentiable in ``x``).
        """
        if use_kernel is None and x.dtype == torch.float32 and HAVE_NUMBA and x.is_cpu and not x.requires_grad:
            # fast path for inference (decode calls this ~200 times per token): no extra tensor objects
            shape = x.shape
            if shape[-1] != self.in_features:
                raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(shape)}")
            x2 = x.reshape(-1, self.in_features)
            m = x2.shape[0]
            if 0 < m < FALLBACK_MIN_ROWS:
                yn = np.empty((*shape[:-1], self.out_features), dtype=np.float32)
                self._run_kernel((x2 if x2.is_contiguous() else x2.contiguous()).numpy(), yn.reshape(m, -1))
                return torch.from_numpy(yn)
        lead = x.shape[:-1]
        x2 = _as_rows(x, self.in_features)
        m = x2.shape[0]
        if use_kernel is None:
            use_kernel = (
                HAVE_NUMBA
                and 0 < m < FALLBACK_MIN_ROWS
                and x2.device.type == "cpu"
                and not (x2.requires_grad and torch.is_grad_enabled())  # the kernels have no backward
            )
        elif use_kernel and _numba is None:
            raise RuntimeError("numba is not installed; the quantised kernels are unavailable")
        if use_kernel:
            yn = np.empty((m, self.out_features), dtype=np.float32)
            if m:
                self._run_kernel(x2.detach().numpy(), yn)
            y = torch.from_numpy(yn)
        else:
            b = None if self.bias is None else self.bias.float()
            y = F.linear(x2, self._dequantized(), b)
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        return y.view(*lead, self.out_features)

    def _kernel(self, x2: Tensor, y: Tensor) -> None:
        """Run the numba kernel: ``y[M, out] = x2[M, in] @ W.T + bias`` (both float32, contiguous, CPU)."""
        self._run_kernel(x2.detach().numpy(), y.numpy())

    def _bias_np(self):
        if self.bias is None:
            return _EMPTY_BIAS.numpy(), False
        return self.bias.numpy(), True


def fake_quant_act(x: Tensor) -> Tensor:
    """What ``w8a8`` does to activations, in float: per-row symmetric int8 round trip
    (``round(x * (127 / max|x|)) * max|x| / 127`` over the last dimension). Gradients pass straight through."""
    xf = x.detach().float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    fq = (torch.round(xf * inv).clamp_(-127, 127) * (amax / 127.0)).to(x.dtype)
    return x + (fq - x.detach())


class Int8Linear(_QuantLinear):
    """``nn.Linear`` replacement holding int8 weights with a per-row scale (buffers ``qweight``, ``scale``, ``bias``).

    ``act_quant=True`` is the ``w8a8`` mode: activations are quantised too, per input row (symmetric int8,
    ``round(x * 127 / max|x|)``, scale ``max|x| / 127``), the product runs as an exact int8 x int8 -> int32
    matrix multiply (oneDNN's VNNI kernels, see ``int_product``), then ``y = (acc * w_scale) * x_scale + bias``.
    Integer accumulation is exact and each row has its own scale, so a row's output does not depend on which other
    rows share the batch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, act_quant: bool = False,
                 device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_quant = act_quant
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, act_quant: bool = False) -> Int8Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, act_quant=act_quant,
                  device="meta")
        q, s = quantize_int8(linear.weight)
        mod.qweight, mod.scale = q, s
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().contiguous().clone()
        return mod

    def _dequantized(self) -> Tensor:
        return dequantize_int8(self.qweight, self.scale)

    def _np_args(self) -> tuple:
        b, has_b = self._bias_np()
        # w8a8 reads the weight through oneDNN (``int_product``), not numba: no numpy view is needed
        w = None if self.act_quant else self.qweight.contiguous().numpy()
        return w, self.scale.contiguous().numpy(), b, has_b

    def _run_kernel(self, xn, yn) -> None:
        w, s, b, has_b = self._kernel_args()
        if self.act_quant:
            _compile_kernels("w8a8")
            m = xn.shape[0]
            xq = np.empty((m, self.in_features), dtype=np.int8)
            xs = np.empty(m, dtype=np.float32)
            _quant_act(xn, xq, xs)
            _rows_scale(self.int_product(xq), xs, b, has_b, yn)
            return
        _compile_kernels("int8")
        _int8_kernel(xn, w, s, b, has_b, yn)

    def int_product(self, xq: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
        """``(xq @ qweight.T) * scale`` for int8 activation rows ``xq [M, in]``: float32 [M, out]. The int8 x int8
        products are summed exactly in int32 by oneDNN's VNNI kernels: ``qlinear_pointwise`` on weights prepacked
        once (13% faster than ``torch._int_mm`` at 16 rows here), else ``torch._int_mm``. One backend serves every
        row count, so a row's result does not depend on the batch. ``scratch``: an optional uint8 buffer of at
        least [M, in] for oneDNN's shifted copy of ``xq``."""
        plan = self.__dict__.get("_w8a8")
        if plan is None or plan[0] is not self.qweight:
            plan = (self.qweight, _prepack(self.qweight))
            self.__dict__["_w8a8"] = plan
        packed = plan[1]
        if packed is not None:
            m, k = xq.shape
            xu = np.empty((m, k), dtype=np.uint8) if scratch is None else scratch.reshape(-1)[:m * k].reshape(m, k)
            np.bitwise_xor(xq.view(np.uint8), np.uint8(0x80), out=xu)  # int8 q -> uint8 q + 128 (zero point 128)
            xu = torch.from_numpy(xu)
            return torch.ops.onednn.qlinear_pointwise(xu, 1.0, 128, packed, self.scale, _zero_points(self.out_features),
                                                     None, 1.0, 0, torch.float32, "none", [], "").numpy()
        acc = torch._int_mm(torch.from_numpy(xq), self.qweight.t()).numpy()
        yw = np.empty(acc.shape, dtype=np.float32)
        _acc_scale(acc, self.scale.numpy(), yw)
        return yw

    def forward(self, x: Tensor, *, use_kernel: bool | None = None) -> Tensor:
        if not self.act_quant:
            return super().forward(x, use_kernel=use_kernel)
        if use_kernel and _numba is None:
            raise RuntimeError("numba is not installed; the quantised kernels are unavailable")
        if use_kernel is False or not HAVE_NUMBA or not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
            # float reference of the same arithmetic: fake-quantised activations x dequantised weights
            b = None if self.bias is None else self.bias.float()
            return F.linear(fake_quant_act(x.float()), self._dequantized(), b).to(x.dtype)
        x2 = _as_rows(x, self.in_features)  # every row count takes the integer path (batch-invariant results)
        m = x2.shape[0]
        yn = np.empty((m, self.out_features), dtype=np.float32)
        if m:
            self._run_kernel(x2.detach().numpy(), yn)
        y = torch.from_numpy(yn)
        return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                + (", act_quant=True" if self.act_quant else ""))


class Int4Linear(_QuantLinear):
    """``nn.Linear`` replacement holding group-wise 4-bit weights (buffers ``qweight``, ``scales``, ``mins``, ``bias``)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 32, device=None
    ) -> None:
        super().__init__()
        _check_group_size(group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        ngroups = -(-in_features // group_size)
        self.register_buffer(
            "qweight", torch.zeros(out_features, ngroups * group_size // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.zeros(out_features, ngroups, dtype=torch.float32, device=device))
        self.register_buffer("mins", torch.zeros(out_features, ngroups, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size, device="meta")
        mod.qweight, mod.scales, mod.mins = quantize_int4(linear.weight, group_size)
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().contiguous().clone()
        return mod

    def _dequantized(self) -> Tensor:
        return dequantize_int4(self.qweight, self.scales, self.mins, self.in_features)

    def _np_args(self) -> tuple:
        b, has_b = self._bias_np()
        return (self.qweight.contiguous().numpy(), self.scales.contiguous().numpy(), self.mins.contiguous().numpy(),
                b, has_b)

    def _run_kernel(self, xn, yn) -> None:
        _compile_kernels("int4")
        qw, s, mn, b, has_b = self._kernel_args()
        _int4_kernel(xn, qw, s, mn, b, has_b, yn)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group_size={self.group_size}"
        )


# ------------------------------------------------------------------------------------------------ whole models


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"quantize mode must be one of {list(_MODES)}, got {mode!r}")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quantize_model(
    model: nn.Module,
    mode: QuantMode,
    *,
    group_size: int = 32,
    skip: Callable[[str, nn.Linear], bool] | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` submodule (except those for which ``skip(name, module)`` is true) by an
    :class:`Int8Linear` / :class:`Int4Linear`, in place. Returns ``model``. Weights must be real (not meta);
    to build empty quantised modules for loading a cache, use :func:`prepare_quantized`."""
    _check_mode(mode)
    if mode == "int4":
        _check_group_size(group_size)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear and name and not (skip is not None and skip(name, mod))
    ]
    for name, lin in targets:
        if lin.weight.is_meta:
            raise ValueError(f"{name}.weight is on the meta device; load weights first or use prepare_quantized")
        if mode == "int4":
            new = Int4Linear.from_linear(lin, group_size)
        else:
            new = Int8Linear.from_linear(lin, act_quant=mode == "w8a8")
        _set_submodule(model, name, new)
    return model


def quant_layout(model: nn.Module) -> dict[str, dict]:
    """``{module name: {"mode", "in", "out", "bias", ["group_size"]}}`` for every quantised submodule."""
    layout: dict[str, dict] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Int8Linear):
            layout[name] = {"mode": "w8a8" if mod.act_quant else "int8", "in": mod.in_features, "out": mod.out_features, "bias": mod.bias is not None}
        elif isinstance(mod, Int4Linear):
            layout[name] = {
                "mode": "int4",
                "in": mod.in_features,
                "out": mod.out_features,
                "bias": mod.bias is not None,
                "group_size": mod.group_size,
            }
    return layout


def prepare_quantized(model: nn.Module, layout: dict[str, dict]) -> nn.Module:
    """Swap the ``nn.Linear`` modules named in ``layout`` (from :func:`quant_layout`) for empty quantised modules,
    ready for ``load_state_dict``. Works on meta-device models."""
    for name, spec in layout.items():
        old = model.get_submodule(name)
        if type(old) is not nn.Linear:
            raise ValueError(f"{name} is {type(old).__name__}, expected nn.Linear to quantise")
        if (old.in_features, old.out_features, old.bias is not None) != (spec["in"], spec["out"], spec["bias"]):
            raise ValueError(f"{name}: layout {spec} does not match {old}")
        _check_mode(spec["mode"])
        if spec["mode"] in ("int8", "w8a8"):
            new: nn.Module = Int8Linear(spec["in"], spec["out"], spec["bias"], act_quant=spec["mode"] == "w8a8")
        else:
            new = Int4Linear(spec["in"], spec["out"], spec["bias"], group_size=int(spec["group_size"]))
        _set_submodule(model, name, new)
    return model


def quantized_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as contiguous CPU tensors, ready for ``safetensors.torch.save_file``."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the (partly) quantised model's weights to a safetensors file with its quant layout in the metadata.
    Written to ``path + '.tmp'`` and renamed, so a crash never leaves half a file."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file(quantized_state_dict(model), tmp, metadata={_META_KEY: json.dumps(quant_layout(model), sort_keys=True)})
    os.replace(tmp, path)


def load_quantized(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save_quantized` into ``model`` (the unquantised architecture, may be on the
    meta device): swaps in the quantised modules named in the file, then loads all tensors (``assign=True``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{path} has no '{_META_KEY}' metadata; was it written by save_quantized?")
    prepare_quantized(model, json.loads(meta[_META_KEY]))
    model.load_state_dict(load_file(path), strict=strict, assign=True)
    return model
