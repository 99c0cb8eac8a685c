"""logprobs / top_logprobs in the engine and on the server; echo + max_tokens 0 gives the prompt's log-probabilities
(what lm-evaluation-harness's local-completions reads), equal to `score`'s."""

from __future__ import annotations

import math

import httpx
import pytest

from aigckit.errors import AigcError
from aigckit.text.params import GenerationParams
from serveutil import API_KEY


@pytest.fixture(scope="module")
def server(tb_server):
    return tb_server


def post(server, path, body):
    return httpx.post(server.url + path, headers={"Authorization": f"Bearer {API_KEY}"}, json=body, timeout=60)


def test_engine_top_logprobs(blm):
    res = blm.generate("hello", temperature=0, max_new_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=3)
    seq = res.sequences[0]
    assert len(seq.top_logprobs) == len(seq.token_ids) == 5
    for tok, lp, top in zip(seq.token_ids, seq.logprobs, seq.top_logprobs):
        assert len(top) == 3 and top[0][0] == tok and math.isclose(top[0][1], lp, abs_tol=1e-6)  # greedy = top-1
        assert top[0][1] >= top[1][1] >= top[2][1]
    with pytest.raises(AigcError):
        GenerationParams(top_logprobs=2)  # needs logprobs
    with pytest.raises(AigcError):
        GenerationParams(logprobs=True, top_logprobs=21)


def test_prompt_logprobs_equal_score(blm):
    ids = blm.encode("The quick brown fox jumps over the lazy dog.")
    lps = blm.token_logprobs(ids, top=2)
    assert lps[0] == (None, []) and len(lps) == len(ids)
    s = blm.score(ids, window=len(ids), stride=len(ids))
    assert abs(-sum(lp for lp, _ in lps[1:]) / (len(ids) - 1) - s.nll) < 1e-4


def test_server_chat_top_logprobs(server):
    r = post(server, "/v1/chat/completions", {"model": "tb", "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 4, "temperature": 0, "logprobs": True,
                                              "top_logprobs": 5, "ignore_eos": True})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for c in content:
        assert len(c["top_logprobs"]) == 5 and c["top_logprobs"][0]["token"] == c["token"]
        assert c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"])
    r = post(server, "/v1/chat/completions", {"model": "tb", "messages": [{"role": "user", "content": "hi"}],
                                              "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_server_echo_max_tokens_0_prompt_logprobs(server, blm):
    prompt = "abc abc abc"
    r = post(server, "/v1/completions", {"model": "tb", "prompt": prompt, "max_tokens": 0, "echo": True,
                                         "logprobs": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    lp = ch["logprobs"]
    ids = blm.encode(prompt)
    assert ch["text"] == prompt and len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][0] == 0 and lp["text_offset"][-1] == len(prompt) - len(lp["tokens"][-1])
    want = blm.token_logprobs(ids, top=1)
    assert lp["token_logprobs"][1:] == pytest.approx([x for x, _ in want[1:]], abs=1e-5)
    # echo + 1 generated token (lm-eval's request shape): prompt logprobs, then the token's
    r = post(server, "/v1/completions", {"model": "tb", "prompt": [ids, ids[:3]], "max_tokens": 1, "echo": True,
                                         "logprobs": 1, "temperature": 0, "seed": 1234})
    chs = r.json()["choices"]
    assert len(chs[0]["logprobs"]["token_logprobs"]) == len(ids) + 1 and len(chs[1]["logprobs"]["tokens"]) == 4
    top_last = chs[0]["logprobs"]["top_logprobs"][-1]
    assert list(top_last.values())[0] == pytest.approx(chs[0]["logprobs"]["token_logprobs"][-1])  # greedy = top-1
    r = post(server, "/v1/completions", {"model": "tb", "prompt": prompt, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
