"""Constraint options shared by ``aigc text`` and ``aigc chat`` (``--json-schema``, ``--regex``, ``--grammar``,
``--json-object``), and the ``aigc template`` command. Parsing only: the work is in ``aigckit.constrain``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aigckit.errors import AigcError


def add_constraint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("constrained decoding (the output is guaranteed to match; see docs/CONSTRAIN.md)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--json-schema", metavar="FILE|JSON", default=None,
                   help="the output is JSON valid under this JSON Schema (a file, or the schema's JSON text)")
    x.add_argument("--json-object", action="store_true", help="the output is one JSON object (any keys)")
    x.add_argument("--regex", metavar="RE", default=None, help="the whole output matches this regular expression")
    x.add_argument("--grammar", metavar="FILE", default=None,
                   help="the output is a sentence of this grammar: Lark (start: ...) or GBNF (root ::= ...); a file "
                        "or the grammar's text")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="with --json: each token's log-probability and the N most likely tokens at each step (0-20)")


def _text_or_file(value: str, param: str) -> str:
    s = value.strip()
    if s.startswith("{") or "\n" in value or "::=" in value or s.startswith("start:"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise AigcError(f"--{param.replace('_', '-')} {value!r}: no such file (give a file or the text itself)",
                        param=param)
    return path.read_text(encoding="utf-8")


def params_from_args(args) -> dict:
    """GenerationParams fields from these options: processors (the constraint) and logprobs."""
    out: dict = {"processors": constraint_from_args(args)}
    if getattr(args, "logprobs", None) is not None:
        out.update(logprobs=True, top_logprobs=args.logprobs)
    return out


def logprobs_json(tokenizer, seq) -> list[dict] | None:
    """A sequence's logprobs for ``--json``: [{token, id, logprob, top: [{token, id, logprob}]}]."""
    if seq.logprobs is None:
        return None
    tops = seq.top_logprobs or [[] for _ in seq.logprobs]

    def text(i: int) -> str:
        return tokenizer.decode([i]) if i < tokenizer.vocab_size else ""

    return [{"token": text(t), "id": t, "logprob": lp,
             "top": [{"token": text(a), "id": a, "logprob": b} for a, b in k]}
            for t, lp, k in zip(seq.token_ids, seq.logprobs, tops)]


def constraint_from_args(args) -> tuple:
    """The processors for the chosen constraint (empty if none); a bad constraint fails here, before the model
    loads."""
    from aigckit.constrain import Grammar, JsonSchema, Regex

    if getattr(args, "json_schema", None):
        text = _text_or_file(args.json_schema, "json_schema")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise AigcError(f"--json-schema is not valid JSON: {e}", param="json_schema") from None
        return (JsonSchema(schema),)
    if getattr(args, "json_object", False):
        return (JsonSchema.any_object(),)
    if getattr(args, "regex", None):
        return (Regex(args.regex),)
    if getattr(args, "grammar", None):
        return (Grammar(_text_or_file(args.grammar, "grammar")),)
    return ()
