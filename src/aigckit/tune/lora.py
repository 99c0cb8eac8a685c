"""LoRA (Hu et al. 2021) on our own linears: ``y = W x + scale * B A dropout(x)``, with W frozen.

Symbols (as in the paper and peft): ``r`` the rank, ``alpha`` the scaling numerator (``scale = alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA), ``A [r, in]`` initialised like peft (Kaiming-uniform, a = sqrt(5)), ``B [out, r]``
zero, so a fresh adapter leaves the model unchanged.

Our Q/K/V and gate/up linears are fused (``text/weights.py``); an HF module such as ``q_proj`` is a row range of
``qkv`` (``text/adapter.py``'s ``lora_targets``). ``LoRALinear`` wraps one of our linears and holds one (A, B) pair per
adapted HF module, each adding to its own rows, so saving in peft's layout is a rename and nothing else.

``add_lora(model, LoraConfig)`` wraps the targeted linears in place; ``adapters_disabled(model)`` turns them off for
the reference model of DPO/GRPO (no second copy of the base); ``save_adapter`` / ``load_adapter_weights`` read and
write peft's ``adapter_config.json`` + ``adapter_model.safetensors``; ``merged_model`` builds a plain model with the
adapter merged (for the fast generation engine), sharing every untouched weight with the base.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigckit.errors import AigcError
from aigckit.text.adapter import (CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, Adapter, Target, match_targets,
                                  read_adapter)

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or not 1 <= self.r <= 4096:
            raise AigcError(f"lora rank must be an integer in 1..4096, got {self.r!r}", param="lora_rank")
        if not self.alpha > 0:
            raise AigcError(f"lora alpha must be > 0, got {self.alpha}", param="lora_alpha")
        if not 0 <= self.dropout < 1:
            raise AigcError(f"lora dropout must be in [0, 1), got {self.dropout}", param="lora_dropout")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def peft_config(self, base_model: str = "") -> dict:
        """``adapter_config.json`` as peft writes it (the fields peft needs to load the adapter)."""
        targets = self.target_modules if isinstance(self.target_modules, str) else sorted(self.target_modules)
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout, "target_modules": targets,
                "use_rslora": self.use_rslora, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
                "init_lora_weights": True, "inference_mode": True, "use_dora": False, "rank_pattern": {},
                "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "revision": None}

    @classmethod
    def from_peft(cls, cfg: dict) -> LoraConfig:
        return cls(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])),
                   dropout=float(cfg.get("lora_dropout", 0.0)), target_modules=cfg["target_modules"],
                   use_rslora=bool(cfg.get("use_rslora", False)))


class LoraPair(nn.Module):
    """The trainable part for one HF module: ``A [r, in]``, ``B [out, r]``."""

    def __init__(self, r: int, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype))

    def reset(self, generator: torch.Generator | None) -> None:
        # peft: nn.init.kaiming_uniform_(A, a=sqrt(5)) -> bound = 1 / sqrt(in_features); B = 0
        bound = 1.0 / math.sqrt(self.A.shape[1])
        with torch.no_grad():
            self.A.uniform_(-bound, bound, generator=generator)
            self.B.zero_()


class LoRALinear(nn.Module):
    """A frozen linear plus LoRA pairs on row ranges of its output (``parts``: HF short name -> (row0, rows))."""

    def __init__(self, base: nn.Linear, targets: list[Target], cfg: LoraConfig) -> None:
        super().__init__()
        self.base = base
        self.scale = cfg.scale
        self.dropout = cfg.dropout
        self.enabled = True
        self.out_features = base.weight.shape[0]
        self.parts = {t.short: (t.row0, t.rows) for t in sorted(targets, key=lambda t: t.row0)}
        self.hf = {t.short: t.hf for t in targets}
        dtype = base.weight.dtype
        self.lora = nn.ModuleDict({s: LoraPair(cfg.r, base.weight.shape[1], rows, dtype)
                                   for s, (_, rows) in self.parts.items()})

    @property
    def weight(self) -> Tensor:  # the base weight (for code that reads .weight, e.g. dtype checks)
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def delta_weight(self) -> Tensor:
        """``scale * B @ A`` laid out over the base weight's rows (zeros where no pair adapts)."""
        w = self.base.weight
        out = torch.zeros_like(w)
        for s, (row0, rows) in self.parts.items():
            p = self.lora[s]
            out[row0:row0 + rows] = (p.B @ p.A) * self.scale
        return out

    def stacked(self) -> tuple[Tensor, Tensor]:
        """The pairs as one LoRA of rank R = sum of ranks: ``A [R, in]`` (the A's one after another) and
        ``B [out, R]`` (each B in its own rows and rank columns, zeros elsewhere), built from the parameters (so
        gradients flow back to each pair). One pair covering every row is itself."""
        pairs = [self.lora[s] for s in self.parts]
        if len(pairs) == 1 and self.parts[next(iter(self.parts))] == (0, self.out_features):
            return pairs[0].A, pairs[0].B
        A = torch.cat([p.A for p in pairs])
        R = A.shape[0]
        blocks, at, r0 = [], 0, 0
        for (row0, rows), p in zip(self.parts.values(), pairs):
            if row0 > at:
                blocks.append(A.new_zeros(row0 - at, R))
            r = p.A.shape[0]
            blocks.append(F.pad(p.B, (r0, R - r0 - r)))  # this pair's rank columns; zeros in the others
            r0, at = r0 + r, row0 + rows
        if at < self.out_features:
            blocks.append(A.new_zeros(self.out_features - at, R))
        return A, torch.cat(blocks)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        # y + scale * B (A h) with the pairs stacked: two small matmuls and one fused multiply-add over y, instead
        # of a matmul pair, a scaled copy and zero padding per HF module (the elementwise passes over [N, out] were
        # ~15% of an SFT step on SmolLM2); the scale multiplies the [N, R] intermediate, not the [N, out] output
        A, B = self.stacked()
        t = F.linear(h, A) * self.scale
        shape = y.shape
        return torch.addmm(y.reshape(-1, shape[-1]), t.reshape(-1, t.shape[-1]), B.t()).view(shape)


