"""Reward functions for ``aigc rl``, with TRL's shape: ``fn(prompts, completions, **columns) -> list[float | None]``.

``prompts`` and ``completions`` are lists of equal length (one entry per sampled completion; a prompt repeats for
each of its group). For chat prompts a completion is ``[{"role": "assistant", "content": text}]`` as in TRL,
otherwise a string. ``columns`` are the data row's other fields (each a list aligned with the completions) plus
``completion_ids``. ``None`` means "this reward does not apply here" (ignored in the weighted sum).

A reward is named by a SPEC (``--reward``):
  format:REGEX       1 if the stripped completion matches REGEX entirely, else 0
  json               1 if the completion (code fences stripped) parses as JSON; json:SCHEMA.json also validates it
                     against that JSON schema (jsonschema package)
  length:N           1 - |tokens - N| / N, floored at 0 (a length target in completion tokens)
  brevity:N          min(1, N / tokens): 1 up to N completion tokens (EOS counted), then falling as N / tokens
                     (a shaped "be short" signal: every token less earns some reward, unlike a format regex
                     that the model must first hit by chance)
  exact[:COLUMN]     1 if the stripped completion equals the row's COLUMN (default "answer")
  exact-number[:COLUMN]  1 if the last number in the completion equals the row's COLUMN as a number
  similarity[:COLUMN]    cosine similarity of MiniLM embeddings of the completion and the row's COLUMN
                         (default "reference")
  classifier:DIR[:LABEL] probability of LABEL (a name or index; default the last label) under a BERT / MiniLM
                         sequence classifier saved by transformers in DIR (``tune/classifier.py``); a one-output
                         head (a regression reward model) gives its raw score
  module:function    any Python callable with TRL's signature (module importable, or path/to/file.py:function)
and ``SPEC=WEIGHT`` weights it (default 1).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aigckit.errors import AigcError

RewardFn = Callable[..., list]


def completion_text(c) -> str:
    """The text of a completion in either of TRL's shapes."""
    if isinstance(c, str):
        return c
    return "".join(m.get("content", "") for m in c if isinstance(m, dict))


def _texts(completions) -> list[str]:
    return [completion_text(c) for c in completions]


def format_reward(pattern: str) -> RewardFn:
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise AigcError(f"reward format:{pattern}: not a valid regular expression ({e})", param="reward") from None

    def fn(prompts, completions, **_) -> list[float]:
        return [1.0 if rx.fullmatch(t.strip()) else 0.0 for t in _texts(completions)]

    fn.__name__ = "format"
    return fn


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def json_reward(schema_path: str | None = None) -> RewardFn:
    validator = None
    if schema_path:
        try:
            import jsonschema
        except ImportError:  # pragma: no cover - jsonschema ships with the dev tools
            raise AigcError("reward json:SCHEMA needs the jsonschema package (pip install jsonschema)",
                            param="reward") from None
        try:
            schema = json.loads(Path(schema_path).expanduser().read_text())
            validator = jsonschema.Draft202012Validator(schema)
        except (OSError, json.JSONDecodeError, jsonschema.SchemaError) as e:
            raise AigcError(f"reward json:{schema_path}: not a readable JSON schema ({e})", param="reward") from None

    def fn(prompts, completions, **_) -> list[float]:
        out = []
        for t in _texts(completions):
            t = t.strip()
            m = _FENCE.match(t)
            try:
                value = json.loads(m.group(1) if m else t)
            except (json.JSONDecodeError, RecursionError):
                out.append(0.0)
                continue
            out.append(1.0 if validator is None or validator.is_valid(value) else 0.0)
        return out

    fn.__name__ = "json"
    return fn


def _lengths(completions, completion_ids) -> list[int]:
    """Completion lengths in tokens (EOS included where it stopped), or in words when the ids are not given."""
    if completion_ids is not None:
        return [len(c) for c in completion_ids]
    return [len(t.split()) for t in _texts(completions)]


def length_reward(target: int) -> RewardFn:
    if target < 1:
        raise AigcError(f"reward length:N needs N >= 1, got {target}", param="reward")

    def fn(prompts, completions, completion_ids=None, **_) -> list[float]:
        return [max(0.0, 1.0 - abs(n - target) / target) for n in _lengths(completions, completion_ids)]

    fn.__name__ = "length"
    return fn


def brevity_reward(n_max: int) -> RewardFn:
    if n_max < 1:
        raise AigcError(f"reward brevity:N needs N >= 1, got {n_max}", param="reward")

    def fn(prompts, completions, completion_ids=None, **_) -> list[float]:
        return [min(1.0, n_max / n) if n else 1.0 for n in _lengths(completions, completion_ids)]

    fn.__name__ = "brevity"
    return fn


def _column(kw: dict, col: str, n: int) -> list:
    if col not in kw:
        raise AigcError(f"this reward needs a {col!r} column in every data row", param="reward")
    vals = kw[col]
    if len(vals) != n:
        raise AigcError(f"column {col!r} has {len(vals)} values for {n} completions", param="reward")
    return vals


