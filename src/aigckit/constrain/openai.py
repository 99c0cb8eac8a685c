"""OpenAI's structured-output and tool-calling request fields as constraints, and tool calls parsed back out.

- ``response_format``: ``{"type": "text"}`` (nothing), ``{"type": "json_object"}`` (any JSON object),
  ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`` (JSON valid under the
  schema; ``strict`` is accepted either way: the output always follows the schema).
- ``tools`` + ``tool_choice``: the tools go into the prompt (the chat template's own tool format when it has one,
  else the default below), and the output is constrained to the tool-call format with each call's ``arguments``
  constrained to that function's JSON Schema, so every returned ``arguments`` string parses and validates.

The default tool format (Hermes / Qwen2.5 style, used when the chat template does not mention ``tools``): a system
message section lists the functions as JSON inside ``<tools></tools>``, and the model answers with one or more::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``tool_choice``: ``"none"`` (no tools in the prompt, no constraint), ``"auto"`` (plain text that does not start
with ``<``, or tool calls), ``"required"`` (one or more calls), ``{"type": "function", "function": {"name": F}}``
(exactly one call of F). ``parallel_tool_calls=False`` allows one call at most.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from aigckit.constrain.constraints import WHITESPACE, Grammar, JsonSchema, RunLimits
from aigckit.errors import AigcError

__all__ = ["response_format_constraint", "ToolSpec", "tool_specs", "tool_constraint", "tool_prompt_messages",
           "parse_tool_calls", "ToolCallStream", "TOOL_OPEN", "TOOL_CLOSE"]

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def response_format_constraint(rf: Any):
    """The constraint of a ``response_format`` (a dict or a pydantic model of one); ``None`` for text."""
    if rf is None:
        return None
    if hasattr(rf, "model_dump"):
        rf = rf.model_dump(by_alias=True, exclude_none=True)
    kind = rf.get("type")
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return JsonSchema.any_object()
        if kind == "json_schema":
            js = rf.get("json_schema") or {}
            schema = js.get("schema")
            if schema is None:
                return JsonSchema.any_object()
            return JsonSchema(schema)
    except AigcError as e:
        raise AigcError(f"response_format: {e}", param="response_format") from None
    raise AigcError(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                    param="response_format")


class ToolSpec:
    """One function tool: name, description, parameters (a JSON Schema of an object)."""

    def __init__(self, name: str, description: str = "", parameters: dict | None = None) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise AigcError(f"tool function names must be 1-64 letters, digits, _ or -, got {name!r}", param="tools")
        self.name, self.description = name, description or ""
        self.parameters = parameters if parameters is not None else {"type": "object", "properties": {}}
        try:
            JsonSchema(self.parameters)  # checked now: an invalid schema is the request's error (400)
        except AigcError as e:
            raise AigcError(f"tools: function {name!r}: {e}", param="tools") from None

    def as_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def tool_specs(tools: list | None) -> list[ToolSpec]:
    out = []
    for t in tools or []:
        if hasattr(t, "model_dump"):
            t = t.model_dump(exclude_none=True)
        if t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            raise AigcError("tools: only {type: function, function: {...}} tools are supported", param="tools")
        f = t["function"]
        out.append(ToolSpec(f.get("name"), f.get("description") or "", f.get("parameters")))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise AigcError("tools: function names must be unique", param="tools")
    return out


def _choice(tool_choice: Any, specs: list[ToolSpec]) -> str | ToolSpec:
    """"none" | "auto" | "required" | the named ToolSpec."""
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump(exclude_none=True)
    if tool_choice is None:
        return "auto" if specs else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise AigcError(f"tool_choice must be none, auto, required or a function, got {tool_choice!r}",
                            param="tool_choice")
        if tool_choice != "none" and not specs:
            raise AigcError(f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
        return tool_choice
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    for s in specs:
        if s.name == name:
            return s
    raise AigcError(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")


def _call_schema(specs: list[ToolSpec]) -> dict:
    alts = [{"type": "object", "properties": {"name": {"const": s.name}, "arguments": s.parameters},
             "required": ["name", "arguments"], "additionalProperties": False} for s in specs]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def tool_constraint(tools: list | None, tool_choice: Any, parallel_tool_calls: bool | None = True
                    ) -> tuple[str, Grammar | None, list[ToolSpec]]:
    """(mode, constraint or None, the tools to list in the prompt) for a request's tool fields."""
    specs = tool_specs(tools)
    choice = _choice(tool_choice, specs)
    if choice == "none":
        return "none", None, []
    allowed = [choice] if isinstance(choice, ToolSpec) else specs
    # bounded whitespace inside the call's JSON too (llguidance reads its options from "x-guidance")
    body = json.dumps({**_call_schema(allowed), "x-guidance": {"whitespace_flexible": True,
                                                               "whitespace_pattern": WHITESPACE["bounded"]}})
    call = f'"{TOOL_OPEN}\\n" %json {body} "\\n{TOOL_CLOSE}"'
    many = parallel_tool_calls is not False and not isinstance(choice, ToolSpec)
    calls = "call (\"\\n\" call)*" if many else "call"
    lark = f"start: {'calls | TEXT' if choice == 'auto' else 'calls'}\ncalls: {calls}\ncall: {call}\n"
    if choice == "auto":
        lark += "TEXT: /[^<\\s][\\s\\S]*/\n"  # plain text never starts with "<" (or whitespace) in auto mode
    return ("auto" if choice == "auto" else "required"), Grammar(lark, runs=RunLimits()), specs  # bounded runs as JSON


