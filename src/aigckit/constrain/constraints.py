"""Constraints as values: ``JsonSchema``, ``Regex``, ``Grammar``, ``Choice``. Each is a logits processor
(``aigckit.text.processors``) that puts a grammar's token mask into every decoding step.

A constraint is an immutable, hashable value, checked when it is made (an invalid schema, regex or grammar raises
``AigcError`` with one line and ``param``), and safe to share between requests and threads. ``start`` builds the
per-sequence state (``matcher.ConstraintState``) from a compiled grammar cached per (grammar, tokenizer).

The automaton is llguidance's (an Earley parser over a lexer, with a token trie: the mask of one step costs about
as much as the grammar's work for the bytes the tokens could add, not a scan of the vocabulary)::

    JsonSchema({"type": "object", ...})     JSON Schema (draft 2020-12 subset llguidance implements; unsupported
                                             keywords are errors, not silently ignored) or a Pydantic model class
    JsonSchema.any_object()                  any JSON object (OpenAI's response_format {"type": "json_object"})
    Regex(r"\\d{3}-\\d{4}")                    the whole output matches the regex
    Grammar(text)                            a Lark grammar (llguidance's dialect) or a GBNF grammar (llama.cpp)
    Choice(["yes", "no"])                    exactly one of the strings

Whitespace in JSON is bounded by default: between tokens at most one space, or one or two newlines followed by at
most 20 spaces/tabs (the rule of llama.cpp's JSON grammars), so a model cannot run away in whitespace until its
token budget ends. ``whitespace="compact"`` allows none, ``"flexible"`` any amount (llguidance's default), or give
a regex.

Repetition in JSON is bounded by default too (``RunLimits``): at most 20 ASCII digits in a row (a number's integer,
fraction and exponent parts each; the runaway ``0.33333...`` of small models) and the same character at most 24
times in a row (``"aaaa..."``, ``"!!!!..."``), counted across token boundaries. The guard only removes tokens while
the grammar still allows something else, so it never makes a schema unsatisfiable (a ``pattern`` of 40 digits is
still produced). ``runs=None`` turns it off; ``RunLimits(max_digits=..., max_same_char=...)`` sets other bounds.
Strings and arrays are as long as the schema allows (``maxLength``/``maxItems``); the token budget ends the rest,
and a sequence cut by its budget reports ``finish_reason == "length"`` (never "stop" with partial JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from aigckit.errors import AigcError

__all__ = ["Constraint", "JsonSchema", "Regex", "Grammar", "Choice", "RunLimits", "WHITESPACE"]

# between JSON tokens: nothing, one space, or 1-2 newlines + up to 20 spaces/tabs (llama.cpp's `space` rule)
WHITESPACE = {
    "bounded": r"(?:[ ]?|\n{1,2}[ \t]{0,20})",
    "compact": None,  # whitespace_flexible = false
    "flexible": r"[\x20\x0A\x0D\x09]+",
}
MAX_SOURCE_CHARS = 1_000_000  # a schema/grammar text longer than this is refused


@dataclass(frozen=True)
class RunLimits:
    """Bounded repetition (see the module docstring): the longest run of ASCII digits and of one repeated character
    a constrained sequence may write while its grammar allows anything else; ``None`` leaves that run unbounded."""

    max_digits: int | None = 20
    max_same_char: int | None = 24

    def __post_init__(self) -> None:
        for name in ("max_digits", "max_same_char"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise AigcError(f"{name} must be a positive integer or None, got {v!r}", param=name)


def _llg():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a declared dependency
        raise AigcError("constrained decoding needs llguidance: pip install llguidance", param="constraint") from None
    return llguidance


def one_line(message: str) -> str:
    """llguidance's multi-line diagnostics (source excerpts with carets) as one line."""
    keep = []
    for line in message.strip().splitlines():
        s = line.strip()
        if not s or set(s) <= set("^ ") or s[:1].isdigit() and " | " in s[:8]:
            continue
        keep.append(s)
    return " ".join(keep) or "invalid grammar"


class Constraint:
    """Base of the constraint values: ``grammar`` (llguidance's grammar text) and ``start`` (a processor)."""

    param = "constraint"

    @property
    def grammar(self) -> str:  # subclasses: a cached_property
        raise NotImplementedError

    def _check(self) -> None:
        err = _llg().LLMatcher.validate_grammar(self.grammar)
        if err:
            raise AigcError(f"invalid {self.kind}: {one_line(err)}", param=self.param)

    @property
    def kind(self) -> str:
        return type(self).__name__

    runs: RunLimits | None = None  # the repetition guard (JsonSchema: on by default)

    def start(self, prompt: list[int], tokenizer, vocab_size: int):
        from aigckit.constrain.matcher import start_state

        return start_state(self.grammar, tokenizer, vocab_size, self.runs)

    def __or__(self, other):  # pragma: no cover - guard against a common slip
        raise TypeError("constraints cannot be combined with |; write one grammar")


def _check_runs(runs: Any) -> None:
    if runs is not None and not isinstance(runs, RunLimits):
        raise AigcError(f"runs must be a RunLimits or None, got {type(runs).__name__}", param="runs")


