"""Checkpoint formats -> our state_dict, by explicit name tables.

Each table maps one of *our* parameter names (``{}`` = layer index) to a recipe over *source* tensor names:
  "src"                         copy
  ("T", "src")                  transpose (GPT-2's Conv1D stores weights as [in, out])
  ("cat", [r1, r2, ...])        concatenate recipes along dim 0 (fused QKV, fused gate/up)
  ("unpermute", "src", "q"|"k") undo llama.cpp's row permutation of Q/K for its RoPE layout
Loading is strict: unknown or missing keys and shape mismatches raise ``CorruptFileError``. The model is built on
the meta device and filled with ``load_state_dict(assign=True)``.

Only safetensors and GGUF are read (no pickle).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aigckit.errors import CorruptFileError, UnsupportedFormatError
from aigckit.text.config import ConfigFieldError, LMConfig

Recipe = Any

# ------------------------------------------------------------------------------------------------ name tables

HF_LLAMA: dict[str, Recipe] = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "blocks.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blocks.{}.attn.qkv.weight": ("cat", ["model.layers.{}.self_attn.q_proj.weight",
                                          "model.layers.{}.self_attn.k_proj.weight",
                                          "model.layers.{}.self_attn.v_proj.weight"]),
    "blocks.{}.attn.proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blocks.{}.mlp_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blocks.{}.mlp.gate_up.weight": ("cat", ["model.layers.{}.mlp.gate_proj.weight",
                                             "model.layers.{}.mlp.up_proj.weight"]),
    "blocks.{}.mlp.down.weight": "model.layers.{}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",  # untied models only
}
# source keys that carry no weights (buffers some exporters write); ignored by name, never silently by accident
HF_LLAMA_IGNORED = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]

HF_GPT2: dict[str, Recipe] = {
    "tok_emb.weight": "wte.weight",
    "pos_emb.weight": "wpe.weight",
    "blocks.{}.attn_norm.weight": "h.{}.ln_1.weight",
    "blocks.{}.attn_norm.bias": "h.{}.ln_1.bias",
    "blocks.{}.attn.qkv.weight": ("T", "h.{}.attn.c_attn.weight"),
    "blocks.{}.attn.qkv.bias": "h.{}.attn.c_attn.bias",
    "blocks.{}.attn.proj.weight": ("T", "h.{}.attn.c_proj.weight"),
    "blocks.{}.attn.proj.bias": "h.{}.attn.c_proj.bias",
    "blocks.{}.mlp_norm.weight": "h.{}.ln_2.weight",
    "blocks.{}.mlp_norm.bias": "h.{}.ln_2.bias",
    "blocks.{}.mlp.fc.weight": ("T", "h.{}.mlp.c_fc.weight"),
    "blocks.{}.mlp.fc.bias": "h.{}.mlp.c_fc.bias",
    "blocks.{}.mlp.proj.weight": ("T", "h.{}.mlp.c_proj.weight"),
    "blocks.{}.mlp.proj.bias": "h.{}.mlp.c_proj.bias",
    "norm.weight": "ln_f.weight",
    "norm.bias": "ln_f.bias",
    "lm_head.weight": "lm_head.weight",  # untied models only
}
HF_GPT2_IGNORED = [r"h\.\d+\.attn\.(masked_)?bias"]  # causal-mask buffers in old GPT-2 checkpoints

GGUF_LLAMA: dict[str, Recipe] = {
    "tok_emb.weight": "token_embd.weight",
    "blocks.{}.attn_norm.weight": "blk.{}.attn_norm.weight",
    "blocks.{}.attn.qkv.weight": ("cat", [("unpermute", "blk.{}.attn_q.weight", "q"),
                                          ("unpermute", "blk.{}.attn_k.weight", "k"),
                                          "blk.{}.attn_v.weight"]),
    "blocks.{}.attn.proj.weight": "blk.{}.attn_output.weight",
    "blocks.{}.mlp_norm.weight": "blk.{}.ffn_norm.weight",
    "blocks.{}.mlp.gate_up.weight": ("cat", ["blk.{}.ffn_gate.weight", "blk.{}.ffn_up.weight"]),
    "blocks.{}.mlp.down.weight": "blk.{}.ffn_down.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",  # untied models only
}
GGUF_LLAMA_IGNORED = [r"rope_freqs\.weight"]


# ------------------------------------------------------------------------------------------------ table engine


def _sources(recipe: Recipe) -> list[str]:
    if isinstance(recipe, str):
        return [recipe]
    if recipe[0] == "cat":
        return [s for r in recipe[1] for s in _sources(r)]
    return [recipe[1]]


def _fmt(recipe: Recipe, i: int | None) -> Recipe:
    if isinstance(recipe, str):
        return recipe.format(i) if i is not None else recipe
    if recipe[0] == "cat":
        return ("cat", [_fmt(r, i) for r in recipe[1]])
    return (recipe[0], _fmt(recipe[1], i), *recipe[2:])


def unpermute_rows(w: Tensor, n_head: int) -> Tensor:
    """Inverse of llama.cpp's convert ``permute``: rows grouped [head, half, pair] -> HF's [head, pair, half]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def build_state_dict(cfg: LMConfig, table: dict[str, Recipe], get: Callable[[str], Tensor], keys: set[str],
                     ignored: list[str], strip_prefix: str = "") -> dict[str, Tensor]:
    """Apply a name table; strict about unknown and missing source keys."""
    used: set[str] = set()
    out: dict[str, Tensor] = {}

    def run(recipe: Recipe) -> Tensor:
        if isinstance(recipe, str):
            used.add(recipe)
            return get(recipe)
        op = recipe[0]
        if op == "T":
            return run(recipe[1]).t().contiguous()
        if op == "cat":
            return torch.cat([run(r) for r in recipe[1]], dim=0)
        if op == "unpermute":
            n = cfg.n_head if recipe[2] == "q" else cfg.n_kv_head
            return unpermute_rows(run(recipe[1]), n)
        raise AssertionError(op)

    for ours, recipe in table.items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            for s in _sources(recipe):  # some exporters also write the tied copy: accept and drop it
                used.add(s)
            continue
        if ours == "pos_emb.weight" and cfg.arch != "gpt2":
            continue
        layers = range(cfg.n_layer) if "{}" in ours else [None]
        for i in layers:
            r = _fmt(recipe, i)
            missing = [s for s in _sources(r) if s not in keys]
            if missing:
                raise CorruptFileError(f"checkpoint is missing tensor {strip_prefix}{missing[0]}")
            out[ours.format(i) if i is not None else ours] = run(r)
    unknown = [k for k in keys - used if not any(re.fullmatch(p, k) for p in ignored)]
    if unknown:
        raise CorruptFileError(f"checkpoint has {len(unknown)} unexpected tensor(s), e.g. {strip_prefix}{sorted(unknown)[0]}")
    return out


