"""The OpenAI field mapping without a server: tool-call grammar (parallel calls, named, auto), parsing, the stream
splitter, the default tool prompt, response_format."""

from __future__ import annotations

import json

import pytest

from aigckit.constrain import JsonSchema
from aigckit.constrain.openai import (ToolCallStream, parse_tool_calls, response_format_constraint, tool_constraint,
                                      tool_prompt_messages, tool_specs)
from aigckit.errors import AigcError

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}}}
PING = {"type": "function", "function": {"name": "ping"}}
TWO = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"name": "ping", ' \
      '"arguments": {}}\n</tool_call>'


def _accepts(blm, constraint, text):
    st = constraint.start([1], blm.tokenizer, blm.config.vocab_size)
    for t in blm.tokenizer.encode(text):
        st.advance(t)
    return st.error is None and st.accepting


def test_tool_grammar_modes(blm):
    _, req, _ = tool_constraint([ADD, PING], "required")
    assert _accepts(blm, req, TWO)
    assert not _accepts(blm, req, TWO.replace('"a": 1', '"a": "one"'))  # arguments follow the schema
    assert not _accepts(blm, req, "hello")
    _, one, _ = tool_constraint([ADD, PING], "required", parallel_tool_calls=False)
    assert not _accepts(blm, one, TWO) and _accepts(blm, one, TWO.split("\n<tool_call>")[0])
    _, named, _ = tool_constraint([ADD, PING], {"type": "function", "function": {"name": "ping"}})
    assert _accepts(blm, named, '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>')
    assert not _accepts(blm, named, TWO.split("\n<tool_call>")[0])
    mode, auto, _ = tool_constraint([ADD], "auto")
    assert mode == "auto" and _accepts(blm, auto, "Sure, 2.") and _accepts(blm, auto, TWO.split("\n<tool_call>")[0])
    assert tool_constraint([ADD], "none")[1] is None


def test_parse_and_stream_split():
    content, calls = parse_tool_calls(TWO)
    assert content is None and [c["function"]["name"] for c in calls] == ["add", "ping"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1}
    assert parse_tool_calls("just text") == ("just text", [])
    split, got = ToolCallStream(), []
    for i in range(0, len(TWO), 3):
        content, cs = split.feed(TWO[i:i + 3])
        assert content == ""
        got += cs
    assert [c["index"] for c in got] == [0, 1]
    split = ToolCallStream()
    assert split.feed("Hel")[0] == "Hel" and split.feed("lo <x>")[0] == "lo <x>"


def test_default_tool_prompt_and_errors():
    specs = tool_specs([ADD])
    msgs = tool_prompt_messages([{"role": "user", "content": "1+1?"},
                                 {"role": "assistant", "content": "", "tool_calls": [
                                     {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
                                 {"role": "tool", "content": "2", "tool_call_id": "c1"}], specs)
    assert msgs[0]["role"] == "system" and '"name": "add"' in msgs[0]["content"] and "<tools>" in msgs[0]["content"]
    assert "<tool_call>" in msgs[2]["content"] and msgs[3] == {"role": "user",
                                                             "content": "<tool_response>\n2\n</tool_response>"}
    with pytest.raises(AigcError) as e:
        tool_specs([ADD, ADD])
    assert e.value.param == "tools"
    assert response_format_constraint({"type": "text"}) is None
    assert response_format_constraint({"type": "json_object"}) == JsonSchema.any_object()
    with pytest.raises(AigcError) as e:
        response_format_constraint({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}})
    assert e.value.param == "response_format"
