"""Tokenizers for our language models: a thin wrapper over the `tokenizers` library, plus sandboxed chat templates.

Two sources are supported:

- a **GGUF file** (``Tokenizer.from_gguf``): the vocabulary, merges, token types and special ids are llama.cpp metadata
  (``tokenizer.ggml.*``). We rebuild the same ``tokenizers.Tokenizer`` that transformers' GGUF loader builds
  (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), which is the reference our tests compare against.
- a **Hugging Face directory** (``Tokenizer.from_dir``): ``tokenizer.json`` plus the optional ``tokenizer_config.json``,
  ``special_tokens_map.json``, ``generation_config.json``, ``config.json`` and ``chat_template.jinja``.

``tokenizer.ggml.model`` values handled:

- ``gpt2``: byte-level BPE. The pre-tokenizer split follows ``tokenizer.ggml.pre`` the way transformers does: the
  Llama-3 family (``llama-bpe``, ``llama3``, ``smaug-bpe``, ``dbrx``, ...), Qwen2, GPT-4o and Tekken regexes are known;
  every other value (``gpt-2``, ``smollm``, ``default``, unknown names) gets the plain GPT-2 byte-level regex.
- ``llama``: SentencePiece-style BPE with byte fallback (``▁`` for spaces, BOS added unless the file says otherwise);
  merges come from the file or are rebuilt from the token scores.

Anything else raises ``AigcError`` naming the model type.

Chat templates render in a sandbox with resource limits (``text/chat_template.py``) and give the text of
transformers' ``apply_chat_template(..., tokenize=False)``. ``encode_chat`` tokenises a chat with the messages as
data: special-token texts inside them stay plain text, only the template's own markers are special tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from aigckit.errors import AigcError, CorruptFileError, ModelNotFoundError
from aigckit.text.chat_template import ChatTemplate

__all__ = ["Tokenizer", "StreamDecoder"]

# ----------------------------------------------------------------------------------------------- GGUF constants

# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as transformers' GGUF converter chooses them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
         "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}
# Every other `tokenizer.ggml.pre` (gpt-2, smollm, default, unknown names) -> GPT-2's byte-level regex.

# Special tokens that end a turn in common chat formats; counted in `eos_token_ids` when the model marks them special.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>",
                      "<|end|>")

# SentencePiece GGUFs whose architecture needs special handling in transformers (Gemma token spelling, Phi-3 prefix)
_SENTENCEPIECE_SPECIAL_ARCHS = frozenset({"gemma", "gemma2", "gemma3", "phi3"})

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# ----------------------------------------------------------------------------------------------- GGUF metadata


def _field_value(field) -> Any:
    """The Python value of a ``gguf.ReaderField``: a scalar, a string, or a list of either.

    Values live in ``field.parts``; ``field.data`` holds the indices of the parts that are the value (one for a
    scalar, one per element for an array). Strings are stored as uint8 arrays.
    """
    types = list(field.types)
    if not types:
        return None
    string_t = 8  # gguf.GGUFValueType.STRING
    array_t = 9
    if types[0] == array_t:
        elem = types[1] if len(types) > 1 else None
        if elem == string_t:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if elem == array_t:
            raise CorruptFileError(f"nested arrays are not supported in GGUF field {field.name}")
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == string_t:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def _read_gguf_tokenizer_metadata(reader) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.") or name == "general.architecture":
            try:
                meta[name] = _field_value(field)
            except UnicodeDecodeError as e:
                raise CorruptFileError(f"GGUF field {name} is not valid UTF-8: {e}") from None
    return meta


# ----------------------------------------------------------------------------------------------- builders


def _template_processor(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None,
                        add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """BOS/EOS around the text, as transformers' ``update_post_processor`` builds it."""
    add_bos = add_bos and bos is not None and bos_id is not None
    add_eos = add_eos and eos is not None and eos_id is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = []
    if add_bos:
        special.append((bos, bos_id))
    if add_eos:
        special.append((eos, eos_id))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best score first.

    Same order as transformers' ``generate_merges`` (ties broken by piece lengths, then by vocabulary ids).
    """
    merges = []
    for merge, score in scores.items():
        local = []
        for i in range(1, len(merge)):
            left, right = merge[:i], merge[i:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _build_byte_level(tokens: list[str], merges: list[str] | None, pre: str | None) -> _HFTokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    if merges is None:
        raise CorruptFileError("byte-level BPE GGUF has no tokenizer.ggml.merges")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = [m for m in pairs if len(m) != 2]
    if bad:
        raise CorruptFileError(f"malformed merge {' '.join(bad[0])!r} in tokenizer.ggml.merges")
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _build_sentencepiece(tokens: list[str], merges: list[str] | None, scores: list[float] | None) -> _HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ")) for m in merges]
    elif scores is not None:
        pairs = _generate_merges(vocab, dict(zip(tokens, scores)))
    else:
        raise CorruptFileError("SentencePiece GGUF has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1),
    ])
    return tok


def _token_content(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialised AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, str):
        return value
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} should hold a JSON object")
    return data


def _pick_template(value) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {name, template} (we take 'default')."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return None


# ----------------------------------------------------------------------------------------------- chat templates


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types, so the sandbox never sees methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise AigcError(f"chat messages may hold only JSON values (str, number, bool, list, dict); got {type(value).__name__}")


# ----------------------------------------------------------------------------------------------- Tokenizer


class Tokenizer:
    """Text <-> token ids for one model; build it with ``from_gguf`` or ``from_dir``."""

    def __init__(self, backend: _HFTokenizer, *, special_tokens: dict[str, str | None] | None = None,
                 eos_token_ids: Iterable[int] = (), chat_template: str | None = None, vocab_size: int | None = None,
                 clean_up_tokenization_spaces: bool = False, add_bos_token: bool = False,
                 add_eos_token: bool = False, source: str = "", special_ids: dict[str, int | None] | None = None):
        self._tok = backend
        self.special_tokens: dict[str, str] = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        # ids as the model declares them (GGUF metadata) or, failing that, looked up by token text
        ids = {name: (special_ids or {}).get(name, self._id_of(self.special_tokens.get(name)))
               for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.bos_token_id: int | None = ids["bos_token"]
        self.eos_token_id: int | None = ids["eos_token"]
        self.pad_token_id: int | None = ids["pad_token"]
        self.unk_token_id: int | None = ids["unk_token"]
        self.vocab_size: int = vocab_size if vocab_size is not None else backend.get_vocab_size(with_added_tokens=True)
        self.chat_template: str | None = chat_template
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.source = source
        self._clean_up = clean_up_tokenization_spaces and not isinstance(backend.model, models.BPE)
        # ids of the added tokens marked special (what decode(skip_special_tokens=True) drops)
        self.special_token_ids: set[int] = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        specials = sorted({t.content for t in backend.get_added_tokens_decoder().values() if t.special}, key=len,
                          reverse=True)
        # the special tokens' texts, longest first (as the tokenizer matches them): what a chat message must not forge
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._plain_backends: dict[bool, _HFTokenizer] = {}
        # compiled, checked and trial-rendered now: a template that cannot work fails the load, not a request
        self._template = ChatTemplate(chat_template, trial_context=self.special_tokens) \
            if chat_template is not None else None
        eot = set(int(i) for i in eos_token_ids)
        if self.eos_token_id is not None:
            eot.add(self.eos_token_id)
        for name in END_OF_TURN_TOKENS:
            i = backend.token_to_id(name)
            if i is not None and i in self.special_token_ids:
                eot.add(i)
        self.eos_token_ids: set[int] = eot

    # ------------------------------------------------------------------------------------------- cache
    def save_cache(self, path) -> None:
        """Write this tokenizer (backend + every constructor field) so ``load_cache`` rebuilds it exactly;
        used to skip re-reading a GGUF's vocabulary on the next load."""
        path = Path(path)
        self._tok.save(str(path / "tokenizer.json"))
        meta = {
            "special_tokens": self.special_tokens, "eos_token_ids": sorted(self.eos_token_ids),
            "chat_template": self.chat_template, "vocab_size": self.vocab_size,
            "clean_up_tokenization_spaces": self._clean_up, "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token, "source": self.source,
            "special_ids": {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id,
                            "pad_token": self.pad_token_id, "unk_token": self.unk_token_id},
        }
        (path / "aigc_tokenizer.json").write_text(json.dumps(meta))

    @classmethod
    def load_cache(cls, path) -> "Tokenizer":
        path = Path(path)
        meta = json.loads((path / "aigc_tokenizer.json").read_text())
        backend = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        return cls(backend, **meta)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_gguf(cls, path_or_reader) -> "Tokenizer":
        """Build the tokenizer described by a GGUF file's ``tokenizer.*`` metadata (path or open ``GGUFReader``)."""
        import gguf

        if isinstance(path_or_reader, gguf.GGUFReader):
            reader, source = path_or_reader, str(getattr(path_or_reader, "path", "GGUF"))
        else:
            path = Path(path_or_reader).expanduser()
            if not path.is_file():
                raise ModelNotFoundError(f"GGUF file not found: {path}")
            try:
                reader = gguf.GGUFReader(path)
            except Exception as e:  # gguf raises ValueError / struct errors / etc. on a bad file
                raise CorruptFileError(f"{path} is not a readable GGUF file: {e}") from None
            source = str(path)
        meta = _read_gguf_tokenizer_metadata(reader)

        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or tokens is None:
            raise AigcError(f"{source} carries no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens metadata)")
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise CorruptFileError(f"{source}: tokenizer.ggml.tokens is empty or not a list of strings")
        n = len(tokens)
        types = meta.get("tokenizer.ggml.token_type") or []
        if types and len(types) != n:
            raise CorruptFileError(f"{source}: {len(types)} token types for {n} tokens")
        merges = meta.get("tokenizer.ggml.merges")

        if kind == "gpt2":
            backend = _build_byte_level(tokens, merges, meta.get("tokenizer.ggml.pre"))
            add_bos_default = False
            # byte-level vocabularies spell every real token in the byte alphabet; a "control" token outside it is a
            # llama.cpp mislabel that transformers skips too
            alphabet = set(_bytes_to_unicode().values())
            fits = lambda t: set(t) <= alphabet  # noqa: E731
        elif kind == "llama":
            arch = meta.get("general.architecture")
            if arch in _SENTENCEPIECE_SPECIAL_ARCHS:
                # transformers rebuilds these with architecture-specific fixes we have not ported; refuse rather than
                # tokenize differently from the reference
                raise AigcError(f"{source}: the SentencePiece tokenizer of architecture {arch!r} is not supported "
                                "(supported: llama-style SentencePiece and byte-level BPE)")
            scores = meta.get("tokenizer.ggml.scores")
            if scores is not None and len(scores) != n:
                raise CorruptFileError(f"{source}: {len(scores)} token scores for {n} tokens")
            backend = _build_sentencepiece(tokens, merges, scores)
            add_bos_default = True  # llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise
            fits = lambda t: True  # noqa: E731
        else:
            raise AigcError(f"{source}: unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2' byte-level BPE, "
                            "'llama' SentencePiece BPE)")

        def token_at(key: str) -> str | None:
            i = meta.get(key)
            if i is None:
                return None
            if not isinstance(i, int) or not 0 <= i < n:
                raise CorruptFileError(f"{source}: {key} = {i!r} is outside the vocabulary of {n} tokens")
            return tokens[i]

        special = {
            "bos_token": token_at("tokenizer.ggml.bos_token_id"),
            "eos_token": token_at("tokenizer.ggml.eos_token_id"),
            "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
            "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        }

        # Control tokens (e.g. <|im_start|>) become special added tokens: matched whole in text, skippable on
        # decode. User-defined ones (e.g. <think>) are matched whole but are not special.
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and fits(t)]
        # transformers also makes the named tokens special (and, for byte-level vocabularies, GPT-2's default
        # <|endoftext|> when the vocabulary has it; for SentencePiece, <unk>/<s>/</s>).
        defaults = ["<|endoftext|>"] if kind == "gpt2" else ["<unk>", "<s>", "</s>"]
        named = [t for t in special.values() if t is not None] + defaults
        vocab = backend.get_vocab(with_added_tokens=False)
        extra = [t for t in named if t in vocab and t not in control]
        specials = list(dict.fromkeys(control + extra))
        if specials:
            backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
        user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab and t not in specials]
        if user:
            backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        backend.post_processor = _template_processor(
            special["bos_token"], meta.get("tokenizer.ggml.bos_token_id"),
            special["eos_token"], meta.get("tokenizer.ggml.eos_token_id"), add_bos, add_eos)

        eot_ids = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                   if isinstance(meta.get(k), int) and 0 <= meta[k] < n]
        special_ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in (
            ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"),
            ("unk_token", "unknown_token_id"))}
        return cls(backend, special_tokens=special, eos_token_ids=eot_ids, special_ids=special_ids,
                   chat_template=meta.get("tokenizer.chat_template"), vocab_size=n,
                   add_bos_token=add_bos, add_eos_token=add_eos, source=source)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """Load an HF tokenizer directory (``tokenizer.json`` and, if present, its config files)."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ModelNotFoundError(f"tokenizer directory not found: {root}")
        tj = root / "tokenizer.json"
        if not tj.is_file():
            raise ModelNotFoundError(f"{root} has no tokenizer.json (aigckit reads only the fast-tokenizer file; "
                                     "slow vocab files like vocab.txt or tokenizer.model alone are not supported)")
        try:
            backend = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise CorruptFileError(f"{tj} could not be read by the tokenizers library: {e}") from None
        # transformers pads/truncates only when asked per call; the file's defaults (e.g. pad to 128) do not apply.
        backend.no_padding()
        backend.no_truncation()

        cfg = _read_json(root / "tokenizer_config.json")
        stm = _read_json(root / "special_tokens_map.json")
        gen = _read_json(root / "generation_config.json")
        model_cfg = _read_json(root / "config.json")

        special = {name: _token_content(cfg.get(name, stm.get(name))) for name in _SPECIAL_NAMES}
        # transformers makes every named special token a special added token
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys(v for v in special.values() if v) if t not in added
                   and backend.token_to_id(t) is not None]
        if missing:
            backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in missing])

        # With a tokenizer.json, transformers (v5) ignores add_bos_token/add_eos_token from the config: the file's
        # post-processor alone decides what encode() adds. We do the same.
        probe = backend.encode("", add_special_tokens=True).ids
        bos_id = backend.token_to_id(special["bos_token"]) if special["bos_token"] else None
        eos_id = backend.token_to_id(special["eos_token"]) if special["eos_token"] else None
        add_bos = bos_id is not None and probe[:1] == [bos_id]
        add_eos = eos_id is not None and probe[-1:] == [eos_id]

        template = None
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        elif (root / "chat_template.json").is_file():
            template = _pick_template(_read_json(root / "chat_template.json").get("chat_template"))
        if template is None:
            template = _pick_template(cfg.get("chat_template"))

        eot: list[int] = []
        for src in (gen, model_cfg):
            v = src.get("eos_token_id")
            for i in v if isinstance(v, list) else [v]:
                if isinstance(i, int) and not isinstance(i, bool):
                    eot.append(i)
        return cls(backend, special_tokens=special, eos_token_ids=eot, chat_template=template,
                   clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)),
                   add_bos_token=add_bos, add_eos_token=add_eos, source=str(root))

    # ------------------------------------------------------------------------------------------- encode / decode

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; BOS/EOS are added only when the model asks for them and ``add_special_tokens``."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch expects a list of str")
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def _check_ids(self, ids) -> list[int]:
        out = [int(i) for i in ids]
        n = self._tok.get_vocab_size(with_added_tokens=True)
        for i in out:
            if not 0 <= i < n:
                raise AigcError(f"token id {i} is outside the vocabulary (0..{n - 1})")
        return out

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (any iterable of ints: list, tuple, 1-D tensor or array)."""
        text = self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            text = _clean_up_tokenization(text)
        return text

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary entry for id ``i`` (as stored, e.g. 'Ġhello' in byte-level BPE); None if out of range."""
        return self._tok.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (read-only use, please)."""
        return self._tok

    # ------------------------------------------------------------------------------------------- chat

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the model's chat template.

        Extra keyword arguments become template variables (e.g. ``tools=...``); ``bos_token``/``eos_token`` and the
        other named special tokens are passed in. The text equals transformers' ``apply_chat_template(...,
        tokenize=False)``. To get token ids use ``encode_chat``: encoding this text would turn special-token strings
        inside the messages into real special tokens."""
        chat, extra = self._chat_inputs(messages, kwargs)
        return self._render(chat, add_generation_prompt, extra)

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of the chat prompt, with the messages as data.

        Only the template's own markers (``<|im_start|>`` ... written by the template, ``bos_token``) become special
        tokens; a special token's text inside a message (or a tool definition) is tokenised as plain text, so a user
        cannot forge a system or assistant turn (llama.cpp's server does the same by default). For messages without
        such text the ids equal ``encode(apply_chat_template(...), add_special_tokens=False)``, which is
        transformers' ``apply_chat_template(..., tokenize=True)``."""
        chat, extra = self._chat_inputs(messages, kwargs)
        if self._special_re is None or not _mentions(self._special_re, (chat, extra)):
            return self.encode(self._render(chat, add_generation_prompt, extra), add_special_tokens=False)
        # Every special-token text in the inputs becomes a placeholder character (one per distinct text, from
        # Unicode's private-use planes 15-16, none of which occurs in the inputs or the template) before rendering,
        # so the special tokens found in the rendered text are the template's own; the text between them, with the
        # placeholders put back, is encoded with special tokens read as plain text.
        taken = set(_PRIVATE_USE.findall(self._template.source if self._template else ""))
        _collect_private_use((chat, extra), taken)
        table: dict[str, str] = {}  # special-token text -> placeholder
        free = (chr(c) for c in range(0xF0000, 0x10FFFE) if chr(c) not in taken)

        def placeholder(m: re.Match) -> str:
            text = m.group(0)
            if text not in table:
                p = next(free, None)
                if p is None:  # 131,000 distinct special tokens in one request
                    raise AigcError("too many distinct special-token texts in the messages")
                table[text] = p
            return table[text]

        chat, extra = _defuse(chat, self._special_re, placeholder), _defuse(extra, self._special_re, placeholder)
        text = self._render(chat, add_generation_prompt, extra)
        return self._encode_with_markers(text, {ord(p): t for t, p in table.items()})

    def _chat_inputs(self, messages: Any, kwargs: dict) -> tuple[list, dict]:
        if self.chat_template is None:
            raise AigcError(f"this model has no chat template ({self.source}); use plain prompts instead")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise AigcError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        chat = []
        for m in messages:
            if not isinstance(m, dict):
                raise AigcError(f"each message must be a dict with 'role' and 'content', got {type(m).__name__}")
            chat.append({k: v for k, v in m.items() if v is not None})
        return _plain(chat), {k: _plain(v) for k, v in kwargs.items()}

    def _render(self, chat: list, add_generation_prompt: bool, extra: dict) -> str:
        if self._template is None or self._template.source != self.chat_template:  # the attribute was reassigned
            self._template = ChatTemplate(self.chat_template, trial_context=self.special_tokens)
        context = {"messages": chat, "tools": None, "documents": None,
                   "add_generation_prompt": bool(add_generation_prompt), **self.special_tokens, **extra}
        return self._template.render(**context)

    def _encode_with_markers(self, text: str, restore: dict[int, str]) -> list[int]:
        """Ids of rendered ``text``: its special tokens as such; between them, the text with ``restore``
        (placeholder -> special-token text) applied, special-token texts read as plain text."""
        enc = self._tok.encode(text, add_special_tokens=False)
        ids: list[int] = []
        pos = 0
        for tid, (start, end) in zip(enc.ids, enc.offsets):
            if tid in self.special_token_ids:
                ids += self._encode_plain(text[pos:start], pos == 0, restore)
                ids.append(tid)
                pos = end
        return ids + self._encode_plain(text[pos:], pos == 0, restore)

    def _encode_plain(self, text: str, at_start: bool, restore: dict[int, str]) -> list[int]:
        if not text:
            return []
        return self._plain_backend(at_start).encode(text.translate(restore), add_special_tokens=False).ids

    def _plain_backend(self, at_start: bool) -> _HFTokenizer:
        """A copy of the backend that reads special-token texts as plain text. A piece after a special token gets a
        copy whose Metaspace pre-tokenizer does not prepend "▁" ("first" means the start of the whole text)."""
        b = self._plain_backends.get(at_start)
        if b is None:
            spec = json.loads(self._tok.to_str())
            if not at_start:
                _metaspace_never(spec)
            b = _HFTokenizer.from_str(json.dumps(spec))
            b.encode_special_tokens = True
            self._plain_backends[at_start] = b
        return b

    # ------------------------------------------------------------------------------------------- streaming

    def stream_decoder(self, prompt_ids=None, *, skip_special_tokens: bool = False) -> "StreamDecoder":
        """An incremental detokeniser; ``prompt_ids`` (optional) give left context so the first word spaces right."""
        return StreamDecoder(self, prompt_ids, skip_special_tokens=skip_special_tokens)