def load_into_model(cfg: LMConfig, sd: dict[str, Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """Build on the meta device, check shapes, then assign the tensors."""
    from aigckit.text.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    for k, shape in expected.items():
        if k not in sd:
            raise CorruptFileError(f"weights are missing {k}")
        if tuple(sd[k].shape) != tuple(shape):
            raise CorruptFileError(f"shape mismatch for {k}: file has {tuple(sd[k].shape)}, config wants {tuple(shape)}")
    extra = set(sd) - set(expected)
    if extra:
        raise CorruptFileError(f"unexpected weights {sorted(extra)[:3]}")
    sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    if cfg.arch == "llama":
        from aigckit.text.model import rope_inv_freq

        model.inv_freq = rope_inv_freq(cfg).float()
    return model.eval()


# ------------------------------------------------------------------------------------------------ HF safetensors


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[LMConfig, torch.nn.Module]:
    from safetensors import safe_open

    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path / 'config.json'}: cannot read ({e})") from e
    cfg = LMConfig.from_hf(hf, name=path.name)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    handles, where = [], {}
    try:
        for f in files:
            h = safe_open(str(f), framework="pt")
            handles.append(h)
            for k in h.keys():
                where[k] = h
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CorruptFileError(f"{f}: not a valid safetensors file ({e})") from e
    # some exporters prefix everything with "transformer." (GPT-2) or "model." is part of the Llama names
    prefix = ""
    if cfg.arch == "gpt2" and any(k.startswith("transformer.") for k in where):
        prefix = "transformer."
    keys = {k[len(prefix):] if k.startswith(prefix) else k for k in where}
    lookup = {k[len(prefix):] if k.startswith(prefix) else k: k for k in where}
    table, ignored = (HF_GPT2, HF_GPT2_IGNORED) if cfg.arch == "gpt2" else (HF_LLAMA, HF_LLAMA_IGNORED)

    def get(name: str) -> Tensor:
        return where[lookup[name]].get_tensor(lookup[name]).float()

    sd = build_state_dict(cfg, table, get, keys, ignored, strip_prefix=prefix)
    return cfg, load_into_model(cfg, sd, dtype)


# ------------------------------------------------------------------------------------------------ GGUF


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader, name: str) -> LMConfig:
    """The LMConfig a GGUF file's ``llama.*`` metadata describes. Missing or invalid values raise
    ``CorruptFileError`` naming the GGUF key (e.g. ``llama.attention.head_count = 0``)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedFormatError(f"GGUF architecture {arch!r} is not supported (supported: llama)")
    a = arch
    # LMConfig field -> GGUF key it comes from (for error messages)
    keys = {"n_layer": f"{a}.block_count", "n_embd": f"{a}.embedding_length", "n_head": f"{a}.attention.head_count",
            "n_kv_head": f"{a}.attention.head_count_kv", "intermediate_size": f"{a}.feed_forward_length",
            "block_size": f"{a}.context_length", "norm_eps": f"{a}.attention.layer_norm_rms_epsilon",
            "rope_theta": f"{a}.rope.freq_base", "head_dim": f"{a}.attention.key_length",
            "vocab_size": f"{a}.vocab_size", "rope_scaling": f"{a}.rope.scaling.factor",
            "bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id"}

    def required(field: str) -> Any:
        v = _field(reader, keys[field])
        if v is None:
            raise CorruptFileError(f"GGUF metadata has no {keys[field]}")
        return v

    names = {t.name for t in reader.tensors}
    vocab = _field(reader, keys["vocab_size"])
    if vocab is None:
        vocab = len(_field(reader, "tokenizer.ggml.tokens", []))
        keys["vocab_size"] = "tokenizer.ggml.tokens (its length)"
    head_dim = _field(reader, keys["head_dim"])
    if head_dim is None and _field(reader, f"{a}.rope.dimension_count") is not None:
        head_dim, keys["head_dim"] = _field(reader, f"{a}.rope.dimension_count"), f"{a}.rope.dimension_count"
    rope_scaling = None
    st = _field(reader, f"{a}.rope.scaling.type")
    if st == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _field(reader, keys["rope_scaling"])}
    elif st not in (None, "none"):
        raise UnsupportedFormatError(f"GGUF rope scaling {st!r} is not supported")
    n_head = required("n_head")
    try:
        # values go in as stored (ints stay ints), so LMConfig's checks see what the file says
        return LMConfig(
            arch="llama", vocab_size=vocab, n_layer=required("n_layer"), n_head=n_head,
            n_kv_head=_field(reader, keys["n_kv_head"], n_head), n_embd=required("n_embd"),
            intermediate_size=required("intermediate_size"), block_size=_field(reader, keys["block_size"], 2048),
            norm_eps=_field(reader, keys["norm_eps"], 1e-5), rope_theta=_field(reader, keys["rope_theta"], 10000.0),
            rope_scaling=rope_scaling, head_dim=head_dim, tie_embeddings="output.weight" not in names,
            bos_token_id=_field(reader, keys["bos_token_id"]), eos_token_id=_field(reader, keys["eos_token_id"]),
            name=name,
        )
    except ConfigFieldError as e:
        key = keys.get(e.field.split(".")[0], e.field)
        raise CorruptFileError(f"GGUF metadata {key} is invalid: {e}") from None


def gguf_tensor(t) -> Tensor:
    """Dequantise one GGUF tensor to float32 in PyTorch layout (GGUF lists shapes fastest dimension first)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type == Q.F32:
        arr = np.array(t.data, dtype=np.float32)  # copy: the reader memory-maps the file read-only
    elif t.tensor_type == Q.F16:
        arr = np.asarray(t.data, dtype=np.float16).astype(np.float32)
    else:
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedFormatError(f"GGUF tensor {t.name}: type {t.tensor_type.name} is not supported") from e
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape))


def open_gguf(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError/struct errors on bad files
        raise CorruptFileError(f"{path}: not a valid GGUF file ({e})") from e


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, reader=None, progress: bool = False
              ) -> tuple[LMConfig, torch.nn.Module]:
    import sys

    from tqdm import tqdm

    reader = reader or open_gguf(path)
    cfg = gguf_config(reader, Path(path).stem)
    tensors = {t.name: t for t in reader.tensors}
    with tqdm(total=len(tensors), desc="dequantise GGUF", unit="tensor", disable=not progress, leave=False,
              file=sys.stderr) as bar:
        def get(name: str) -> Tensor:
            bar.update(1)
            return gguf_tensor(tensors[name])

        sd = build_state_dict(cfg, GGUF_LLAMA, get, set(tensors), GGUF_LLAMA_IGNORED)
    return cfg, load_into_model(cfg, sd, dtype)
