"""LMConfig: one typed config for the decoder-only transformer family (GPT-2 and Llama variants).

Variants are chosen by plain fields (``arch``), never guessed from file names. Presets are plain dicts looked up
by exact name; an unknown name raises with the list of known names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from aigckit.errors import AigcError

Arch = Literal["gpt2", "llama"]


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
            raise AigcError(f"unknown arch {self.arch!r}; expected 'gpt2' or 'llama'")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise AigcError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise AigcError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("linear", "llama3", "default", None):
                raise AigcError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")

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
        """Map a Hugging Face config.json (GPT2Config / LlamaConfig and Llama-like) onto LMConfig."""
        mt = hf.get("model_type")
        if mt == "gpt2":
            return cls(
                arch="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
                block_size=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", True), bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"), name=name,
            )
        if mt in ("llama", "mistral"):
            if hf.get("sliding_window"):
                raise AigcError("sliding-window attention is not supported")
            if hf.get("hidden_act", "silu") != "silu":
                raise AigcError(f"unsupported hidden_act {hf.get('hidden_act')!r} for a Llama-family model")
            if hf.get("attention_bias") or hf.get("mlp_bias"):
                raise AigcError("Llama models with attention/MLP biases are not supported")
            return cls(
                arch="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads"),
                n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                block_size=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                bias=False, tie_embeddings=hf.get("tie_word_embeddings", False),
                rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
                rope_scaling=_hf_rope_scaling(hf), head_dim=hf.get("head_dim"),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), name=name,
            )
        raise AigcError(f"unsupported model_type {mt!r}; supported: gpt2, llama (and Llama-compatible mistral)")

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
