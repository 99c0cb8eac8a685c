"""oneDNN (PyTorch's mkldnn ops) for the shapes where it beats our numba kernels: float32 linears over many rows on
prepacked weights (``OneDNNLinear``), and ``w8a8``'s u8 x s8 integer product on CPUs where it is exact.

Float32 linears, measured on the AVX-512 development machine (all SmolLM2-135M linears of one step as the model
fuses them, 2 threads, best of 5; ``bench/kernels.py`` has the same columns for the unfused shapes):

    rows            1      5      16     64     512
    oneDNN packed   18.3   21.7   27.3   57.3   377   ms
    numba tile      12.9   17.7   26.3   59.0   508   ms
    F.linear (MKL)  -      -      -      122    732   ms

so rows <= SMALL_ROWS (decode, beam search, batched serving) take the numba tile kernel and prefill takes oneDNN.
Both are float32 arithmetic (different summation order); parity tests run on both paths. The layer keeps both
weight copies (plain rows and packed): float32 costs twice its weight bytes in memory for the speed.

u8 x s8: ``qlinear_pointwise`` reads uint8 activations (our int8 ``q`` + 128, zero point 128). Without VNNI its
kernels multiply byte pairs into int16 with saturation (255 * 127 * 2 > 32767), so it is used only where
``cpu.onednn_u8s8_exact()`` has checked that it is exact on this machine; elsewhere the numba kernel
(``gemm.matmul_i8i8``) computes every w8a8 product.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from aigckit.text.kernels import gemm
from aigckit.text.kernels._numba import ENABLED

__all__ = ["SMALL_ROWS", "available", "OneDNNLinear", "use_onednn", "prepack_int8", "qlinear_u8s8"]

SMALL_ROWS = 16  # at or below this many rows the numba tile kernel is as fast or faster (table above)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear(nn.Module):
    """Drop-in for a frozen float32 ``nn.Linear`` ([..., in] -> [..., out]); weights prepacked once."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float().contiguous()
        self.packed = w.to_mkldnn()  # oneDNN's blocked layout, packed once
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.weight = w if ENABLED else None  # plain rows for the small-M kernel

    @property
    def kernel_format(self) -> str | None:
        """"f32" when the fused decode blocks can read this layer's plain rows (``kernels.decode``)."""
        return "f32" if self.weight is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.requires_grad or x.device.type != "cpu":
            raise RuntimeError("OneDNNLinear is for float32 CPU inference only")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if self.weight is not None and x2.shape[0] <= SMALL_ROWS:
            y = gemm.linear_f32(x2, self.weight, self.bias)
        else:  # dense in, dense out: no per-call layout conversions of the activations
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)

    def rows_args(self) -> gemm.RowsArgs:
        """The weight rows with unit scales for the row-block kernels (cached)."""
        hit = self.__dict__.get("_args")
        if hit is None:
            b = self.bias
            hit = gemm.RowsArgs(self.weight.numpy(), np.ones(self.out_features, dtype=np.float32), gemm.NO_AUX,
                                b.numpy() if b is not None else gemm.NO_BIAS, b is not None)
            self.__dict__["_args"] = hit
        return hit

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_onednn(model: nn.Module) -> int:
    """Replace every float32 ``nn.Linear`` of a frozen model by ``OneDNNLinear``; returns how many."""
    if not available():
        return 0
    todo = [(name, mod) for name, mod in model.named_modules()
            if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.device.type == "cpu"]
    for name, mod in todo:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, OneDNNLinear(mod))
    return len(todo)


def prepack_int8(qweight: Tensor):
    """oneDNN's packed layout of an int8 [out, in] weight for ``qlinear_u8s8``, or None where unavailable."""
    ops = getattr(torch.ops, "onednn", None)
    if ops is None or not hasattr(ops, "qlinear_prepack") or not torch.backends.mkldnn.is_available():
        return None
    try:
        return ops.qlinear_prepack(qweight.contiguous(), None)
    except RuntimeError:  # pragma: no cover - builds or CPUs without the op
        return None


_ZP: dict[int, Tensor] = {}


def qlinear_u8s8(xq: np.ndarray, packed, w_scale: Tensor, scratch: np.ndarray | None = None) -> np.ndarray:
    """``float32(xq @ W.T) * w_scale`` for int8 rows ``xq [M, K]`` through oneDNN's u8 x s8 kernel on ``packed``
    (from ``prepack_int8``): ``xq + 128`` as uint8 with zero point 128. Exact only where the CPU has VNNI (see the
    module docstring). ``scratch``: an optional uint8 buffer of at least M * K bytes for the shifted copy."""
    m, k = xq.shape
    xu = np.empty((m, k), dtype=np.uint8) if scratch is None else scratch.reshape(-1)[:m * k].reshape(m, k)
    np.bitwise_xor(xq.view(np.uint8), np.uint8(0x80), out=xu)  # int8 q -> uint8 q + 128
    n = w_scale.shape[0]
    zp = _ZP.get(n)
    if zp is None:
        zp = _ZP[n] = torch.zeros(n, dtype=torch.int32)
    return torch.ops.onednn.qlinear_pointwise(torch.from_numpy(xu), 1.0, 128, packed, w_scale, zp, None, 1.0, 0,
                                             torch.float32, "none", [], "").numpy()
