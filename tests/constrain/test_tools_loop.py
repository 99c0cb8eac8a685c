"""The local tool loop: Python functions as tools (schema from type hints), calls run with validated arguments,
results fed back, a text answer at the end; `aigc chat --tools module:function`."""

from __future__ import annotations

import io
import json
import sys

import jsonschema

from aigckit.cli import main
from aigckit.constrain.tools import function_tool, run_tools
from aigckit.text.params import GenerationParams

SEEN: list[dict] = []


def add(a: int, b: int = 1) -> int:
    """Add two integers.

    More text that is not the description."""
    SEEN.append({"a": a, "b": b})
    return a + b


def test_function_tool_schema():
    t = function_tool(add)["function"]
    assert t["name"] == "add" and t["description"] == "Add two integers."
    assert t["parameters"]["required"] == ["a"] and t["parameters"]["properties"]["a"]["type"] == "integer"
    jsonschema.validate({"a": 1}, t["parameters"])


def test_run_tools_calls_then_answers(blm):
    SEEN.clear()
    events = []
    p = GenerationParams(temperature=0.7, seed=0, max_new_tokens=200)  # seeded: the same calls every run
    out = run_tools(blm, [{"role": "user", "content": "2+3?"}], [add], p, max_rounds=1, tool_choice="required",
                    on_event=lambda kind, obj: events.append(kind))
    assert out.calls >= 1 and len(SEEN) == out.calls and all(isinstance(s["a"], int) for s in SEEN)
    roles = [m["role"] for m in out.messages]
    assert roles[:3] == ["user", "assistant", "tool"] and roles[-1] == "assistant"
    assert out.messages[2]["content"] == str(SEEN[0]["a"] + SEEN[0]["b"])  # the function's result went back
    assert out.messages[-1]["content"] == out.text and "tool_calls" not in out.messages[-1]
    assert events[:2] == ["call", "result"]


def test_cli_chat_tools(capsys, monkeypatch, tiny_bytes_dir, tmp_path):
    (tmp_path / "aigc_test_tools_mod.py").write_text("def shout(text: str) -> str:\n    return text.upper()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("sys.stdin", io.StringIO("say hi\n"))
    rc = main(["chat", "-m", str(tiny_bytes_dir), "--tools", "aigc_test_tools_mod:shout", "--json", "-t", "0",
               "--max-new-tokens", "30", "--max-tool-rounds", "1"])
    obj = json.loads(capsys.readouterr().out)
    assert rc == 0 and obj["messages"][-1] == {"role": "assistant", "content": obj["text"]}
    # at a terminal: one answer per typed line until /exit
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Tty())
    feed = iter(["say hi", "", "say bye", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(feed))
    rc = main(["chat", "-m", str(tiny_bytes_dir), "--tools", "aigc_test_tools_mod:shout", "-t", "0",
               "--max-new-tokens", "30", "--max-tool-rounds", "1"])
    assert rc == 0 and capsys.readouterr().out.count("assistant> ") == 2 and next(feed) == "never read"
    rc = main(["chat", "-m", str(tiny_bytes_dir), "--tools", "no_such_module_xyz:f"])
    assert rc == 2 and "cannot load tool" in capsys.readouterr().err
    sys.modules.pop("aigc_test_tools_mod", None)