def add_lora(model: nn.Module, cfg: LoraConfig, generator: torch.Generator | None = None) -> list[LoRALinear]:
    """Freeze ``model`` and wrap the linears ``cfg.target_modules`` names; returns the new layers (model order)."""
    if lora_layers(model):
        raise AigcError("the model already has LoRA layers", param="adapter")
    model.requires_grad_(False)
    by_module: dict[str, list[Target]] = {}
    for t in match_targets(model.config, cfg.target_modules):
        by_module.setdefault(t.module, []).append(t)
    layers = []
    for name, targets in by_module.items():
        base = model.get_submodule(name)
        if type(base) is not nn.Linear:
            raise AigcError(f"{name} is a {type(base).__name__}: LoRA trains on plain float linears (load the model "
                            "with kernels='torch' and no quantisation)", param="model")
        layer = LoRALinear(base, targets, cfg)
        for pair in layer.lora.values():
            pair.reset(generator)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        layers.append(layer)
    return layers


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters in a fixed order (the optimiser's; checkpoints rely on it)."""
    return [p for layer in lora_layers(model) for s in layer.parts for p in (layer.lora[s].A, layer.lora[s].B)]


class LoraState(nn.Module):
    """Only the LoRA pairs of a model, under stable names: what training checkpoints save (never the base)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.pairs = nn.ModuleDict({layer.hf[s].replace(".", "_"): layer.lora[s]
                                    for layer in lora_layers(model) for s in layer.parts})


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The frozen base model for the duration (the reference model of DPO and the KL term of GRPO)."""
    layers = lora_layers(model)
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, b in zip(layers, before):
            layer.enabled = b


def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """peft's tensor names -> contiguous copies of A and B."""
    out = {}
    for layer in lora_layers(model):
        for s in layer.parts:
            p, hf = layer.lora[s], layer.hf[s]
            out[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = p.A.detach().contiguous().clone()
            out[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = p.B.detach().contiguous().clone()
    return out


def save_adapter(model: nn.Module, out: str | Path, cfg: LoraConfig, base_model: str = "") -> Path:
    """Write the adapter in peft's layout to ``out`` atomically (temp folder, then rename)."""
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.peft_config(base_model), indent=2))
        save_file(adapter_tensors(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def attach_adapter(model: nn.Module, path: str | Path | Adapter) -> LoraConfig:
    """Wrap ``model`` with the LoRA layers of a saved adapter and load its weights (to train it further, or to run
    with ``adapters_disabled``); returns its config."""
    adapter = path if isinstance(path, Adapter) else read_adapter(path)
    cfg = LoraConfig.from_peft(adapter.config)
    add_lora(model, cfg)
    layers = {layer.hf[s]: (layer, s) for layer in lora_layers(model) for s in layer.parts}
    missing = sorted(set(layers) - set(adapter.weights))
    extra = sorted(set(adapter.weights) - set(layers))
    if missing or extra:
        raise AigcError(f"adapter {adapter.path}: its tensors do not match its target_modules "
                        f"(missing {missing[:2]}, unexpected {extra[:2]})", param="adapter")
    with torch.no_grad():
        for hf, (layer, s) in layers.items():
            A, B = adapter.weights[hf]
            pair = layer.lora[s]
            if A.shape != pair.A.shape or B.shape != pair.B.shape:
                raise AigcError(f"adapter {adapter.path}: {hf} has A {tuple(A.shape)}, B {tuple(B.shape)}; the "
                                f"model wants {tuple(pair.A.shape)}, {tuple(pair.B.shape)}", param="adapter")
            pair.A.copy_(A)
            pair.B.copy_(B)
    return cfg


@torch.no_grad()
def merged_model(model: nn.Module) -> nn.Module:
    """A plain ``Transformer`` (no LoRA layers) whose adapted weights are ``W + scale * B @ A``; every other tensor
    is shared with ``model`` (no copy). For generation by the fast engine with the current adapter."""
    from aigckit.text.weights import load_into_model

    sd = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if ".lora." in name:
            continue
        sd[name.replace(".base.", ".")] = t.detach()
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            sd[f"{name}.weight"] = mod.base.weight.detach() + mod.delta_weight()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return load_into_model(model.config, sd, next(model.parameters()).dtype)


@torch.no_grad()
def refresh_merged(merged: nn.Module, model: nn.Module) -> None:
    """Bring a ``merged_model(model)`` up to date with ``model``'s current adapter: each adapted weight of ``merged``
    is rewritten in place (same tensors, so the engine's cached decode plans and buffers stay valid)."""
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            torch.add(mod.base.weight, mod.delta_weight(), out=merged.get_submodule(name).weight)


@torch.no_grad()
def merge_into_base(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer into its base weight in place and unwrap it (``aigc lora merge``)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            mod.base.weight.add_(mod.delta_weight())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, mod.base)
    return model


def lora_summary(model: nn.Module) -> dict:
    """How many parameters train, out of how many, and how many HF modules are adapted."""
    n_lora = sum(p.numel() for p in lora_parameters(model))
    n_base = sum(p.numel() for n, p in model.named_parameters() if ".lora." not in n)
    return {"lora_params": n_lora, "base_params": n_base, "modules": sum(len(m.parts) for m in lora_layers(model))}
