"""LMConfig: one typed config for the decoder-only transformer family (GPT-2 and Llama variants).

Variants are chosen by plain fields (``arch``), never guessed from file names. Presets are plain dicts looked up
by exact name; an unknown name raises with the list of known names.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from aigckit.errors import AigcError, CorruptFileError

Arch = Literal["gpt2", "llama"]

# Upper bounds for the sizes a model is built from: far above any model this toolkit can run on a CPU, low enough
# that a corrupt or hostile file cannot ask for an absurd allocation.
MAX_VOCAB = 4_194_304
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_WIDTH = 65_536
MAX_FFN = 1_048_576
MAX_HEAD_DIM = 4096
MAX_CONTEXT = 1_048_576


class ConfigFieldError(AigcError):
    """An invalid value for one LMConfig field; ``field`` is its name, so loaders can name their own key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _check_int(name: str, v: Any, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigFieldError(name, f"{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ConfigFieldError(name, f"{name} must be in {lo}..{hi}, got {v}")


def _check_float(name: str, v: Any, lo: float, hi: float) -> None:
    """A finite number in the open interval (lo, hi)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo < v < hi:
        raise ConfigFieldError(name, f"{name} must be a finite number in ({lo:g}, {hi:g}), got {v!r}")


def _check_rope_scaling(rs: Any, block_size: int) -> None:
    if not isinstance(rs, dict):
        raise ConfigFieldError("rope_scaling", f"rope_scaling must be a dict, got {type(rs).__name__}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in ("linear", "llama3", "default", None):
        raise ConfigFieldError("rope_scaling", f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
    if kind in ("linear", "llama3"):
        _check_float("rope_scaling.factor", rs.get("factor"), 0.0, 1e6)
    if kind == "llama3":
        lo, hi = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        _check_float("rope_scaling.low_freq_factor", lo, 0.0, 1e6)
        _check_float("rope_scaling.high_freq_factor", hi, 0.0, 1e6)
        if not lo < hi:
            raise ConfigFieldError("rope_scaling", f"rope_scaling needs low_freq_factor < high_freq_factor, got "
                                   f"{lo} and {hi}")
        _check_int("rope_scaling.original_max_position_embeddings",
                   rs.get("original_max_position_embeddings", 8192), 1, MAX_CONTEXT)


@dataclass
class LMConfig:
    arch: Arch = "llama"
    vocab_size: int = 32000
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    n_embd: int = 64
    intermediate_size: int | None = None  # MLP hidden size; None = 4 * n_embd
    block_size: int = 2048  # context window
    norm_eps: float = 1e-5
    bias: bool = False  # biases in the linear layers (GPT-2: True)
    tie_embeddings: bool = True  # output projection shares the token embedding
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    head_dim: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ConfigFieldError("arch", f"unknown arch {self.arch!r}; expected 'gpt2' or 'llama'")
        # every size the model is built from: a positive int within bounds no real model exceeds (so a file saying
        # context_length 4294967295 or head_count 0 fails here, with the field's name, not deep inside the model)
        for name, hi in (("vocab_size", MAX_VOCAB), ("n_layer", MAX_LAYERS), ("n_head", MAX_HEADS),
                         ("n_embd", MAX_WIDTH), ("block_size", MAX_CONTEXT)):
            _check_int(name, getattr(self, name), 1, hi)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _check_int("n_kv_head", self.n_kv_head, 1, self.n_head)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        _check_int("intermediate_size", self.intermediate_size, 1, MAX_FFN)
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ConfigFieldError("n_head", f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        _check_int("head_dim", self.head_dim, 1, MAX_HEAD_DIM)
        if self.arch == "llama" and self.head_dim % 2:
            raise ConfigFieldError("head_dim", f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.arch == "gpt2" and self.head_dim * self.n_head != self.n_embd:
            raise ConfigFieldError("head_dim", f"GPT-2 needs head_dim * n_head == n_embd, got {self.head_dim} * "
                                   f"{self.n_head} != {self.n_embd}")
        if self.n_head % self.n_kv_head:
            raise ConfigFieldError("n_kv_head", f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        _check_float("norm_eps", self.norm_eps, 0.0, 1.0)
        _check_float("rope_theta", self.rope_theta, 0.0, 1e12)
        self.norm_eps, self.rope_theta = float(self.norm_eps), float(self.rope_theta)
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigFieldError(name, f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            for i in (v if isinstance(v, list) else [] if v is None else [v]):
                _check_int(name, i, 0, self.vocab_size - 1)
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, self.block_size)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise AigcError(f"unknown LMConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LMConfig:
        if name not in PRESETS:
            raise AigcError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "custom") -> LMConfig:
        """Map a Hugging Face config.json (GPT2Config / LlamaConfig and Llama-like) onto LMConfig.

        A missing or invalid value raises ``CorruptFileError`` naming the config.json key."""
        if not isinstance(hf, dict):
            raise CorruptFileError(f"config.json must hold a JSON object, got {type(hf).__name__}")
        mt = hf.get("model_type")
        if mt == "gpt2":
            table = HF_GPT2_FIELDS
            fixed: dict[str, Any] = {"arch": "gpt2", "bias": True}
            if hf.get("n_inner") is None:  # GPT-2's default MLP width
                fixed["intermediate_size"] = None
        elif mt in ("llama", "mistral"):
            if hf.get("sliding_window"):
                raise AigcError("sliding-window attention is not supported")
            if hf.get("hidden_act", "silu") != "silu":
                raise AigcError(f"unsupported hidden_act {hf.get('hidden_act')!r} for a Llama-family model")
            if hf.get("attention_bias") or hf.get("mlp_bias"):
                raise AigcError("Llama models with attention/MLP biases are not supported")
            table = HF_LLAMA_FIELDS
            fixed = {"arch": "llama", "bias": False, "rope_scaling": _hf_rope_scaling(hf)}
            if "rope_theta" not in hf and isinstance(hf.get("rope_parameters"), dict):  # transformers >= 5 layout
                fixed["rope_theta"] = hf["rope_parameters"].get("rope_theta", 10000.0)
        else:
            raise AigcError(f"unsupported model_type {mt!r}; supported: gpt2, llama (and Llama-compatible mistral)")
        kwargs: dict[str, Any] = {}
        for ours, (key, default) in table.items():
            if ours in fixed:
                continue
            if key not in hf and default is _REQUIRED:
                raise CorruptFileError(f"config.json has no {key!r} (needed for a {mt} model)")
            kwargs[ours] = hf.get(key, None if default is _REQUIRED else default)
        kwargs.update(fixed)
        try:
            return cls(**kwargs, name=name)
        except ConfigFieldError as e:
            key = table.get(e.field.split(".")[0], (e.field, None))[0]
            raise CorruptFileError(f"config.json: invalid {key!r}: {e}") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> LMConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)


def _hf_rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    rs = hf.get("rope_scaling")
    if rs is None and isinstance(hf.get("rope_parameters"), dict):  # transformers >= 5 layout
        rp = hf["rope_parameters"]
        if rp.get("rope_type", "default") != "default":
            rs = rp
    if not rs:
        return None
    rs = dict(rs)
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    rs["rope_type"] = kind
    rs.pop("type", None)
    rs.pop("rope_theta", None)
    return rs


_REQUIRED = object()
# LMConfig field -> (config.json key, default when absent; _REQUIRED: the key must be there)
HF_GPT2_FIELDS: dict[str, tuple[str, Any]] = {
    "vocab_size": ("vocab_size", _REQUIRED), "n_layer": ("n_layer", _REQUIRED), "n_head": ("n_head", _REQUIRED),
    "n_embd": ("n_embd", _REQUIRED), "intermediate_size": ("n_inner", None), "block_size": ("n_positions", _REQUIRED),
    "norm_eps": ("layer_norm_epsilon", 1e-5), "tie_embeddings": ("tie_word_embeddings", True),
    "bos_token_id": ("bos_token_id", None), "eos_token_id": ("eos_token_id", None),
}
HF_LLAMA_FIELDS: dict[str, tuple[str, Any]] = {
    "vocab_size": ("vocab_size", _REQUIRED), "n_layer": ("num_hidden_layers", _REQUIRED),
    "n_head": ("num_attention_heads", _REQUIRED), "n_kv_head": ("num_key_value_heads", None),
    "n_embd": ("hidden_size", _REQUIRED), "intermediate_size": ("intermediate_size", _REQUIRED),
    "block_size": ("max_position_embeddings", 2048), "norm_eps": ("rms_norm_eps", 1e-6),
    "tie_embeddings": ("tie_word_embeddings", False), "rope_theta": ("rope_theta", 10000.0),
    "rope_scaling": ("rope_scaling", None), "head_dim": ("head_dim", None),
    "bos_token_id": ("bos_token_id", None), "eos_token_id": ("eos_token_id", None),
}

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(arch="gpt2", vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True,
                 tie_embeddings=True, bos_token_id=50256, eos_token_id=50256),
    "gpt2-medium": dict(arch="gpt2", vocab_size=50257, n_layer=24, n_head=16, n_embd=1024, block_size=1024,
                        bias=True, tie_embeddings=True, bos_token_id=50256, eos_token_id=50256),
    "gpt2-large": dict(arch="gpt2", vocab_size=50257, n_layer=36, n_head=20, n_embd=1280, block_size=1024,
                       bias=True, tie_embeddings=True, bos_token_id=50256, eos_token_id=50256),
    "smollm2-135m": dict(arch="llama", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                         intermediate_size=1536, block_size=8192, norm_eps=1e-5, rope_theta=100000.0,
                         tie_embeddings=True, bos_token_id=1, eos_token_id=2),
    "smollm2-360m": dict(arch="llama", vocab_size=49152, n_layer=32, n_head=15, n_kv_head=5, n_embd=960,
                         intermediate_size=2560, block_size=8192, norm_eps=1e-5, rope_theta=100000.0,
                         tie_embeddings=True, bos_token_id=1, eos_token_id=2),
    "tiny-llama-test": dict(arch="llama", vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                            intermediate_size=128, block_size=256),
    "tiny-gpt2-test": dict(arch="gpt2", vocab_size=256, n_layer=2, n_head=4, n_embd=64, block_size=256, bias=True),
}
