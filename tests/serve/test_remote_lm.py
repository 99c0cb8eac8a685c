"""RemoteLM (openai:NAME) against our own live server: the same interface and results as the local LM."""

from __future__ import annotations

import json

import pytest
from serveutil import API_KEY

from aigckit.errors import AigcError
from aigckit.text.lm import load_lm
from aigckit.text.remote import RemoteLM


@pytest.fixture(scope="module")
def remote(served):
    return load_lm("openai:tiny-chat", base_url=served.url + "/v1", api_key=API_KEY)


@pytest.fixture(scope="module")
def local(tiny_chat_dir):
    return load_lm(tiny_chat_dir)


def test_generate_stream_chat_equal_local(remote, local):
    kw = dict(max_new_tokens=6, temperature=0, ignore_eos=True)
    r = remote.generate("w5 w6 w7", **kw)
    assert r.text == local.generate("w5 w6 w7", **kw).text and r.finish_reason == "length"
    assert r.usage == {"prompt_tokens": 3, "completion_tokens": 6}
    assert "".join(remote.stream("w5 w6 w7", **kw)) == r.text
    msgs = [{"role": "user", "content": "w10 w11"}]
    c = remote.chat(msgs, max_new_tokens=5, temperature=0)
    assert c.text == local.chat(msgs, max_new_tokens=5, temperature=0).text
    assert "".join(remote.chat_stream(msgs, max_new_tokens=5, temperature=0)) == c.text
    # extras (beam search) travel in the body
    b = remote.generate("w5 w6 w7", max_new_tokens=4, num_beams=2, ignore_eos=True)
    assert b.text == local.generate("w5 w6 w7", max_new_tokens=4, num_beams=2, ignore_eos=True).text
    seqs = remote.generate([5, 6], max_new_tokens=3, num_return_sequences=2, seed=4, logprobs=True).sequences
    assert len(seqs) == 2 and all(len(s.logprobs) >= 1 for s in seqs)


def test_errors_are_aigc_errors(remote, served):
    with pytest.raises(ValueError, match="top_p"):  # validated locally, before any request (as local models)
        remote.generate("w5", top_p=2.0)
    with pytest.raises(AigcError, match="HTTP 404"):
        load_lm("openai:nope", base_url=served.url + "/v1", api_key=API_KEY).generate("w5", max_new_tokens=2)
    with pytest.raises(AigcError, match="HTTP 401"):
        load_lm("openai:tiny-chat", base_url=served.url + "/v1", api_key="wrong").generate("w5")
    with pytest.raises(AigcError, match="not available for remote"):
        remote.score("w5 w6")
    with pytest.raises(AigcError, match="cannot reach"):
        RemoteLM("x", base_url="http://127.0.0.1:9/v1", api_key="k", max_retries=0).generate("w5")


def test_cli_text_and_chat_remote(served, monkeypatch, capsys):
    from aigckit.cli import main

    monkeypatch.setenv("AIGC_API_KEY", API_KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base = ["--model", "openai:tiny-chat", "--base-url", served.url + "/v1"]
    assert main(["text", "w5 w6", *base, "--max-new-tokens", "3", "-t", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["usage"]["prompt_tokens"] == 2 and out["model"] == "tiny-chat"
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("w10 w11\n"))
    assert main(["chat", *base, "--max-new-tokens", "3", "-t", "0"]) == 0
    assert main(["score", "w5 w6", *base]) == 2
    assert "not available for remote models" in capsys.readouterr().err
