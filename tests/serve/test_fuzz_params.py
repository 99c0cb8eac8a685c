"""Standing property test: random but schema-valid generation parameters against the live server on tiny models.

Invariants, for every example: the response is a 2xx with the promised shape, or a well-formed OpenAI-style 4xx;
a greedy "canary" request sent at the same time gets exactly the text it gets alone (no request affects another);
``/health`` stays 200. Hypothesis drives it with a fixed number of examples (AIGC_FUZZ_EXAMPLES, default 40) and
derandomised draws, so a CI run is reproducible; set AIGC_FUZZ_SEED to explore other draws.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from serveutil import API_KEY

from aigckit.text.params import LIMITS

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
EXAMPLES = int(os.environ.get("AIGC_FUZZ_EXAMPLES", "40"))
FUZZ_SEED = os.environ.get("AIGC_FUZZ_SEED")
CANARY = {"model": "tiny-chat", "prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 0, "ignore_eos": True}

words = st.lists(st.integers(30, 96).map(lambda i: f"w{i}"), min_size=1, max_size=6).map(" ".join)
token_ids = st.lists(st.integers(3, 96), min_size=1, max_size=6)
sampling = st.fixed_dictionaries({"max_tokens": st.integers(1, 16)}, optional={
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([0, 1e-45, 1e-40, 1e-6, 1e-5, 2.0])),
    "top_p": st.floats(1e-6, 1),
    "top_k": st.integers(0, 200),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(*LIMITS.repetition_penalty),
    "no_repeat_ngram_size": st.integers(0, LIMITS.no_repeat_ngram_size),
    "num_beams": st.one_of(st.just(1), st.integers(1, 4), st.integers(1, LIMITS.num_beams)),
    "length_penalty": st.floats(-LIMITS.length_penalty, LIMITS.length_penalty),
    "early_stopping": st.sampled_from([True, False, "never"]),
    "n": st.integers(1, 4),
    "seed": st.integers(0, LIMITS.seed),
    "stop": st.one_of(words, st.lists(st.text(min_size=1, max_size=6), max_size=4)),
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
})
completion = st.tuples(st.just("/v1/completions"), sampling, st.fixed_dictionaries(
    {"prompt": st.one_of(words, st.lists(words, min_size=1, max_size=3), token_ids,
                         st.lists(token_ids, min_size=1, max_size=3))},
    optional={"logprobs": st.just(0), "echo": st.booleans()}))
chat = st.tuples(st.just("/v1/chat/completions"), sampling, st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                 "content": words}), min_size=1, max_size=3)},
    optional={"logprobs": st.booleans()}))


def _well_formed_error(r: httpx.Response) -> None:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
    assert err["param"] is None or isinstance(err["param"], str), err


def _check_stream(r: httpx.Response, route: str) -> None:
    data = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert data and data[-1] == "[DONE]", r.text[-300:]
    for d in data[:-1]:
        chunk = json.loads(d)
        assert "error" not in chunk, chunk  # an in-band error means a request failed after it was accepted
        assert chunk["object"] == ("text_completion" if route == "/v1/completions" else "chat.completion.chunk")


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, headers=HEADERS, timeout=60) as c:
        yield c


def test_random_valid_parameters_never_break_the_server(http):
    alone = http.post("/v1/completions", json=CANARY).json()["choices"][0]["text"]
    statuses: dict[int, int] = {}

    def run(route: str, body: dict) -> httpx.Response:
        return http.post(route, json=body)

    @given(case=st.one_of(completion, chat))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=FUZZ_SEED is None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        route, params, rest = case
        body = {"model": "tiny-chat", **params, **rest}
        with ThreadPoolExecutor(2) as ex:
            fut = ex.submit(run, route, body)
            canary = ex.submit(run, "/v1/completions", CANARY)
            r, c = fut.result(), canary.result()
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, (body, r.status_code, r.text[:300])
        if r.status_code >= 400:
            _well_formed_error(r)
        elif body.get("stream"):
            _check_stream(r, route)
        else:
            out = r.json()
            prompts = 1
            if route == "/v1/completions" and isinstance(body["prompt"], list) and isinstance(body["prompt"][0],
                                                                                              (str, list)):
                prompts = len(body["prompt"])
            want = prompts * body.get("n", 1)
            if body.get("num_beams", 1) > 1:  # beam search may finish fewer hypotheses than asked for
                assert 1 <= len(out["choices"]) <= want, out
            else:
                assert len(out["choices"]) == want, out
            assert out["usage"]["completion_tokens"] >= 0
        assert c.status_code == 200 and c.json()["choices"][0]["text"] == alone, body
        assert http.get("/health").status_code == 200

    if FUZZ_SEED is not None:
        check = seed(int(FUZZ_SEED))(check)
    check()
    assert any(200 <= s < 300 for s in statuses), statuses  # the draws reach the engine, not only the validators
