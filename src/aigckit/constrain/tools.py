"""Local tool calling: Python functions as tools, and the loop that lets a model call them until it answers.

    def get_weather(city: str, unit: str = "c") -> str:
        '''Current weather in a city.'''
        ...
    out = run_tools(lm, [{"role": "user", "content": "Weather in Oslo?"}], [get_weather])
    out.text, out.messages         # the final answer and the whole exchange (tool calls and results included)

A function's JSON Schema comes from its signature (pydantic, from the type hints; unannotated parameters are
strings), its description from the docstring's first paragraph. Each round the model's output is constrained to
the tool-call format with arguments that validate (``constrain.openai.tool_constraint``, ``tool_choice="auto"``),
the calls are run, and their results go back as ``tool`` messages in the default format; the loop ends with the
first plain-text answer or after ``max_rounds`` rounds (then the last round is generated with ``tool_choice="none"``).
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from aigckit.constrain.openai import parse_tool_calls, tool_constraint, tool_prompt_messages
from aigckit.errors import AigcError

__all__ = ["function_tool", "load_function", "run_tools", "ToolRun"]


def function_tool(fn: Callable) -> dict:
    """The OpenAI tool definition of a Python function."""
    import pydantic

    fields: dict[str, Any] = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation if p.annotation is not inspect.Parameter.empty else str
        fields[name] = (ann, ... if p.default is inspect.Parameter.empty else p.default)
    model = pydantic.create_model(fn.__name__, **fields)
    schema = model.model_json_schema()
    schema.pop("title", None)
    schema["additionalProperties"] = False
    doc = inspect.getdoc(fn) or ""
    return {"type": "function", "function": {"name": fn.__name__, "description": doc.split("\n\n")[0].strip(),
                                             "parameters": schema}}


def load_function(spec: str) -> Callable:
    """``module:function`` (the module importable from the current directory or sys.path)."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise AigcError(f"tools must be given as module:function, got {spec!r}", param="tools")
    import sys

    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise AigcError(f"cannot load tool {spec!r}: {e}", param="tools") from None
    if not callable(fn):
        raise AigcError(f"tool {spec!r} is not a function", param="tools")
    return fn


@dataclass
class ToolRun:
    text: str
    messages: list[dict] = field(default_factory=list)
    calls: int = 0


def run_tools(lm, messages: list[dict], functions: list[Callable], params=None, *, max_rounds: int = 4,
              tool_choice: Any = "auto", on_event: Callable[[str, Any], None] | None = None) -> ToolRun:
    """Chat with ``functions`` as tools until the model answers in text (see the module docstring).
    ``tool_choice`` applies to the first round ("auto", "required" or {"type": "function", ...}); later rounds
    are "auto"."""
    tools = [function_tool(f) for f in functions]
    by_name = {f.__name__: f for f in functions}
    history = list(messages)
    calls = 0
    for rnd in range(max_rounds + 1):
        choice = (tool_choice if rnd == 0 else "auto") if rnd < max_rounds else "none"
        mode, grammar, specs = tool_constraint(tools, choice)
        prompt = lm.chat_prompt(tool_prompt_messages(history, specs))
        res = lm.generate(prompt, params, **({"constraint": grammar} if grammar is not None else {}))
        content, found = parse_tool_calls(res.text) if res.finish_reason == "stop" and grammar else (res.text, [])
        if not found:
            history.append({"role": "assistant", "content": res.text})
            return ToolRun(res.text, history, calls)
        history.append({"role": "assistant", "content": content or "", "tool_calls": found})
        for c in found:
            name, args = c["function"]["name"], json.loads(c["function"]["arguments"])
            if on_event:
                on_event("call", {"name": name, "arguments": args})
            try:
                result = by_name[name](**args)
            except Exception as e:  # the tool's failure is the model's to read, not the loop's end
                result = f"error: {type(e).__name__}: {e}"
            text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
            if on_event:
                on_event("result", {"name": name, "result": text})
            history.append({"role": "tool", "tool_call_id": c["id"], "content": text})
            calls += 1
    raise AssertionError("unreachable")  # pragma: no cover - the last round has tool_choice none
