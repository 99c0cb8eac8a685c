"""BERT sentence embeddings (all-MiniLM-L6-v2 and other sentence-transformers BERT models), our own encoder code.

Reads top to bottom: config -> weight-name table -> blocks -> model -> loading -> the `Embedder` front end.

A sentence-transformers folder is an HF BERT directory (``config.json`` + ``model.safetensors`` + ``tokenizer.json``)
plus ``modules.json`` (Transformer -> Pooling -> Normalize), ``1_Pooling/config.json`` (mean or CLS pooling) and
``sentence_bert_config.json`` (``max_seq_length``). We support exactly those modules; anything else (Dense heads,
max pooling, ...) is refused rather than silently computing a different embedding.

    from aigckit.embed import load_embedder
    emb = load_embedder("minilm-l6-v2")
    vecs = emb.embed(["A man is eating food.", "A man is eating bread."])   # [2, 384], unit length
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from aigckit.dtypes import torch_dtype
from aigckit.errors import AigcError, CorruptFileError, ModelNotFoundError, UnsupportedFormatError
from aigckit.layers import embedding

DEFAULT_EMBED_MODEL = "minilm-l6-v2"

# ------------------------------------------------------------------------------------------------------- config


@dataclass
class BertConfig:
    """The fields of an HF BERT ``config.json`` that change the computation (dropout is irrelevant at inference)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: Literal["gelu"] = "gelu"  # exact (erf) GELU, as HF's "gelu"
    position_embedding_type: Literal["absolute"] = "absolute"

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise CorruptFileError(f"BERT config: {f} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise CorruptFileError(
                f"BERT config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act != "gelu":
            raise UnsupportedFormatError(f"BERT config: hidden_act {self.hidden_act!r} is not supported (only 'gelu')")
        if self.position_embedding_type != "absolute":
            raise UnsupportedFormatError(
                f"BERT config: position_embedding_type {self.position_embedding_type!r} is not supported "
                "(only 'absolute')")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict) -> "BertConfig":
        """Build from the dict of an HF ``config.json``; extra keys (dropout, architectures, ...) are ignored."""
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise UnsupportedFormatError(f"config.json: model_type {model_type!r} is not a BERT model")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        if "layer_norm_eps" in kw:
            kw["layer_norm_eps"] = float(kw["layer_norm_eps"])
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | Path) -> "BertConfig":
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ModelNotFoundError(f"{path}: no such file") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise CorruptFileError(f"{path}: expected a JSON object")
        return cls.from_hf(d)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- weight-name table

# HF BertModel name -> our name. ``{}`` is the layer index. A ``bert.`` prefix (BertFor* checkpoints) is stripped first.
HF_TO_OURS: dict[str, str] = {
    "embeddings.word_embeddings.weight": "embed.word.weight",
    "embeddings.position_embeddings.weight": "embed.position.weight",
    "embeddings.token_type_embeddings.weight": "embed.token_type.weight",
    "embeddings.LayerNorm.weight": "embed.norm.weight",
    "embeddings.LayerNorm.bias": "embed.norm.bias",
    "encoder.layer.{}.attention.self.query.weight": "layers.{}.attn.q.weight",
    "encoder.layer.{}.attention.self.query.bias": "layers.{}.attn.q.bias",
    "encoder.layer.{}.attention.self.key.weight": "layers.{}.attn.k.weight",
    "encoder.layer.{}.attention.self.key.bias": "layers.{}.attn.k.bias",
    "encoder.layer.{}.attention.self.value.weight": "layers.{}.attn.v.weight",
    "encoder.layer.{}.attention.self.value.bias": "layers.{}.attn.v.bias",
    "encoder.layer.{}.attention.output.dense.weight": "layers.{}.attn.proj.weight",
    "encoder.layer.{}.attention.output.dense.bias": "layers.{}.attn.proj.bias",
    "encoder.layer.{}.attention.output.LayerNorm.weight": "layers.{}.attn_norm.weight",
    "encoder.layer.{}.attention.output.LayerNorm.bias": "layers.{}.attn_norm.bias",
    "encoder.layer.{}.intermediate.dense.weight": "layers.{}.mlp.fc1.weight",
    "encoder.layer.{}.intermediate.dense.bias": "layers.{}.mlp.fc1.bias",
    "encoder.layer.{}.output.dense.weight": "layers.{}.mlp.fc2.weight",
    "encoder.layer.{}.output.dense.bias": "layers.{}.mlp.fc2.bias",
    "encoder.layer.{}.output.LayerNorm.weight": "layers.{}.mlp_norm.weight",
    "encoder.layer.{}.output.LayerNorm.bias": "layers.{}.mlp_norm.bias",
}