def _check_source(text: Any, param: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise AigcError(f"{param} must be a non-empty string, got {text!r}", param=param)
    if len(text) > MAX_SOURCE_CHARS:
        raise AigcError(f"{param} is longer than {MAX_SOURCE_CHARS} characters", param=param)


def _schema_of(schema: Any) -> dict:
    """A JSON Schema as a dict from a dict, JSON text, or a Pydantic model class (or instance)."""
    if isinstance(schema, dict):
        return schema
    if isinstance(schema, (str, bytes)):
        try:
            out = json.loads(schema)
        except json.JSONDecodeError as e:
            raise AigcError(f"json_schema is not valid JSON: {e}", param="json_schema") from None
        if not isinstance(out, dict):
            raise AigcError(f"json_schema must be a JSON object, got {type(out).__name__}", param="json_schema")
        return out
    js = getattr(schema, "model_json_schema", None)  # pydantic v2 BaseModel (class or instance)
    if callable(js):
        return js()
    raise AigcError(f"json_schema must be a dict, JSON text or a Pydantic model, got {type(schema).__name__}",
                    param="json_schema")


@dataclass(frozen=True)
class JsonSchema(Constraint):
    """Output is one JSON value that validates against ``schema`` (dict, JSON text or a Pydantic model)."""

    schema: str  # JSON text, key order kept (properties are written in the order given): hashable, cacheable
    whitespace: str = "bounded"  # "bounded" | "compact" | "flexible" | a regex for the gap between JSON tokens
    runs: RunLimits | None = RunLimits()  # bounded repetition; None: off

    param = "json_schema"

    def __init__(self, schema: Any, whitespace: str = "bounded", runs: RunLimits | None = RunLimits()) -> None:
        d = _schema_of(schema)
        try:
            text = json.dumps(d, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise AigcError(f"json_schema is not JSON-serialisable: {e}", param="json_schema") from None
        if len(text) > MAX_SOURCE_CHARS:
            raise AigcError(f"json_schema is {len(text)} characters, the limit is {MAX_SOURCE_CHARS}",
                            param="json_schema")
        if not isinstance(whitespace, str) or not whitespace:
            raise AigcError(f"whitespace must be bounded, compact, flexible or a regex, got {whitespace!r}",
                            param="whitespace")
        _check_runs(runs)
        object.__setattr__(self, "schema", text)
        object.__setattr__(self, "whitespace", whitespace)
        object.__setattr__(self, "runs", runs)
        self._check()

    @classmethod
    def any_object(cls, whitespace: str = "bounded", runs: RunLimits | None = RunLimits()) -> JsonSchema:
        """Any JSON object (OpenAI's ``{"type": "json_object"}``)."""
        return cls({"type": "object"}, whitespace, runs)

    @property
    def schema_dict(self) -> dict:
        return json.loads(self.schema)

    def response_format(self) -> dict:
        """OpenAI's ``response_format`` for this schema (what a remote model, ``openai:NAME``, is sent)."""
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": self.schema_dict,
                                                       "strict": True}}

    @cached_property
    def grammar(self) -> str:
        ws = WHITESPACE.get(self.whitespace, self.whitespace)
        opts: dict[str, Any] = {"whitespace_flexible": ws is not None}
        if ws is not None:
            opts["whitespace_pattern"] = ws
        try:
            return _llg().LLMatcher.grammar_from_json_schema(self.schema, defaults=opts)
        except ValueError as e:
            raise AigcError(f"invalid json_schema: {one_line(str(e))}", param="json_schema") from None

    @property
    def kind(self) -> str:
        return "json_schema"


@dataclass(frozen=True)
class Regex(Constraint):
    """The whole output matches ``pattern`` (Rust regex syntax; anchored at both ends)."""

    pattern: str

    param = "regex"

    def __post_init__(self) -> None:
        _check_source(self.pattern, "regex")
        self._check()

    @cached_property
    def grammar(self) -> str:
        return _llg().LLMatcher.grammar_from_regex(self.pattern)

    @property
    def kind(self) -> str:
        return "regex"


@dataclass(frozen=True)
class Grammar(Constraint):
    """A context-free grammar: Lark (llguidance's dialect: ``start: ...``, ``/regex/`` terminals, ``%json``) or
    GBNF (llama.cpp's ``root ::= ...``), told apart by ``::=``."""

    text: str
    runs: RunLimits | None = None  # bounded repetition (off: a grammar says what it allows)

    param = "grammar"

    def __post_init__(self) -> None:
        _check_runs(self.runs)
        _check_source(self.text, "grammar")
        self._check()

    @cached_property
    def grammar(self) -> str:
        llg = _llg()
        try:
            return llg.grammar_from("grammar" if "::=" in self.text else "lark", self.text)
        except ValueError as e:
            raise AigcError(f"invalid grammar: {one_line(str(e))}", param="grammar") from None

    @property
    def kind(self) -> str:
        return "grammar"


@dataclass(frozen=True)
class Choice(Constraint):
    """Exactly one of ``options`` (strings)."""

    options: tuple[str, ...]

    param = "choices"

    def __init__(self, options) -> None:
        opts = tuple(options) if not isinstance(options, str) else None
        if not opts or any(not isinstance(o, str) or not o for o in opts):
            raise AigcError("choices must be a non-empty list of non-empty strings", param="choices")
        object.__setattr__(self, "options", opts)
        self._check()

    @cached_property
    def grammar(self) -> str:
        return _llg().LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in self.options))

    @property
    def kind(self) -> str:
        return "choices"
