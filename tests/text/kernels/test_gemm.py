"""The numba GEMM kernels against exact / float64 references (run under every ISA cap by test_isa_caps.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aigckit.text.kernels import ENABLED, cpu, gemm, i8pairs

needs_numba = pytest.mark.skipif(not ENABLED, reason="numba kernels off")
SHAPES = [(64, 32), (37, 5), (100, 33), (33, 64), (576, 192), (19, 3), (96, 18), (1536, 20)]
ROWS = [1, 2, 3, 4, 5, 8, 16, 17, 40]


@needs_numba
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_f32_matches_f_linear(shape):
    k, n = shape
    torch.manual_seed(0)
    w, b = torch.randn(n, k) * 0.05, torch.randn(n) * 0.1
    for m in ROWS:
        x = torch.randn(m, k)
        want = x.double() @ w.double().T + b.double()
        torch.testing.assert_close(gemm.linear_f32(x, w, b).double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gemm.linear_f32(x, w).double(), want - b.double(), atol=1e-5, rtol=1e-5)


@needs_numba
@pytest.mark.parametrize("shape", SHAPES)
def test_i8i8_product_is_exact_on_saturating_and_random_inputs(shape):
    # 127 x 127 pairs (and -127 x 127) are what an int16-saturating u8 x s8 kernel gets wrong; sums up to
    # 1536 * 16129 ~ 2.5e7 also exceed float32's exact integers, so only an integer accumulator passes
    k, n = shape
    rng = np.random.default_rng(k * 1000 + n)
    w = rng.integers(-127, 128, (n, k), dtype=np.int8)
    w[0] = 127
    if n > 1:
        w[1] = -127
    ws = np.ones(n, dtype=np.float32)
    for m in ROWS:
        xq = rng.integers(-127, 128, (m, k), dtype=np.int8)
        xq[0] = 127
        yw = np.empty((m, n), dtype=np.float32)
        gemm.matmul_i8i8(xq, w, ws, yw)
        want = xq.astype(np.int64) @ w.T.astype(np.int64)
        # float32 holds the int32 sum exactly below 2**24; above it, to the nearest float32 (one rounding)
        np.testing.assert_array_equal(yw, want.astype(np.float32))


@needs_numba
def test_i8i8_applies_the_weight_scales_after_the_integer_sum():
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (20, 48), dtype=np.int8)
    ws = rng.random(20).astype(np.float32)
    xq = rng.integers(-127, 128, (3, 48), dtype=np.int8)
    yw = np.empty((3, 20), dtype=np.float32)
    gemm.matmul_i8i8(xq, w, ws, yw)
    acc = (xq.astype(np.int64) @ w.T.astype(np.int64)).astype(np.float32)
    np.testing.assert_array_equal(yw, acc * ws)


def test_pack_pairs_puts_sixteen_rows_weight_pairs_side_by_side():
    rng = np.random.default_rng(2)
    w = rng.integers(-127, 128, (37, 9), dtype=np.int8)
    wp = i8pairs.pack_pairs(w)
    assert wp.shape == (3, 5, 32) and wp.dtype == np.int8  # ceil(37 / 16) blocks, ceil(9 / 2) pairs
    for o in (0, 15, 16, 36):
        for k in (0, 1, 7, 8):
            assert wp[o // 16, k // 2, 2 * (o % 16) + k % 2] == w[o, k]
    assert not wp[2, :, 2 * 5:].any() and not wp[:, 4, 1::2].any()  # padding rows (37..47) and input 9 are zero
    with pytest.raises(ValueError, match="int8"):
        i8pairs.pack_pairs(w.astype(np.int16))


@needs_numba
def test_packed_product_checks_that_the_weights_fit():
    w = np.ones((20, 10), dtype=np.int8)
    with pytest.raises(ValueError, match="do not fit"):
        i8pairs.packed_product(np.ones((4, 12), np.int8), i8pairs.pack_pairs(w), np.ones(20, np.float32),
                               np.empty((4, 20), np.float32))


@needs_numba
@pytest.mark.skipif(cpu.cpu_info().machine not in ("x86_64", "AMD64"), reason="x86 instruction names")
def test_packed_pairs_kernel_is_selected_as_pmaddwd_on_x86():
    # the point of writing the tile in vector IR: x86's backend turns the widening multiply-add into pmaddwd (16
    # products per instruction on AVX2), not 32-bit multiplies (8); this holds from SSE2 on, so under every cap
    import numba

    fresh = numba.njit(parallel=True, fastmath=True)(i8pairs._packed_kernel.py_func)  # not from numba's disk cache
    fresh.compile(i8pairs.SIGNATURE)
    asm = fresh.inspect_asm(fresh.signatures[0])
    assert "pmaddwd" in asm and "pmulld" not in asm


@needs_numba
def test_quantize_rows_matches_torch_reference():
    torch.manual_seed(3)
    x = torch.randn(7, 91) * torch.rand(7, 1) * 5
    x[2] = 0.0
    xq, xs = np.empty((7, 91), dtype=np.int8), np.empty(7, dtype=np.float32)
    gemm.quantize_rows(x.numpy(), xq, xs)
    amax = x.abs().amax(1, keepdim=True)
    want = torch.round(x * torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)).clamp(-127, 127)
    assert torch.equal(torch.from_numpy(xq).float(), want)
    torch.testing.assert_close(torch.from_numpy(xs), (amax / 127).squeeze(1))