def exact_reward(col: str = "answer") -> RewardFn:
    def fn(prompts, completions, **kw) -> list[float]:
        texts = _texts(completions)
        return [1.0 if t.strip() == str(a).strip() else 0.0 for t, a in zip(texts, _column(kw, col, len(texts)))]

    fn.__name__ = "exact"
    return fn


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_number_reward(col: str = "answer") -> RewardFn:
    def fn(prompts, completions, **kw) -> list[float]:
        texts = _texts(completions)
        out = []
        for t, a in zip(texts, _column(kw, col, len(texts))):
            nums = _NUMBER.findall(t.replace(",", ""))
            try:
                out.append(1.0 if nums and math.isclose(float(nums[-1]), float(a), abs_tol=1e-9) else 0.0)
            except (TypeError, ValueError):
                out.append(0.0)
        return out

    fn.__name__ = "exact-number"
    return fn


def similarity_reward(col: str = "reference", model: str | None = None) -> RewardFn:
    from aigckit.embed.bert import DEFAULT_EMBED_MODEL, load_embedder

    emb = load_embedder(model or DEFAULT_EMBED_MODEL)

    def fn(prompts, completions, **kw) -> list[float]:
        texts = _texts(completions)
        refs = [str(r) for r in _column(kw, col, len(texts))]
        a, b = emb.embed([t or " " for t in texts]), emb.embed(refs)
        return (a * b).sum(-1).tolist()

    fn.__name__ = "similarity"
    return fn


def classifier_reward(arg: str) -> RewardFn:
    from aigckit.tune.classifier import load_classifier

    folder, label = arg, None
    if not Path(arg).expanduser().is_dir() and ":" in arg:  # DIR:LABEL (a folder whose name has a ':' stays whole)
        folder, _, label = arg.rpartition(":")
    clf = load_classifier(folder)
    index = clf.label_index(label)

    def fn(prompts, completions, **_) -> list[float]:
        return clf.scores(_texts(completions), index)

    fn.__name__ = "classifier"
    return fn


def _callable(spec: str) -> RewardFn:
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser()
            s = importlib.util.spec_from_file_location(path.stem, path)
            if s is None or not path.exists():
                raise ImportError(f"no file {path}")
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
        else:
            mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise AigcError(f"reward {spec}: cannot import {mod_name} ({e})", param="reward") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise AigcError(f"reward {spec}: {mod_name} has no function {attr!r}", param="reward")
    return fn


BUILTINS: dict[str, Callable[[str | None], RewardFn]] = {
    "format": lambda a: format_reward(a) if a else _need("format:REGEX"),
    "json": lambda a: json_reward(a),
    "length": lambda a: length_reward(_int(a, "length:N")),
    "brevity": lambda a: brevity_reward(_int(a, "brevity:N")),
    "exact": lambda a: exact_reward(a or "answer"),
    "exact-number": lambda a: exact_number_reward(a or "answer"),
    "similarity": lambda a: similarity_reward(a or "reference"),
    "classifier": lambda a: classifier_reward(a) if a else _need("classifier:DIR[:LABEL]"),
}


def _need(form: str):
    raise AigcError(f"reward {form} needs its argument", param="reward")


def _int(a: str | None, form: str) -> int:
    try:
        return int(a or "")
    except ValueError:
        raise AigcError(f"reward {form} needs an integer, got {a!r}", param="reward") from None


@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0


def parse_reward(spec: str) -> Reward:
    """A SPEC (see the module docstring) -> Reward; the optional ``=WEIGHT`` suffix is read when it is a number."""
    weight = 1.0
    head, eq, tail = spec.rpartition("=")
    if eq:
        try:
            weight, spec = float(tail), head
        except ValueError:
            pass
    name, colon, arg = spec.partition(":")
    if name in BUILTINS:
        return Reward(spec, BUILTINS[name](arg if colon else None), weight)
    if colon and arg:
        return Reward(arg, _callable(spec), weight)
    raise AigcError(f"unknown reward {spec!r}: use one of {', '.join(BUILTINS)} or module:function",
                    param="reward")


def score(rewards: list[Reward], prompts: list, completions: list, columns: dict[str, list],
          completion_ids: list[list[int]]) -> tuple[list[list[float]], list[float]]:
    """Each reward's values (NaN where it returned None) and their weighted sum per completion (NaNs skipped)."""
    per: list[list[float]] = []
    for r in rewards:
        vals = r.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if not isinstance(vals, (list, tuple)) or len(vals) != len(completions):
            raise AigcError(f"reward {r.name} returned {type(vals).__name__} of length "
                            f"{len(vals) if hasattr(vals, '__len__') else '?'}; it must return one value per "
                            f"completion ({len(completions)})", param="reward")
        per.append([float("nan") if v is None else float(v) for v in vals])
    total = []
    for i in range(len(completions)):
        vals = [r.weight * p[i] for r, p in zip(rewards, per) if not math.isnan(p[i])]
        total.append(sum(vals) if vals else 0.0)
    return per, total
