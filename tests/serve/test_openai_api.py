"""The official `openai` client against a live server on tiny models: every route, streaming, and the error paths."""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
from serveutil import API_KEY, CLASSES


def test_models_and_health(served, client):
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {"tiny-chat", "tiny-bert", "gan", "ddpm"}
    card = ids["tiny-chat"].model_dump()
    assert card["kind"] == "text" and card["context_length"] == 128 and card["chat"] is True
    assert ids["gan"].model_dump()["classes"] == CLASSES
    assert client.models.retrieve("tiny-bert").model_dump()["dimensions"] == 32
    h = httpx.get(served.url + "/health")  # no key needed
    assert h.status_code == 200 and h.json()["status"] == "ready"


def test_completions_match_the_engine(served, client, tiny_chat_dir):
    from aigckit.text.lm import load_lm

    lm = load_lm(tiny_chat_dir)
    want = lm.generate("w5 w6 w7", max_new_tokens=6, temperature=0, ignore_eos=True)
    r = client.completions.create(model="tiny-chat", prompt="w5 w6 w7", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 6 and r.usage.total_tokens == 9
    # token-id prompt, n, seed, logprobs, echo
    r = client.completions.create(model="tiny-chat", prompt=[5, 6, 7], max_tokens=4, n=3, seed=1, logprobs=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) >= 1 and all(x <= 0 for x in lp.token_logprobs)
    r2 = client.completions.create(model="tiny-chat", prompt=[5, 6, 7], max_tokens=4, n=3, seed=1, logprobs=0)
    assert [c.text for c in r.choices] == [c.text for c in r2.choices]  # seeded: reproducible
    r = client.completions.create(model="tiny-chat", prompt=["w5 w6", "w9"], max_tokens=2, temperature=0, echo=True)
    assert r.choices[0].text.startswith("w5 w6") and r.choices[1].text.startswith("w9")
    # beam search as an extra field equals the engine's beam search
    want = lm.generate("w5 w6 w7", max_new_tokens=5, num_beams=3, ignore_eos=True)
    r = client.completions.create(model="tiny-chat", prompt="w5 w6 w7", max_tokens=5,
                                  extra_body={"num_beams": 3, "ignore_eos": True})
    assert r.choices[0].text == want.text


def test_completion_stream_with_usage(client):
    chunks = list(client.completions.create(model="tiny-chat", prompt="w5 w6 w7", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    full = client.completions.create(model="tiny-chat", prompt="w5 w6 w7", max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert text == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_and_chat_stream(client, tiny_chat_dir):
    from aigckit.text.lm import load_lm

    msgs = [{"role": "system", "content": "w3"}, {"role": "user", "content": "w10 w11 w12"}]
    want = load_lm(tiny_chat_dir).chat(msgs, max_new_tokens=8, temperature=0)
    r = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=8, temperature=0, logprobs=True)
    m = r.choices[0]
    assert m.message.role == "assistant" and m.message.content == want.text
    assert m.finish_reason == want.finish_reason
    assert len(m.logprobs.content) == len(want.token_ids)
    stream = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    # content parts and max_completion_tokens are accepted
    r = client.chat.completions.create(model="tiny-chat", max_completion_tokens=3, temperature=0, n=2,
                                       messages=[{"role": "user", "content": [{"type": "text", "text": "w10"}]}])
    assert len(r.choices) == 2 and r.usage.completion_tokens <= 6


def test_embeddings(client, tiny_bert_dir):
    import numpy as np
    import torch

    from aigckit.embed import load_embedder

    texts = ["the cat sleeps .", "a dog runs fast"]
    want = load_embedder(tiny_bert_dir).embed(texts)
    r = client.embeddings.create(model="tiny-bert", input=texts)
    got = torch.tensor([d.embedding for d in r.data])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert r.usage.prompt_tokens == 6 + 6
    r = client.embeddings.create(model="tiny-bert", input=texts[1], encoding_format="base64")
    v = np.frombuffer(base64.b64decode(r.data[0].embedding), dtype="<f4")
    assert np.allclose(v, want[1].numpy(), atol=1e-6)


def test_images(client):
    from PIL import Image

    r = client.images.generate(model="gan", prompt="sneaker", n=2, size="28x28", response_format="b64_json",
                               extra_body={"seed": 3})
    assert len(r.data) == 2
    png = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert png.size == (28, 28) and png.text["class"] == "sneaker" and json.loads(png.text["seed"]) == 3
    again = client.images.generate(model="gan", prompt="sneaker", n=2, extra_body={"seed": 3})
    assert again.data[1].b64_json == r.data[1].b64_json  # seeded: identical PNGs
    r = client.images.generate(model="ddpm", prompt="bag", n=1, extra_body={"seed": 1, "steps": 4})
    png = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert json.loads(png.text["steps"]) == 4 and png.text["sampler"] == "ddim" and png.text["class"] == "bag"


def _err(exc_info):
    body = exc_info.value.body
    assert set(body) >= {"message", "type", "param", "code"}, body
    return body


def test_error_paths(served, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt="w5", temperature=3)
    assert _err(e)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt="w5", top_p=0)
    assert _err(e)["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:  # engine-level check: num_return_sequences <= num_beams
        client.completions.create(model="tiny-chat", prompt="w5", n=4, extra_body={"num_beams": 2})
    assert "n (4) must be <= num_beams" in _err(e)["message"] and _err(e)["param"] == "n"  # from AigcError.param
    with pytest.raises(openai.BadRequestError) as e:  # prompt fills the 128-token context
        client.completions.create(model="tiny-chat", prompt=" ".join(["w5"] * 128))
    assert "context window" in _err(e)["message"] and _err(e)["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-chat", prompt="w5", presence_penalty=0.5)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-chat", prompt="w5", extra_body={"bogus": 1})
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt=[5, 500])
    assert "vocabulary" in _err(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny-chat", input="x")
    assert _err(e)["code"] == "wrong_model_kind"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="gan", prompt="airplane")
    assert "known: shirt, sneaker, bag" in _err(e)["message"]
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="gan", prompt="bag", size="64x64")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=[], max_tokens=2)
    # unknown model -> 404; paths are never resolved
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="w5")
    assert _err(e)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="/etc/passwd", prompt="w5")
    assert _err(e)["code"] == "invalid_model"
    # missing / wrong key -> 401 on every route but /health
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        r = httpx.get(served.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # malformed JSON, oversized body, unknown route
    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    r = httpx.post(served.url + "/v1/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(served.url + "/v1/completions", headers=h,
                   content=json.dumps({"model": "tiny-chat", "prompt": "w1 " * 40000}).encode())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(served.url + "/v1/nope", headers=h)
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_metrics_and_cors(served, client):
    client.completions.create(model="tiny-chat", prompt="w5", max_tokens=2)
    h = {"Authorization": f"Bearer {API_KEY}"}
    text = httpx.get(served.url + "/metrics", headers=h).text
    assert 'aigc_requests_total{route="/v1/completions",status="200"}' in text
    assert 'aigc_tokens_total{model="tiny-chat",type="completion"}' in text
    assert "aigc_queue_depth" in text and "aigc_time_to_first_token_seconds" in text
    pre = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(served.url + "/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = httpx.options(served.url + "/v1/chat/completions", headers=dict(pre, Origin="https://evil.example"))
    assert "access-control-allow-origin" not in r.headers


def test_error_messages_name_the_real_problem_and_limit(served):
    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    r = httpx.post(served.url + "/v1/completions", content=b"{not json", headers=h)
    err = r.json()["error"]
    assert r.status_code == 400 and err["message"].startswith("the request body is not valid JSON: Expecting")
    assert err["param"] is None and err["code"] == "invalid_json"  # was "1: JSON decode error", param "1"
    r = httpx.post(served.url + "/v1/embeddings", headers=h,
                   content=json.dumps({"model": "tiny-bert", "input": ["a"] * 10_000}).encode())
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "input" and "at most 256 items" in err["message"], err
    r = httpx.post(served.url + "/v1/completions", headers=h, json={"model": "tiny-chat", "prompt": [5, -1]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt", err
    assert "token id -1 at index 1" in err["message"] and "token ids must be in [0, 97)" in err["message"]
    r = httpx.post(served.url + "/v1/completions", headers=h, json={"model": "tiny-chat", "prompt": [[5], [7, 10**9]]})
    assert r.status_code == 400 and "token ids must be in [0, 97)" in r.json()["error"]["message"]
    r = httpx.post(served.url + "/v1/chat/completions", headers=h,
                   json={"model": "tiny-chat", "messages": [{"role": "user", "content": 5}]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages.0.content", err
    r = httpx.post(served.url + "/v1/completions", headers=h, json={"model": "tiny-chat", "prompt": "w5", "n": 65})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert "less than or equal to 64" in r.json()["error"]["message"]


def test_tiny_temperature_is_greedy_through_the_api(client):
    kw = dict(model="tiny-chat", prompt="w5 w6 w7", max_tokens=6, extra_body={"ignore_eos": True})
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    assert client.completions.create(temperature=1e-40, seed=3, **kw).choices[0].text == greedy
