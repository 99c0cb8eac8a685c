"""Several LoRA adapters served side by side from one loaded base model, chosen per row of a batch.

``load_lm(adapter=DIR)`` merges one adapter into the weights (``text/adapter.py``): the fastest way to run one
adapter, but a second adapter would need a second copy of every adapted weight. Here nothing is merged:

* the base model stays exactly as loaded (its fused decode kernels, quantised formats and prepacked weights);
* ``AdapterSet.model`` is a second module tree over the *same* tensors: the modules on the way from the root to
  each adapted linear are shallow copies, and each adapted linear is wrapped in a ``RowLoraLinear`` that holds,
  per adapter, only its ``(row0, A [r, in], B [rows, r], scale)`` parts and adds ``scale * B (A x)`` to the rows
  of the batch that use that adapter (S-LoRA / Punica's unmerged, per-row scheme, done with two small matmuls per
  adapter and linear on the CPU). An adapter costs its own A and B and nothing else;
* which adapter each batch row uses is a value of one forward call: ``using(selection)`` binds a ``Selection``
  (a tuple of ``(adapter index, rows)``, built once per call by ``select``) to a context variable for the duration
  of the call on the calling thread; the wrappers read it. Nothing shared is mutated per request, so the
  continuous-batching scheduler decodes requests for the base and for different adapters in the same batched
  step, and any number of threads may run ``AdapterModel``s (``LM.with_adapter``) at the same time.

Exactness: ``W x + scale * B (A x)`` is the same function as the merged ``(W + scale * B A) x`` up to float32
rounding (different summation order), as peft's unmerged layers are; greedy decodes agree token for token in the
tests. A batch with no adapter row runs the base model itself (the fused decode kernels); one with an adapter row
runs the wrapped tree, whose blocks take the per-module decode path (``kernels.decode._module_block``) plus the
LoRA matmuls: ``bench/tune_speed.py --adapters`` measures that cost per token.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigckit.errors import AigcError
from aigckit.text.adapter import adapter_parts, lora_targets, read_adapter

__all__ = ["AdapterSet", "AdapterModel", "RowLoraLinear", "Selection", "Stacked", "attach_adapters", "select", "using",
           "ADAPTER_NAME_PATTERN"]

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+@-]*$"  # no ':' (served ids are BASE:NAME)
_NAME_RE = re.compile(ADAPTER_NAME_PATTERN)

# ((adapter index, row indices or None for every row), ...): adapter rows of the current forward call
Selection = tuple[tuple[int, Tensor | None], ...]
_SELECTION: contextvars.ContextVar[Selection] = contextvars.ContextVar("aigc_lora_selection", default=())


def select(adapters: list[int]) -> Selection:
    """The ``Selection`` of a batch whose row ``i`` uses adapter ``adapters[i]`` (-1: the base model)."""
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(adapters):
        if k >= 0:
            groups.setdefault(k, []).append(i)
    n = len(adapters)
    return tuple((k, None if len(rows) == n else torch.tensor(rows, dtype=torch.long)) for k, rows in groups.items())


@contextlib.contextmanager
def using(selection: Selection):
    """Forward calls on this thread inside the block apply ``selection``'s adapters (a value; nothing shared)."""
    token = _SELECTION.set(selection)
    try:
        yield
    finally:
        _SELECTION.reset(token)


class Stacked(NamedTuple):
    """One adapter's parts on one linear, stacked so that they cost two matmuls: ``A [R, in]`` (the parts' A rows
    one after another, R = the sum of their ranks), ``B [out, R]`` (each part's B in its own rows and rank columns,
    zeros elsewhere) and the scale: the linear's output gains ``scale * B (A x)``."""

    A: Tensor
    B: Tensor
    scale: float


def stack_parts(parts: list[tuple[int, Tensor, Tensor]], out_features: int, scale: float,
                dtype: torch.dtype) -> Stacked:
    """``Stacked`` from ``(row0, A [r, in], B [rows, r])`` row-range parts of one adapter on one linear."""
    R = sum(A.shape[0] for _, A, _ in parts)
    B_full = torch.zeros(out_features, R, dtype=torch.float64)
    at = 0
    for row0, A, B in parts:
        r = A.shape[0]
        B_full[row0:row0 + B.shape[0], at:at + r] = B
        at += r
    A_cat = torch.cat([A for _, A, _ in parts]).to(dtype).contiguous()
    return Stacked(A_cat, B_full.to(dtype).contiguous(), scale)