# Present in HF checkpoints but not used for embeddings: the NSP pooler and the position/token-type id buffers.
HF_IGNORED: frozenset[str] = frozenset({
    "pooler.dense.weight",
    "pooler.dense.bias",
    "embeddings.position_ids",
    "embeddings.token_type_ids",
})

_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)")


def hf_to_ours(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF BERT state dict by the table. Unknown names raise `CorruptFileError`; ignored names are dropped."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, t in hf_sd.items():
        k = key[len("bert."):] if key.startswith("bert.") else key
        if k in HF_IGNORED:
            continue
        m = _LAYER_RE.fullmatch(k)
        ours = HF_TO_OURS.get(f"encoder.layer.{{}}.{m.group(2)}") if m else HF_TO_OURS.get(k)
        if ours is None:
            unknown.append(key)
            continue
        if m:
            ours = ours.format(int(m.group(1)))
        if ours in out:
            raise CorruptFileError(f"weights: {key!r} appears twice (with and without the 'bert.' prefix)")
        out[ours] = t
    if unknown:
        raise CorruptFileError(f"weights: {len(unknown)} unknown tensor name(s), e.g. {', '.join(unknown[:3])}")
    return out


# ---------------------------------------------------------------------------------------------------- blocks


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word = embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.token_type(token_type_ids)
        x = x + self.position(pos)[None]
        return self.norm(x)


class BertSelfAttention(nn.Module):
    """Bidirectional multi-head attention; padded keys are masked out."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q, self.k, self.v = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # x: [B, T, H]; key_mask: [B, 1, 1, T] bool, True = attend to this key.
        B, T, H = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # softmax(q k^T / sqrt(d)) v
        return self.proj(y.transpose(1, 2).reshape(B, T, H))


class BertMLP(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU


class BertLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = BertSelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = BertMLP(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, key_mask))
        return self.mlp_norm(x + self.mlp(x))


# ----------------------------------------------------------------------------------------------------- model


class BertModel(nn.Module):
    """BERT encoder: ``forward(input_ids, attention_mask, token_type_ids) -> last hidden states [B, T, H]``."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise AigcError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise AigcError(f"sequence of {T} tokens exceeds max_position_embeddings "
                            f"{self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        x = self.embed(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


# --------------------------------------------------------------------------------------------------- loading


def _safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptFileError(f"{index}: not a valid safetensors index ({e})") from e
        return [d / f for f in sorted(set(wm.values()))]
    if (d / "model.safetensors").exists():
        return [d / "model.safetensors"]
    files = sorted(d.glob("*.safetensors"))
    if len(files) == 1:
        return files
    if not files:
        raise ModelNotFoundError(f"{d}: no *.safetensors weights")
    raise CorruptFileError(f"{d}: several *.safetensors files but no model.safetensors.index.json")


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise ModelNotFoundError(f"{f}: no such file (listed in the safetensors index)")
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CorruptFileError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e})") from e
        dup = sd.keys() & part.keys()
        if dup:
            raise CorruptFileError(f"{f}: tensor {sorted(dup)[0]!r} appears in more than one file")
        sd.update(part)
    return sd


