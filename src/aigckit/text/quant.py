"""Quantised weight formats: quantisers, ``Int8Linear`` / ``Int4Linear`` modules, whole-model quantisation, and
save / load. The kernels these layers run are in ``aigckit.text.kernels`` (``gemm`` for numba, ``onednn``).

Formats:

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
* **w8a8**: int8 weights as above *and* per-row int8 activations (``round(x * 127 / max|x|)``), multiplied as
  exact integers (``Int8Linear.int_product``), then ``y = (acc * w_scale) * x_scale + bias``.

Without the numba kernels (``kernels.ENABLED`` false), for M >= :data:`FALLBACK_MIN_ROWS`, for inputs that need a
gradient or with ``use_kernel=False``, a layer dequantises to float32 and calls ``F.linear`` instead (w8a8: on
fake-quantised activations), which is also the reference the kernels are tested against.

Cache packed weights with :func:`save_quantized` / :func:`load_quantized` (safetensors + a JSON layout in the
file's metadata; no pickle). :data:`FORMAT_VERSION` changes whenever what these files hold changes.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigckit.text.kernels import cpu, gemm, i8pairs, onednn
from aigckit.text.kernels._numba import ENABLED
from aigckit.text.kernels.decode import W8A8_FUSED_ROWS

QUANT_MODES = ("int8", "int4", "w8a8")
QuantMode = Literal["int8", "int4", "w8a8"]

__all__ = [
    "QUANT_MODES",
    "QuantMode",
    "FORMAT_VERSION",
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
    "FALLBACK_MIN_ROWS",
    "fake_quant_act",
]

# bump when the packed layout, the quantisers or the metadata change: it keys the store's cache of quantised weights
FORMAT_VERSION = 2
_META_KEY = "aigckit.quant"

# At and above this many input rows the layer dequantises and calls F.linear instead of the numba kernels. On the
# 2-core AVX-512 dev machine the kernels were still ~1.7x faster than dequantise + fp32 F.linear at M = 512
# (bench/kernel_speed.py --rows 256 512), so this only bounds very long prefills. Override: AIGC_QUANT_FALLBACK_ROWS.
FALLBACK_MIN_ROWS = int(os.environ.get("AIGC_QUANT_FALLBACK_ROWS", "1024"))


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


class _QuantLinear(nn.Module):
    in_features: int
    out_features: int
    bias: Tensor | None
    kernel_format: str  # the weight format the fused decode blocks see ("int8", "int4", "w8a8")

    def _dequantized(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dequantize(self) -> Tensor:
        """The float32 weight [out, in] these packed weights stand for."""
        return self._dequantized()

    def _rows_args(self) -> gemm.RowsArgs:  # pragma: no cover - abstract
        raise NotImplementedError

    def _run_kernel(self, xn: np.ndarray, yn: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def rows_args(self) -> gemm.RowsArgs:
        """The weights as numpy views for the kernels, cached while the buffers stay the same tensors."""
        key = self._buffer_key()
        cached = self.__dict__.get("_np_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._rows_args())
            self.__dict__["_np_cache"] = cached
        return cached[1]

    def _buffer_key(self) -> tuple:
        # ids suffice: the cached numpy views keep their tensors alive, so an id cannot be reused meanwhile
        return tuple(map(id, self._buffers.values()))

    def _bias_np(self) -> tuple[np.ndarray, bool]:
        return (gemm.NO_BIAS, False) if self.bias is None else (self.bias.numpy(), True)

    def forward(self, x: Tensor, *, use_kernel: bool | None = None) -> Tensor:
        """``x [..., in] -> [..., out]`` in ``x``'s dtype (computed in fp32).

        ``use_kernel``: None chooses (the numba kernels when enabled and M < FALLBACK_MIN_ROWS); False forces the
        dequantise-and-matmul path; True forces the kernel (raises if the kernels are off; no autograd).
        The automatic choice also falls back when ``x`` needs a gradient (the fallback is differentiable in ``x``).
        """
        if use_kernel is None and x.dtype == torch.float32 and ENABLED and x.is_cpu and not x.requires_grad:
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
                ENABLED
                and 0 < m < FALLBACK_MIN_ROWS
                and x2.device.type == "cpu"
                and not (x2.requires_grad and torch.is_grad_enabled())  # the kernels have no backward
            )
        elif use_kernel and not ENABLED:
            raise RuntimeError("the numba kernels are off (numba missing or AIGC_NO_NUMBA set)")
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


def act_inv_scale(amax: Tensor) -> Tensor:
    """``127 / amax`` as one correctly rounded float32 division (0 where ``amax`` is 0), as the kernels compute it.

    Not ``127.0 / amax``: PyTorch evaluates ``scalar / tensor`` as ``tensor.reciprocal() * scalar``, two roundings,
    one ulp off for some ``amax``. On a real activation row of SmolLM2 that turned 11.5 into 11.499999, so the
    reference path rounded values the kernels round to 12 down to 11: a whole row of a w8a8 layer one step apart."""
    return torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))


def fake_quant_act(x: Tensor) -> Tensor:
    """What ``w8a8`` does to activations, in float: per-row symmetric int8 round trip
    (``round(x * (127 / max|x|)) * max|x| / 127`` over the last dimension). Gradients pass straight through."""
    xf = x.detach().float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    inv = act_inv_scale(amax)
    fq = (torch.round(xf * inv).clamp_(-127, 127) * (amax / 127.0)).to(x.dtype)
    return x + (fq - x.detach())


class Int8Linear(_QuantLinear):
    """``nn.Linear`` replacement holding int8 weights with a per-row scale (buffers ``qweight``, ``scale``, ``bias``).

    ``act_quant=True`` is the ``w8a8`` mode: activations are quantised too, per input row (symmetric int8,
    ``round(x * 127 / max|x|)``, scale ``max|x| / 127``), the product runs as an exact int8 x int8 -> int32
    matrix multiply (``int_product``), then ``y = (acc * w_scale) * x_scale + bias``.
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

    @property
    def kernel_format(self) -> str:
        return "w8a8" if self.act_quant else "int8"

    def _rows_args(self) -> gemm.RowsArgs:
        b, has_b = self._bias_np()
        return gemm.RowsArgs(self.qweight.contiguous().numpy(), self.scale.contiguous().numpy(), gemm.NO_AUX, b,
                             has_b)

    def _run_kernel(self, xn, yn) -> None:
        w, s, _, b, has_b = self.rows_args()
        if self.act_quant:
            m = xn.shape[0]
            xq = np.empty((m, self.in_features), dtype=np.int8)
            xs = np.empty(m, dtype=np.float32)
            gemm.quantize_rows(xn, xq, xs)
            gemm.scale_rows(self.int_product(xq), xs, b, has_b, yn)
            return
        gemm.matmul_int8(xn, w, s, b, has_b, yn)

    def int_product(self, xq: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
        """``float32(xq @ qweight.T) * scale`` for int8 activation rows ``xq [M, in]``: float32 [M, out], the integer
        sums exact. Up to ``W8A8_FUSED_ROWS`` rows, or where oneDNN's u8 x s8 kernel is not exact (CPUs without
        VNNI, see ``kernels.cpu``), the numba kernels compute it (above ``gemm.PAIR_ROWS`` rows on weights packed
        in pairs once, ``kernels/i8pairs.py``); else oneDNN's ``qlinear_pointwise`` on weights prepacked once.
        All are exact, so a row's result does not depend on the batch or on the CPU.
        ``scratch``: an optional uint8 buffer of at least [M, in] for oneDNN's shifted copy of ``xq``."""
        m = xq.shape[0]
        if m > W8A8_FUSED_ROWS and cpu.onednn_u8s8_exact():
            plan = self.__dict__.get("_w8a8")
            if plan is None or plan[0] is not self.qweight:
                plan = (self.qweight, onednn.prepack_int8(self.qweight))
                self.__dict__["_w8a8"] = plan
            if plan[1] is not None:
                return onednn.qlinear_u8s8(xq, plan[1], self.scale, scratch)
        w, s = self.rows_args()[:2]
        yw = np.empty((m, self.out_features), dtype=np.float32)
        gemm.matmul_i8i8(xq, w, s, yw, self.packed_pairs() if m > gemm.PAIR_ROWS else None)
        return yw

    def packed_pairs(self) -> np.ndarray:
        """The int8 weights packed in pairs for the many-row numba product (``i8pairs.pack_pairs``), made on first
        use and kept, like oneDNN's prepacked weights (on CPUs without VNNI, once a step has more than
        ``gemm.PAIR_ROWS`` rows: a second copy of the weights, as large as the first)."""
        packed = self.__dict__.get("_pairs")
        if packed is None or packed[0] is not self.qweight:
            packed = (self.qweight, i8pairs.pack_pairs(self.rows_args().w))
            self.__dict__["_pairs"] = packed
        return packed[1]

    def forward(self, x: Tensor, *, use_kernel: bool | None = None) -> Tensor:
        if not self.act_quant:
            return super().forward(x, use_kernel=use_kernel)
        if use_kernel and not ENABLED:
            raise RuntimeError("the numba kernels are off (numba missing or AIGC_NO_NUMBA set)")
        if x.requires_grad and torch.is_grad_enabled():
            # differentiable: fake-quantised activations (straight-through) x dequantised weights
            b = None if self.bias is None else self.bias.float()
            return F.linear(fake_quant_act(x.float()), self._dequantized(), b).to(x.dtype)
        if use_kernel is False or not ENABLED or not x.is_cpu:
            return self._reference(x)
        x2 = _as_rows(x, self.in_features)  # every row count takes the integer path (batch-invariant results)
        m = x2.shape[0]
        yn = np.empty((m, self.out_features), dtype=np.float32)
        if m:
            self._run_kernel(x2.detach().numpy(), yn)
        y = torch.from_numpy(yn)
        return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*x.shape[:-1], self.out_features)

    def _reference(self, x: Tensor) -> Tensor:
        """The w8a8 arithmetic in PyTorch ops: per-row int8 activations, the integer sums exact (float64 holds them:
        |sum| <= 16129 K < 2**53), then ``(float32(acc) * w_scale) * x_scale + bias`` rounded op by op, which is
        what the kernels compute, bit for bit."""
        x2 = _as_rows(x, self.in_features).detach()
        amax = x2.abs().amax(dim=1, keepdim=True)
        inv = act_inv_scale(amax)
        xq = torch.round(x2 * inv).clamp_(-127, 127)
        acc = (xq.double() @ self.qweight.double().T).float()
        y = (acc * self.scale) * (amax / 127.0)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

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

    kernel_format = "int4"

    def _rows_args(self) -> gemm.RowsArgs:
        b, has_b = self._bias_np()
        return gemm.RowsArgs(self.qweight.contiguous().numpy(), self.scales.contiguous().numpy(),
                             self.mins.contiguous().numpy(), b, has_b)

    def _run_kernel(self, xn, yn) -> None:
        qw, s, mn, b, has_b = self.rows_args()
        gemm.matmul_int4(xn, qw, s, mn, b, has_b, yn)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group_size={self.group_size}"
        )


# ------------------------------------------------------------------------------------------------ whole models


def _check_mode(mode: str) -> None:
    if mode not in QUANT_MODES:
        raise ValueError(f"quantize mode must be one of {list(QUANT_MODES)}, got {mode!r}")


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
    Written to a temporary file of this process and thread, then renamed: a crash never leaves half a file, and two
    processes caching the same model at once do not write into one temporary file."""
    from safetensors.torch import save_file

    from aigckit.checkpoints import private_tmp

    path = os.fspath(path)
    tmp = str(private_tmp(path))
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
