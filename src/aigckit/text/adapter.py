"""LoRA adapters in peft's layout: the name table onto our fused linears, reading, and merging into base weights.

A peft adapter folder holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``, ...) and
``adapter_model.safetensors`` with two matrices per adapted HF module::

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight   [out, r]

and the adapted weight is ``W + scale * B @ A`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``). Our model fuses Q/K/V into one ``qkv`` linear and gate/up into ``gate_up`` (``weights.py``), so an
HF module maps onto a *row range* of one of our linears: ``LORA_TARGETS`` is that table. The trainable LoRA layers
live in ``aigckit.tune.lora``; this module is the read/merge side that ``load_lm(adapter=...)`` needs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from aigckit.errors import AigcError, CorruptFileError, UnsupportedFormatError
from aigckit.text.config import LMConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Target:
    """Where one HF module lives in our model: ``module`` (our dotted name), rows ``[row0, row0 + rows)`` of its
    ``[out, cols]`` weight."""

    hf: str  # e.g. "model.layers.3.self_attn.q_proj"
    short: str  # "q_proj" (what target_modules patterns name)
    module: str  # "blocks.3.attn.qkv"
    row0: int
    rows: int
    cols: int


def lora_targets(cfg: LMConfig) -> list[Target]:
    """Every linear an adapter may target, in HF naming, with its row range in our fused weights."""
    out: list[Target] = []
    d, ff = cfg.n_embd, cfg.intermediate_size
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        if cfg.arch == "llama":
            hf = f"model.layers.{i}"
            rows = [("self_attn.q_proj", "attn.qkv", 0, q, d), ("self_attn.k_proj", "attn.qkv", q, kv, d),
                    ("self_attn.v_proj", "attn.qkv", q + kv, kv, d), ("self_attn.o_proj", "attn.proj", 0, d, q),
                    ("mlp.gate_proj", "mlp.gate_up", 0, ff, d), ("mlp.up_proj", "mlp.gate_up", ff, ff, d),
                    ("mlp.down_proj", "mlp.down", 0, d, ff)]
        else:  # GPT-2: Conv1D modules, not split (peft's lora_A/lora_B have the Linear shapes)
            hf = f"transformer.h.{i}"
            rows = [("attn.c_attn", "attn.qkv", 0, q + 2 * kv, d), ("attn.c_proj", "attn.proj", 0, d, q),
                    ("mlp.c_fc", "mlp.fc", 0, ff, d), ("mlp.c_proj", "mlp.proj", 0, d, ff)]
        for name, ours, r0, n, cols in rows:
            out.append(Target(f"{hf}.{name}", name.rsplit(".", 1)[1], f"blocks.{i}.{ours}", r0, n, cols))
    return out


def match_targets(cfg: LMConfig, patterns: list[str] | str) -> list[Target]:
    """peft's ``target_modules`` rule: a string is a regex matched against the whole module name; a list matches a
    module whose name equals an entry or ends with ``.entry``; ``"all-linear"`` is every linear but the head."""
    targets = lora_targets(cfg)
    if patterns == "all-linear":
        chosen = targets
    elif isinstance(patterns, str):
        chosen = [t for t in targets if re.fullmatch(patterns, t.hf)]
    else:
        chosen = [t for t in targets if any(t.hf == p or t.hf.endswith("." + p) for p in patterns)]
    if not chosen:
        known = sorted({t.short for t in targets})
        raise AigcError(f"target modules {patterns!r} match no linear of this model; its linears: "
                        f"{', '.join(known)}", param="target_modules")
    return chosen


@dataclass
class Adapter:
    """A loaded peft LoRA adapter: its config and, per HF module name, ``(A [r, in], B [out, r])``."""

    config: dict
    weights: dict[str, tuple[Tensor, Tensor]]
    path: str = ""

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def scale(self) -> float:
        r, alpha = self.config["r"], self.config.get("lora_alpha", self.config["r"])
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "modules_to_save": (None, []),
               "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "fan_in_fan_out": (False, True, None)}


def check_adapter_config(cfg: dict, where: str) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedFormatError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise CorruptFileError(f"{where}: r must be a positive integer, got {cfg.get('r')!r}")
    for key, allowed in UNSUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise UnsupportedFormatError(f"{where}: {key}={cfg[key]!r} is not supported")


def read_adapter(path: str | Path) -> Adapter:
    """Read a peft LoRA adapter folder (strict: shapes are checked against the model when merged)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    cfile, wfile = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfile.exists() or not wfile.exists():
        raise AigcError(f"{path} is not a LoRA adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}",
                        param="adapter")
    try:
        cfg = json.loads(cfile.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{cfile}: cannot read ({e})") from e
    check_adapter_config(cfg, str(cfile))
    pairs: dict[str, dict[str, Tensor]] = {}
    try:
        with safe_open(str(wfile), framework="pt") as f:
            for key in f.keys():
                m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
                if m is None:
                    raise CorruptFileError(f"{wfile}: unexpected tensor {key} (only lora_A/lora_B weights are read)")
                pairs.setdefault(m.group(1), {})[m.group(2)] = f.get_tensor(key).float()
    except CorruptFileError:
        raise
    except Exception as e:  # safetensors' own error types for damaged headers
        raise CorruptFileError(f"{wfile}: not a valid safetensors file ({e})") from e
    weights = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CorruptFileError(f"{wfile}: {name} has lora_{'A' if 'A' not in ab else 'B'} missing")
        weights[name] = (ab["A"], ab["B"])
    return Adapter(cfg, weights, str(path))


def adapter_parts(cfg: LMConfig, adapter: Adapter) -> dict[str, list[tuple[int, Tensor, Tensor]]]:
    """Per our module name, ``(row0, A, B)`` for each adapted row range; unknown modules or shapes raise."""
    targets = {t.hf: t for t in lora_targets(cfg)}
    out: dict[str, list[tuple[int, Tensor, Tensor]]] = {}
    for name, (A, B) in adapter.weights.items():
        t = targets.get(name)
        if t is None:
            raise CorruptFileError(f"adapter {adapter.path} adapts {name}, which this model does not have")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or B.shape[0] != t.rows or A.shape[1] != t.cols:
            raise CorruptFileError(f"adapter {adapter.path}: {name} has A {tuple(A.shape)} and B {tuple(B.shape)}; "
                                   f"this model wants A [r, {t.cols}] and B [{t.rows}, r]")
        out.setdefault(t.module, []).append((t.row0, A, B))
    return out


def adapter_deltas(cfg: LMConfig, adapter: Adapter) -> dict[str, list[tuple[int, Tensor]]]:
    """Per our module name, ``(row0, scale * B @ A)`` for each adapted row range; unknown modules or shapes raise."""
    return {module: [(row0, adapter.scale * (B.double() @ A.double())) for row0, A, B in parts]
            for module, parts in adapter_parts(cfg, adapter).items()}


@torch.no_grad()
def merge_adapter(model: torch.nn.Module, adapter: Adapter) -> int:
    """``W += scale * B @ A`` in place for every adapted module (float64 product, rounded once); returns how many
    HF modules were merged."""
    for module, parts in adapter_deltas(model.config, adapter).items():
        w = model.get_submodule(module).weight
        for row0, delta in parts:
            rows = w[row0:row0 + delta.shape[0]]
            rows.copy_((rows.double() + delta).to(w.dtype))
    return len(adapter.weights)


def adapter_fingerprint(path: str | Path) -> str:
    """sha256 (16 hex digits) of an adapter's config and weights: keys caches of models it was merged into."""
    import hashlib

    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(Path(path).expanduser() / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