def load_bert_state_dict(model: BertModel, hf_sd: dict[str, torch.Tensor], *, dtype: torch.dtype) -> None:
    """Strictly load an HF BERT state dict into a (meta-device) model with ``assign=True``.

    Missing, unknown and shape-mismatched tensors raise `CorruptFileError`."""
    sd = hf_to_ours(hf_sd)
    want = model.state_dict()
    missing = sorted(want.keys() - sd.keys())
    extra = sorted(sd.keys() - want.keys())
    if missing:
        raise CorruptFileError(f"weights: {len(missing)} missing tensor(s), e.g. {', '.join(missing[:3])}")
    if extra:
        raise CorruptFileError(f"weights: {len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}")
    for k, t in sd.items():
        if tuple(t.shape) != tuple(want[k].shape):
            raise CorruptFileError(f"weights: {k} has shape {tuple(t.shape)}, expected {tuple(want[k].shape)}")
        if not t.is_floating_point():
            raise CorruptFileError(f"weights: {k} has dtype {t.dtype}, expected a floating-point tensor")
        sd[k] = t.to(dtype)
    model.load_state_dict(sd, strict=True, assign=True)


def build_bert(cfg: BertConfig, hf_sd: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32) -> BertModel:
    with torch.device("meta"):
        model = BertModel(cfg)
    load_bert_state_dict(model, hf_sd, dtype=dtype)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ sbert files

_ALLOWED_MODULES = {
    "sentence_transformers.models.Transformer": "transformer",
    "sentence_transformers.models.Pooling": "pooling",
    "sentence_transformers.models.Normalize": "normalize",
}


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e})") from e


