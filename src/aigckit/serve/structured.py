"""Structured output on the OpenAI routes: ``response_format`` and ``tools``/``tool_choice`` as constraints on the
request's ``GenerationParams``, the chat prompt with tools, and tool calls in responses (whole and streamed).
The mapping itself is ``aigckit.constrain.openai``; this module only joins it to the routes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from aigckit.constrain.openai import (ToolCallStream, parse_tool_calls, response_format_constraint,
                                      template_has_tools, tool_constraint, tool_prompt_messages)
from aigckit.errors import AigcError
from aigckit.text.params import GenerationParams


@dataclass
class ToolPlan:
    """How one chat request uses tools: ``mode`` none | auto | required; ``specs`` listed in the prompt."""

    mode: str = "none"
    specs: list = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.mode != "none"


def add_constraints(params: GenerationParams, req) -> tuple[GenerationParams, ToolPlan]:
    """``params`` with the request's response_format / tool constraint appended to its processors."""
    rf = response_format_constraint(getattr(req, "response_format", None))
    plan = ToolPlan()
    if getattr(req, "tools", None) or getattr(req, "tool_choice", None) not in (None, "none"):
        mode, grammar, specs = tool_constraint(req.tools, req.tool_choice, req.parallel_tool_calls)
        plan = ToolPlan(mode, specs)
        if grammar is not None:
            if rf is not None:
                raise AigcError("response_format cannot be combined with tools (tool calls have their own format)",
                                param="response_format")
            rf = grammar
    if rf is None:
        return params, plan
    return GenerationParams.make(params, processors=params.processors + (rf,)), plan


def chat_prompt_ids(lm, messages: list[dict], plan: ToolPlan) -> list[int]:
    """Prompt ids; with tools: the template's own tool format if it has one, else the default (see
    ``aigckit.constrain.openai``)."""
    has_calls = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if not plan.active and not has_calls:
        return lm.chat_prompt([{"role": m["role"], "content": m["content"]} for m in messages])
    tok = lm.tokenizer
    if template_has_tools(tok.chat_template):
        return tok.encode_chat(messages, add_generation_prompt=True,
                               tools=[s.as_openai() for s in plan.specs] or None)
    return lm.chat_prompt(tool_prompt_messages(messages, plan.specs))


def message_dict(m) -> dict:
    """A request ``ChatMessage`` as the dict the templates and the tool format read."""
    content = m.content if isinstance(m.content, str) or m.content is None \
        else "".join(part.text for part in m.content)
    out = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
    calls = getattr(m, "tool_calls", None)
    if calls:
        out["tool_calls"] = [c.model_dump() if hasattr(c, "model_dump") else c for c in calls]
        for c in out["tool_calls"]:  # templates read arguments as an object
            args = c["function"].get("arguments")
            if isinstance(args, str):
                try:
                    c["function"]["arguments"] = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    raise AigcError("messages: tool_calls arguments must be JSON text", param="messages") from None
    if getattr(m, "tool_call_id", None):
        out["tool_call_id"] = m.tool_call_id
    return out


def assistant_message(text: str, finish: str, plan: ToolPlan) -> tuple[dict, str]:
    """The response ``message`` and ``finish_reason`` of one generated text."""
    if plan.active and finish == "stop":
        content, calls = parse_tool_calls(text)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, finish


class ToolDeltas:
    """Per streamed choice: text deltas in, ``delta`` dicts out (``content`` or ``tool_calls``)."""

    def __init__(self) -> None:
        self.split = ToolCallStream()

    def feed(self, text: str) -> list[dict]:
        content, calls = self.split.feed(text)
        out = []
        if content:
            out.append({"content": content})
        for c in calls:
            out.append({"tool_calls": [c]})
        return out

    def finish(self, reason: str) -> str:
        return "tool_calls" if reason == "stop" and self.split.n_calls else reason
