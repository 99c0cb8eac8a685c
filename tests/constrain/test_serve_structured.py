"""The official openai SDK against `aigc serve` on a tiny byte-level model: response_format json_object /
json_schema on chat and completions, `chat.completions.parse` with a Pydantic model, tool calls (auto, required,
named, none; streamed and not), 400s for bad schemas and tool choices."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from serveutil import API_KEY

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "color": {"enum": ["red", "green"]}},
          "required": ["n", "color"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a", "b"], "additionalProperties": False}}}
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(tb_server):
    return tb_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_response_format_json_schema_chat_and_completions(client):
    rf = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tb", messages=MSG, response_format=rf, temperature=1.0, seed=3,
                                       max_tokens=60, n=2)
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    r = client.completions.create(model="tb", prompt="x", max_tokens=60, temperature=0,
                                  extra_body={"response_format": rf})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    # json_object: a JSON object, or "length" with a prefix of one (never invalid JSON reported as "stop")
    r = client.chat.completions.create(model="tb", messages=MSG, response_format={"type": "json_object"},
                                       temperature=0, max_tokens=20)
    c = r.choices[0]
    assert c.message.content.startswith("{")
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    # streamed: the deltas join into valid JSON
    chunks = client.chat.completions.create(model="tb", messages=MSG, response_format=rf, temperature=0,
                                            max_tokens=60, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


class Reading(BaseModel):
    sensor: str = Field(max_length=5)
    value: int = Field(ge=0, le=50)
    ok: bool


def test_sdk_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model="tb", messages=MSG, response_format=Reading, temperature=0.7, seed=1,
                                      max_tokens=60)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and isinstance(msg.parsed, Reading)
    assert msg.parsed == Reading.model_validate_json(msg.content)


def _check_calls(calls, names):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        schema = {"get_weather": WEATHER, "add": ADD}[c.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(c.function.arguments), schema)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_tool_calls_not_streamed(client, choice):
    # parallel_tool_calls=False: a random model would go on calling tools until the budget ends
    r = client.chat.completions.create(model="tb", messages=MSG, tools=[WEATHER, ADD], tool_choice=choice,
                                       temperature=1.0, seed=2, max_tokens=120, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    _check_calls(c.message.tool_calls, ["add"] if isinstance(choice, dict) else ["add", "get_weather"])
    if isinstance(choice, dict):
        assert len(c.message.tool_calls) == 1


def test_tool_calls_streamed_and_the_round_trip(client):
    chunks = list(client.chat.completions.create(model="tb", messages=MSG, tools=[WEATHER, ADD],
                                                 tool_choice="required", temperature=1.0, seed=5, max_tokens=120,
                                                 stream=True, parallel_tool_calls=False))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [tc.index for tc in calls] == [0]  # parallel_tool_calls=False: one call
    _check_calls(calls, ["add", "get_weather"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back into the conversation; auto may answer in text or call again
    history = MSG + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {"name": calls[0].function.name,
                                                             "arguments": calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "42"}]
    r = client.chat.completions.create(model="tb", messages=history, tools=[WEATHER, ADD], tool_choice="auto",
                                       temperature=0, max_tokens=40)
    c = r.choices[0]
    if c.finish_reason == "tool_calls":
        _check_calls(c.message.tool_calls, ["add", "get_weather"])
    else:
        assert not c.message.content.startswith("<") and not c.message.tool_calls
    # none: plain text, no parsing
    r = client.chat.completions.create(model="tb", messages=MSG, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=5)
    assert not r.choices[0].message.tool_calls


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                             "if": {}}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_structured_requests_are_400(server, body, param):
    import httpx

    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": "tb", "messages": MSG, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in (err["param"] or "") and "\n" not in err["message"]


def test_remote_model_sends_json_schema_as_response_format(server):
    from aigckit.constrain import JsonSchema, Regex
    from aigckit.errors import AigcError
    from aigckit.text.lm import load_lm

    remote = load_lm("openai:tb", base_url=server.url + "/v1", api_key=API_KEY)
    for res in (remote.chat(MSG, constraint=JsonSchema(SCHEMA), temperature=0, max_new_tokens=60),
                remote.generate("x", constraint=JsonSchema(SCHEMA), temperature=0, max_new_tokens=60)):
        assert res.finish_reason == "stop"
        jsonschema.validate(json.loads(res.text), SCHEMA)
    with pytest.raises(AigcError):  # other constraints need the local engine
        remote.generate("x", constraint=Regex("a+"), max_new_tokens=4)