def _read_pooling(d: Path) -> Literal["mean", "cls"]:
    """Pooling mode from modules.json + <pooling dir>/config.json; mean when the folder is a plain HF BERT."""
    pool_dir = d / "1_Pooling"
    modules_file = d / "modules.json"
    if modules_file.exists():
        modules = _read_json(modules_file)
        if not isinstance(modules, list):
            raise CorruptFileError(f"{modules_file}: expected a JSON list")
        pool_dir = None
        for m in modules:
            kind = _ALLOWED_MODULES.get(m.get("type", "") if isinstance(m, dict) else "")
            if kind is None:
                raise UnsupportedFormatError(
                    f"{modules_file}: module {m.get('type') if isinstance(m, dict) else m!r} is not supported "
                    "(only Transformer, Pooling, Normalize)")
            if kind == "transformer" and m.get("path", ""):
                raise UnsupportedFormatError(f"{modules_file}: a Transformer module in a sub-folder is not supported")
            if kind == "pooling":
                pool_dir = d / m.get("path", "")
        if pool_dir is None:
            raise UnsupportedFormatError(f"{modules_file}: no Pooling module")
    cfg_file = pool_dir / "config.json"
    if not cfg_file.exists():
        if modules_file.exists():
            raise ModelNotFoundError(f"{cfg_file}: no such file (named by modules.json)")
        return "mean"
    cfg = _read_json(cfg_file)
    if not isinstance(cfg, dict):
        raise CorruptFileError(f"{cfg_file}: expected a JSON object")
    modes = [k[len("pooling_mode_"):] for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    if "mean_tokens" in modes and len(modes) == 1:
        return "mean"
    if "cls_token" in modes and len(modes) == 1:
        return "cls"
    raise UnsupportedFormatError(f"{cfg_file}: pooling {modes or 'none'} is not supported (only mean or cls alone)")


def _read_max_seq_length(d: Path, cfg: BertConfig) -> int:
    sb = d / "sentence_bert_config.json"
    if sb.exists():
        v = _read_json(sb)
        n = v.get("max_seq_length") if isinstance(v, dict) else None
        if n is not None:
            if not isinstance(n, int) or n < 2 or n > cfg.max_position_embeddings:
                raise CorruptFileError(f"{sb}: max_seq_length {n!r} must be an integer in "
                                       f"[2, {cfg.max_position_embeddings}] (max_position_embeddings)")
            return n
    return min(512, cfg.max_position_embeddings)


def _load_tokenizer(d: Path, max_len: int, vocab_size: int):
    from tokenizers import Tokenizer

    path = d / "tokenizer.json"
    if not path.exists():
        raise ModelNotFoundError(f"{d}: no tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a plain Exception on bad files
        raise CorruptFileError(f"{path}: not a readable tokenizer ({str(e).splitlines()[0] if str(e) else e})") from e
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise CorruptFileError(f"{path}: tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, "
                               f"more than the model's vocab_size {vocab_size}")
    # tokenizer.json may carry its own padding/truncation (MiniLM's pads to a fixed 128): replace them with ours.
    # These settings are fixed here, once; encoding afterwards only reads the tokenizer.
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    return tok


# -------------------------------------------------------------------------------------------------- embedder


class Embedder:
    """Sentence embeddings from a BERT encoder + pooling. Holds no per-request state, so concurrent calls are safe."""

    def __init__(self, name: str, model: BertModel, tokenizer, *, pooling: Literal["mean", "cls"],
                 max_seq_length: int, pad_id: int) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_seq_length = max_seq_length
        self.pad_id = pad_id

    @property
    def config(self) -> BertConfig:
        return self.model.config

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @staticmethod
    def _check_texts(texts: list[str] | str) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        texts = list(texts)
        if not texts:
            raise AigcError("no input texts to embed", param="input")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise AigcError(f"input {i} is a {type(t).__name__}, expected a string", param="input")
        return texts

    def tokenize(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (with [CLS]/[SEP], truncated to max_seq_length) right-padded to the longest: (ids, mask) [B, T]."""
        encs = self.tokenizer.encode_batch(self._check_texts(texts))
        T = max(len(e.ids) for e in encs)
        ids = torch.full((len(encs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), T), dtype=torch.long)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, : len(e.ids)] = 1
        return ids, mask

    def count_tokens(self, texts: list[str] | str) -> list[int]:
        """Tokens the model sees per text: special tokens included, after truncation to max_seq_length."""
        return [len(e.ids) for e in self.tokenizer.encode_batch(self._check_texts(texts))]

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask[..., None].to(hidden.dtype)  # mean over non-pad tokens
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def embed(self, texts: list[str] | str, *, batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
        """Embed texts -> float32 tensor [N, dim] (a single string gives [1, dim]); unit length when normalize."""
        texts = self._check_texts(texts)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise AigcError(f"batch_size must be a positive integer, got {batch_size!r}")
        lengths = self.count_tokens(texts)
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # similar lengths together: less padding
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s: s + batch_size]
                ids, mask = self.tokenize([texts[i] for i in idx])
                hidden = self.model(ids, mask)
                pooled = self._pool(hidden, mask)
                if normalize:
                    pooled = F.normalize(pooled, p=2, dim=-1)
                out[idx] = pooled
        return out

    def __repr__(self) -> str:
        return (f"Embedder(name={self.name!r}, dim={self.dim}, pooling={self.pooling!r}, "
                f"max_seq_length={self.max_seq_length})")


def load_embedder(model: str | Path = DEFAULT_EMBED_MODEL, *, dtype: str = "float32",
                  max_seq_length: int | None = None) -> Embedder:
    """Load a BERT sentence-embedding model from a store name, an HF directory or an HF-cache id.

    ``max_seq_length`` overrides sentence_bert_config.json (default there, else 512), capped by the model's
    max_position_embeddings."""
    from aigckit import store

    torch_dtype(dtype)  # raises for an unknown name
    r = store.resolve(model or DEFAULT_EMBED_MODEL)
    if r.format != "hf":
        raise UnsupportedFormatError(f"{r.path}: a BERT embedder needs an HF safetensors directory, not {r.format}")
    d = Path(r.path)
    cfg = BertConfig.from_file(d / "config.json")
    max_len = _read_max_seq_length(d, cfg)
    if max_seq_length is not None:
        if not isinstance(max_seq_length, int) or not 2 <= max_seq_length <= cfg.max_position_embeddings:
            raise AigcError(f"max_seq_length must be in [2, {cfg.max_position_embeddings}], got {max_seq_length!r}")
        max_len = max_seq_length
    pooling = _read_pooling(d)
    tok = _load_tokenizer(d, max_len, cfg.vocab_size)
    bert = build_bert(cfg, _read_safetensors(_safetensors_files(d)), dtype=torch_dtype(dtype))
    return Embedder(r.name, bert, tok, pooling=pooling, max_seq_length=max_len, pad_id=cfg.pad_token_id)


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of the rows of x: [N, N]."""
    x = F.normalize(x.float(), p=2, dim=-1)
    return x @ x.T


__all__ = ["BertConfig", "BertModel", "Embedder", "HF_IGNORED", "HF_TO_OURS", "build_bert", "cosine_matrix",
           "hf_to_ours", "load_embedder"]
