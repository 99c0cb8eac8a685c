"""Inference-only fast path for float32 linears on CPU: a numba register-tile kernel for few rows, oneDNN
(mkldnn) with prepacked weights for many.

Measured on the development machine (all SmolLM2-135M linears of one step as the model fuses them, 2 threads,
quiet machine, best of 5; ``bench/kernels.py`` has the same columns for the unfused shapes):

    rows            1      5      16     64     512
    oneDNN packed   18.3   21.7   27.3   57.3   377   ms
    numba tile      12.9   17.7   26.3   59.0   508   ms
    F.linear (MKL)  -      -      -      122    732   ms

so rows <= SMALL_ROWS (decode, beam search, batched serving) take the numba kernel and prefill takes oneDNN. Both
are float32 arithmetic (different summation order); parity tests run on both paths. The layer keeps both weight
copies (plain and packed): float32 costs twice its weight bytes in memory for the speed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from aigckit.text import quant

SMALL_ROWS = 16  # at or below this many rows the numba kernel is as fast or faster (table above)


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
        self.weight = w if quant.HAVE_NUMBA else None  # plain rows for the small-M kernel

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.requires_grad or x.device.type != "cpu":
            raise RuntimeError("OneDNNLinear is for float32 CPU inference only")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if self.weight is not None and x2.shape[0] <= SMALL_ROWS:
            y = quant.linear_f32(x2, self.weight, self.bias)
        else:  # dense in, dense out: no per-call layout conversions of the activations
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)

    def _kernel_args(self) -> tuple:
        """(weight rows, per-row scale, bias, has_bias) for the row-block kernels, as ``Int8Linear._kernel_args``
        gives them: float32 rows with unit scales go through the same fused block kernels (``decode_kernels``)."""
        hit = self.__dict__.get("_args")
        if hit is None:
            b = self.bias
            hit = (self.weight.numpy(), np.ones(self.out_features, dtype=np.float32),
                   b.numpy() if b is not None else np.zeros(1, dtype=np.float32), b is not None)
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