class RowLoraLinear(nn.Module):
    """A base linear (any kind: ``nn.Linear``, ``OneDNNLinear``, a quantised linear) plus one ``Stacked`` per
    adapter (None where that adapter leaves this linear alone), applied to the rows the current ``Selection``
    gives each adapter."""

    def __init__(self, base: nn.Module, out_features: int, parts: tuple[Stacked | None, ...]) -> None:
        super().__init__()
        self.base = base
        self.out_features = out_features
        self.parts = parts

    @property
    def weight(self) -> Tensor | None:
        return getattr(self.base, "weight", None)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        selection = _SELECTION.get()
        if not selection:
            return y
        y = y.contiguous()  # a fresh tensor from the base linear: the adapters' terms are added in place
        for k, rows in selection:
            p = self.parts[k] if k < len(self.parts) else None
            if p is None:
                continue
            if rows is None:  # every row: y += scale * (x A^T) B^T in one addmm
                y2 = y.view(-1, self.out_features)
                y2.addmm_(F.linear(x.reshape(-1, x.shape[-1]).to(p.A.dtype), p.A), p.B.t(), alpha=p.scale)
            else:
                xs = x.index_select(0, rows).to(p.A.dtype)
                y.index_add_(0, rows, (F.linear(F.linear(xs, p.A), p.B) * p.scale).to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return f"adapters={sum(1 for p in self.parts if p is not None)}"


def _shallow(m: nn.Module) -> nn.Module:
    """A copy of ``m`` sharing its parameters, buffers and children (its child table is its own)."""
    c = copy.copy(m)
    c._modules = dict(m._modules)
    c.__dict__.pop("_decode_plan", None)  # kernels.decode's cached block plan belongs to the original
    return c


def _wrapped_tree(model: nn.Module, wrap: dict[str, tuple[Stacked | None, ...]]) -> nn.Module:
    """``model`` with the linears named in ``wrap`` wrapped in ``RowLoraLinear``; every tensor shared."""
    view = _shallow(model)
    copies: dict[str, nn.Module] = {"": view}
    for name, parts in wrap.items():
        path, _, leaf = name.rpartition(".")
        parent, at = view, ""
        for piece in path.split(".") if path else []:
            at = f"{at}.{piece}" if at else piece
            if at not in copies:
                copies[at] = _shallow(parent._modules[piece])
                parent._modules[piece] = copies[at]
            parent = copies[at]
        out_features = next(p.B.shape[0] for p in parts if p is not None)
        parent._modules[leaf] = RowLoraLinear(parent._modules[leaf], out_features, parts)
    return view


@dataclass(frozen=True)
class AdapterSet:
    """Adapters attached side by side to one base model: their names (index = position), folders, and the wrapped
    model tree that applies them per row (``model``; shares every base tensor)."""

    names: tuple[str, ...]
    paths: tuple[str, ...]
    model: nn.Module

    def index(self, name: str) -> int:
        """The index of adapter ``name``; an unknown name raises naming ``model`` (how requests choose one)."""
        try:
            return self.names.index(name)
        except ValueError:
            known = ", ".join(self.names) or "none"
            raise AigcError(f"adapter {name!r} is not loaded; adapters: {known}", param="model") from None


def attach_adapters(model: nn.Module, adapters: Mapping[str, str | os.PathLike]) -> AdapterSet:
    """Read the peft adapter folders ``{name: dir}`` and build the wrapped tree over ``model`` (left untouched)."""
    if not adapters:
        raise AigcError("give at least one adapter as NAME=DIR", param="adapter")
    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    wrap: dict[str, list[Stacked | None]] = {}
    names = list(adapters)
    out: dict[str, int] = {}  # out features of each adaptable linear (where its last row range ends)
    for t in lora_targets(model.config):
        out[t.module] = max(out.get(t.module, 0), t.row0 + t.rows)
    for k, name in enumerate(names):
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise AigcError(f"adapter name {name!r} is not valid: letters, digits, . _ + @ - (no ':')",
                            param="adapter")
        ad = read_adapter(adapters[name])
        for module, parts in adapter_parts(model.config, ad).items():
            wrap.setdefault(module, [None] * len(names))[k] = stack_parts(parts, out[module], ad.scale, dtype)
    view = _wrapped_tree(model, {m: tuple(p) for m, p in wrap.items()})
    return AdapterSet(tuple(names), tuple(str(adapters[n]) for n in names), view)


class AdapterModel(nn.Module):
    """The wrapped tree with every row on one adapter: a drop-in model for the engine (``LM.with_adapter``)."""

    def __init__(self, adapters: AdapterSet, index: int) -> None:
        super().__init__()
        self.net = adapters.model
        self.config = adapters.model.config
        self.index = index

    def forward(self, tokens: Tensor, *args, **kwargs) -> Tensor:
        with using(select([self.index] * tokens.shape[0])):
            return self.net(tokens, *args, **kwargs)