def _tools_system_text(specs: list[ToolSpec]) -> str:
    lines = "\n".join(json.dumps(s.as_openai(), ensure_ascii=False) for s in specs)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + lines +
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>")


def template_has_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def tool_prompt_messages(messages: list[dict], specs: list[ToolSpec]) -> list[dict]:
    """Messages in the default tool format for a template without tool support: tool lists in the system message,
    assistant ``tool_calls`` as ``<tool_call>`` blocks, ``tool`` results as user turns in ``<tool_response>``."""
    out: list[dict] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = []
            for c in m["tool_calls"]:
                f = c.get("function", c)
                args = f.get("arguments")
                args = json.loads(args) if isinstance(args, str) and args.strip() else (args or {})
                blocks.append(f"{TOOL_OPEN}\n{json.dumps({'name': f.get('name'), 'arguments': args})}\n{TOOL_CLOSE}")
            content = (content + "\n" if content else "") + "\n".join(blocks)
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": role, "content": content})
    if specs:
        text = _tools_system_text(specs)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a generated text in the default format; content None when only calls."""
    calls = []
    for m in _CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or "name" not in obj:
            continue
        calls.append({"id": _call_id(), "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(obj.get("arguments", {}),
                                                                               ensure_ascii=False)}})
    if not calls:
        return text, []
    rest = _CALL_RE.sub("", text).strip()
    return (rest or None), calls


class ToolCallStream:
    """Splits streamed text into content deltas and complete tool calls (one ``delta.tool_calls`` chunk per call,
    sent when its ``</tool_call>`` arrives; the SDKs accumulate either way)."""

    def __init__(self) -> None:
        self.buf = ""
        self.mode: str | None = None  # "text" | "tools", decided by the first non-space character
        self.n_calls = 0

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        """(content to send now, tool calls completed now, each with its ``index``)."""
        self.buf += delta
        if self.mode is None:
            s = self.buf.lstrip()
            if not s:
                return "", []
            self.mode = "tools" if s.startswith("<") else "text"
        if self.mode == "text":
            out, self.buf = self.buf, ""
            return out, []
        calls = []
        while True:
            m = _CALL_RE.search(self.buf)
            if m is None:
                break
            _, found = parse_tool_calls(m.group(0))
            for c in found:
                c["index"] = self.n_calls
                self.n_calls += 1
                calls.append(c)
            self.buf = self.buf[m.end():]
        return "", calls
