"""Constraint options shared by ``aigc text`` and ``aigc chat`` (``--json-schema``, ``--regex``, ``--grammar``,
``--json-object``), and the ``aigc template`` command. Parsing only: the work is in ``aigckit.constrain``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aigckit.errors import AigcError


def add_constraint_args(p: argparse.ArgumentParser, chat: bool = False) -> None:
    g = p.add_argument_group("constrained decoding (the output is guaranteed to match; see docs/CONSTRAIN.md)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--json-schema", metavar="FILE|JSON", default=None,
                   help="the output is JSON valid under this JSON Schema (a file, or the schema's JSON text)")
    x.add_argument("--json-object", action="store_true", help="the output is one JSON object (any keys)")
    x.add_argument("--regex", metavar="RE", default=None, help="the whole output matches this regular expression")
    x.add_argument("--grammar", metavar="FILE", default=None,
                   help="the output is a sentence of this grammar: Lark (start: ...) or GBNF (root ::= ...); a file "
                        "or the grammar's text")
    g.add_argument("--json-runs", metavar="DIGITS,CHARS|off", default=None,
                   help="bounded repetition in --json-schema/--json-object output: the longest run of digits and of "
                        "one repeated character (default 20,24; 'off' for none)")
    if chat:
        p.add_argument("--tools", action="append", default=[], metavar="MODULE:FUNCTION",
                       help="a Python function the model may call (repeatable); its schema comes from the type "
                            "hints, its description from the docstring; calls and results are shown on stderr")
        p.add_argument("--max-tool-rounds", type=int, default=4, help="tool-call rounds per answer (default 4)")
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


def _runs(value: str | None):
    """``--json-runs DIGITS,CHARS|off`` as a RunLimits (or None for off)."""
    from aigckit.constrain import RunLimits

    if value is None:
        return RunLimits()
    if value.strip().lower() == "off":
        return None
    parts = value.split(",")
    try:
        digits, chars = (int(x) for x in parts)
    except ValueError:
        raise AigcError(f"--json-runs must be DIGITS,CHARS (e.g. 20,24) or off, got {value!r}",
                        param="json_runs") from None
    return RunLimits(max_digits=digits, max_same_char=chars)


def constraint_from_args(args) -> tuple:
    """The processors for the chosen constraint (empty if none); a bad constraint fails here, before the model
    loads."""
    from aigckit.constrain import Grammar, JsonSchema, Regex

    runs = _runs(getattr(args, "json_runs", None))
    if getattr(args, "json_schema", None):
        text = _text_or_file(args.json_schema, "json_schema")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise AigcError(f"--json-schema is not valid JSON: {e}", param="json_schema") from None
        return (JsonSchema(schema, runs=runs),)
    if getattr(args, "json_object", False):
        return (JsonSchema.any_object(runs=runs),)
    if getattr(args, "regex", None):
        return (Regex(args.regex),)
    if getattr(args, "grammar", None):
        return (Grammar(_text_or_file(args.grammar, "grammar")),)
    return ()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("template", help="render a Jinja template whose gen()/select() slots the model fills",
                       description="Render FILE (a sandboxed Jinja template) top to bottom; each {{ gen('name', "
                                   "regex=..., max_tokens=..., stop=...) }} or {{ select('name', [...]) }} slot is "
                                   "generated by the model from the text above it, under its constraint. "
                                   "captured('name') reads a filled slot back. See docs/CONSTRAIN.md.")
    p.add_argument("file", help="the template (.jinja)")
    p.add_argument("--vars", default=None, metavar="FILE|JSON", help="template variables: a JSON file or JSON text")
    p.add_argument("--model", "-m", default=None, help="model name, path or openai:NAME (default: the store's)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="for gen() slots (default 0: greedy)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print {text, captures, slots} as JSON")
    p.set_defaults(func=_template)


def _template(args) -> int:
    import sys

    path = Path(args.file).expanduser()
    if not path.is_file():
        raise AigcError(f"template {args.file!r}: no such file", param="file")
    source = path.read_text(encoding="utf-8")
    variables = {}
    if args.vars:
        text = _text_or_file(args.vars, "vars")
        try:
            variables = json.loads(text)
        except json.JSONDecodeError as e:
            raise AigcError(f"--vars is not valid JSON: {e}", param="vars") from None
        if not isinstance(variables, dict):
            raise AigcError("--vars must be a JSON object", param="vars")
    from aigckit.constrain.template import render
    from aigckit.text.lm import load_lm

    lm = load_lm(args.model)
    res = render(lm, source, variables, temperature=args.temperature, seed=args.seed)
    if args.json:
        print(json.dumps({"text": res.text, "captures": res.captures, "slots": res.slots}, ensure_ascii=False))
    else:
        sys.stdout.write(res.text if res.text.endswith("\n") else res.text + "\n")
    return 0


def tool_chat(args, params, load) -> int:
    """``aigc chat --tools mod:fn ...``: one answer from stdin, or an interactive chat, with the tool loop."""
    import sys

    from aigckit.constrain.tools import load_function, run_tools

    if params.processors:
        raise AigcError("--tools cannot be combined with --json-schema/--regex/--grammar/--json-object",
                        param="tools")
    functions = [load_function(s) for s in args.tools]
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []

    def show(kind, obj) -> None:
        if kind == "call":
            sys.stderr.write(f"[tool call] {obj['name']}({json.dumps(obj['arguments'], ensure_ascii=False)})\n")
        else:
            sys.stderr.write(f"[tool result] {obj['name']}: {obj['result'][:200]}\n")

    def answer(user: str) -> dict:
        nonlocal history
        out = run_tools(lm, history + [{"role": "user", "content": user}], functions, params,
                        max_rounds=args.max_tool_rounds, on_event=None if args.json else show)
        history = out.messages
        return {"text": out.text, "tool_calls": out.calls, "messages": out.messages}

    from aigckit.cli.text import piped_message, user_turns  # (cli.text imports this module)

    user = piped_message()
    if user is not None:
        lm = load(args)
        res = answer(user)
        print(json.dumps(res, ensure_ascii=False) if args.json else res["text"])
        return 0
    lm = load(args)
    print(f"chatting with {lm.name} and {len(functions)} tool(s) - /exit to leave", file=sys.stderr)
    for user in user_turns():
        print("assistant> " + answer(user)["text"])
    return 0
