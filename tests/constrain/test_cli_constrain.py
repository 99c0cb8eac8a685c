"""`aigc text/chat --json-schema | --json-object | --regex | --grammar`: outputs match, bad constraints exit 2
with one line before the model loads."""

from __future__ import annotations

import argparse
import io
import json
import re

import jsonschema

from aigckit.cli import main

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_text_json_schema_from_file_and_inline(capsys, tmp_path, tiny_bytes_dir):
    f = tmp_path / "s.json"
    f.write_text(json.dumps(SCHEMA))
    for value in (f, json.dumps(SCHEMA)):
        rc, out, _ = run(capsys, "text", "hi", "-m", tiny_bytes_dir, "--json-schema", value, "-t", "0.8", "--seed",
                         "1", "--json", "--max-new-tokens", "60")
        obj = json.loads(out)
        assert rc == 0 and obj["finish_reason"] == "stop"
        jsonschema.validate(json.loads(obj["text"]), SCHEMA)


def test_text_regex_grammar_json_object(capsys, tmp_path, tiny_bytes_dir):
    rc, out, _ = run(capsys, "text", "hi", "-m", tiny_bytes_dir, "--regex", "[0-9]{2}-[ab]", "-t", "1", "--seed", "0",
                     "--no-stream")
    assert rc == 0 and re.fullmatch(r"[0-9]{2}-[ab]", out.rstrip("\n"))
    g = tmp_path / "g.gbnf"
    g.write_text('root ::= "yes" | "no"\n')
    rc, out, _ = run(capsys, "text", "hi", "-m", tiny_bytes_dir, "--grammar", g, "-t", "0")
    assert rc == 0 and out.strip() in ("yes", "no")


def test_chat_json_schema_and_json_object(capsys, monkeypatch, tiny_bytes_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("give me json\n"))
    rc, out, _ = run(capsys, "chat", "-m", tiny_bytes_dir, "--json-schema", json.dumps(SCHEMA), "-t", "0", "--json",
                     "--max-new-tokens", "60")
    obj = json.loads(out)
    assert rc == 0 and obj["finish_reason"] == "stop"
    jsonschema.validate(json.loads(obj["text"]), SCHEMA)
    # any object: a random model writes keys until the budget ends -> "length" with a JSON prefix, never "stop"
    monkeypatch.setattr("sys.stdin", io.StringIO("give me json\n"))
    rc, out, _ = run(capsys, "chat", "-m", tiny_bytes_dir, "--json-object", "-t", "0", "--json",
                     "--max-new-tokens", "30")
    obj = json.loads(out)
    assert rc == 0 and obj["finish_reason"] == "length" and obj["text"].startswith("{")


def test_bad_constraints_exit_2_with_one_line(capsys, tmp_path):
    for args in (["--json-schema", '{"type": "frob"}'], ["--regex", "a(b"], ["--grammar", str(tmp_path / "no.lark")],
                 ["--json-schema", "{bad json"], ["--grammar", "start: nothing_here"],
                 ["--json-object", "--json-runs", "20"], ["--json-object", "--json-runs", "0,5"]):
        rc, _, err = run(capsys, "text", "hi", "-m", "/nonexistent/model", *args)
        assert rc == 2 and err.count("\n") == 1 and err.startswith("aigc: error:"), (args, err)
        assert "nonexistent" not in err  # refused before the model is looked up


def test_text_logprobs_in_json(capsys, tiny_bytes_dir):
    rc, out, _ = run(capsys, "text", "hi", "-m", tiny_bytes_dir, "-t", "0", "--json", "--max-new-tokens", "3",
                     "--logprobs", "2")
    obj = json.loads(out)
    assert rc == 0 and len(obj["logprobs"]) == len(obj["token_ids"]) == 3
    for e, tid in zip(obj["logprobs"], obj["token_ids"]):
        assert e["id"] == tid and len(e["top"]) == 2 and e["top"][0]["id"] == tid  # greedy: the best one
        assert e["logprob"] == e["top"][0]["logprob"] <= 0
    rc, _, err = run(capsys, "text", "hi", "-m", "/nonexistent", "--logprobs", "21")
    assert rc == 2 and "top_logprobs" in err


def test_json_runs_flag(capsys, tiny_bytes_dir):
    from aigckit.cli.constrain import constraint_from_args
    from aigckit.constrain import RunLimits

    ns = argparse.Namespace(json_object=True, json_runs=None)
    assert constraint_from_args(ns)[0].runs == RunLimits()
    ns.json_runs = "off"
    assert constraint_from_args(ns)[0].runs is None
    ns.json_runs = "5,7"
    assert constraint_from_args(ns)[0].runs == RunLimits(5, 7)
    rc, out, _ = run(capsys, "text", "hi", "-m", tiny_bytes_dir, "--json-object", "--json-runs", "3,4", "-t", "0",
                     "--json", "--max-new-tokens", "40")
    assert rc == 0 and not re.search(r"[0-9]{4}|(.)\1{4}", json.loads(out)["text"])