_PRIVATE_USE = re.compile("[\U000F0000-\U0010FFFF]")


def _mentions(pattern: re.Pattern, value: Any) -> bool:
    """Does any string (value or key) in a JSON-like value match ``pattern``?"""
    if isinstance(value, str):
        return pattern.search(value) is not None
    if isinstance(value, dict):
        return any(_mentions(pattern, k) or _mentions(pattern, v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_mentions(pattern, v) for v in value)
    return False


def _collect_private_use(value: Any, out: set[str]) -> None:
    if isinstance(value, str):
        out.update(_PRIVATE_USE.findall(value))
    elif isinstance(value, dict):
        for k, v in value.items():
            _collect_private_use(k, out)
            _collect_private_use(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect_private_use(v, out)


def _defuse(value: Any, pattern: re.Pattern, repl) -> Any:
    """``value`` with every match of ``pattern`` in its strings (values and keys) replaced by ``repl(match)``."""
    if isinstance(value, str):
        return pattern.sub(repl, value)
    if isinstance(value, dict):
        return {_defuse(k, pattern, repl): _defuse(v, pattern, repl) for k, v in value.items()}
    if isinstance(value, list):
        return [_defuse(v, pattern, repl) for v in value]
    if isinstance(value, tuple):
        return tuple(_defuse(v, pattern, repl) for v in value)
    return value


def _metaspace_never(spec: Any) -> None:
    """In a tokenizer.json dict: Metaspace pre-tokenizers with prepend_scheme "first" -> "never"."""
    if isinstance(spec, dict):
        if spec.get("type") == "Metaspace" and spec.get("prepend_scheme") == "first":
            spec["prepend_scheme"] = "never"
        for v in spec.values():
            _metaspace_never(v)
    elif isinstance(spec, list):
        for v in spec:
            _metaspace_never(v)


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (WordPiece only, when the config asks for it)."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
            .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve")
            .replace(" 're", "'re"))


class StreamDecoder:
    """Incremental detokenisation: ``push`` each new token id, get back the text it adds.

    Decodes a short window (from the last emitted boundary) rather than the whole sequence, and holds text back while
    it ends in U+FFFD, i.e. while the last tokens are an incomplete UTF-8 character. Without prompt context the
    concatenated deltas plus ``flush()`` equal ``tokenizer.decode(all_pushed_ids)``. A token that really decodes to
    U+FFFD is held until the next clean boundary or ``flush``.
    """

    _CONTEXT = 6  # prompt tokens kept as left context

    def __init__(self, tokenizer: Tokenizer, prompt_ids=None, *, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = [int(i) for i in (prompt_ids or [])][-self._CONTEXT:]
        self._prefix = 0  # start of the decode window
        self._read = len(self._ids)  # end of the text already emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd") and new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]
