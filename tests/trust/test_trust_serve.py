"""The server: a request's watermark (or the server's own on every response), POST /v1/detect, 400s naming the
param."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from fastapi.testclient import TestClient

from aigckit.trust.watermark import Watermark

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_dir(tiny_llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("trust-serve") / "tiny-chat"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _client(chat_dir, watermark=None):
    from aigckit.serve.app import create_app
    from aigckit.serve.models import Registry

    app = create_app(Registry([f"tiny={chat_dir}"]), load_in_background=False, watermark=watermark)
    return TestClient(app)


def _words(text: str) -> str:
    """The tiny word-level tokenizer's text as space-separated words (its decoder may join them)."""
    return " ".join(re.findall(r"w[0-9]+", text))


def _complete(c, **kw):
    body = {"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 24, "temperature": 0.9, "seed": 4,
            "ignore_eos": True, **kw}
    return c.post("/v1/completions", json=body)


def test_request_watermark_and_detect(chat_dir):
    with _client(chat_dir) as c:
        r = _complete(c, watermark={"key": "req-key", "delta": 30})
        assert r.status_code == 200, r.text
        text = _words("w7 " + r.json()["choices"][0]["text"])  # the last prompt token is the first green list's context
        d = c.post("/v1/detect", json={"model": "tiny", "text": text, "key": "req-key", "ignore_repeated": False})
        assert d.status_code == 200, d.text
        wm = d.json()["watermark"]
        # (the tiny tokenizer splits "w2x" into its special EOS "w2" + unknown: a few tokens do not round-trip)
        assert wm["n_scored"] >= 20 and wm["green"] >= wm["n_scored"] - 6 and wm["watermarked"]
        assert wm["params"]["entropy_gate"] == Watermark.min_entropy
        ungated = c.post("/v1/detect", json={"model": "tiny", "text": text, "key": "req-key", "ignore_repeated": False,
                                             "entropy_gated": False}).json()["watermark"]
        assert ungated["params"]["entropy_gate"] is None and ungated["n_scored"] >= wm["n_scored"]
        none = c.post("/v1/detect", json={"model": "tiny", "text": text, "key": "req-key", "min_entropy": 19})
        assert none.json()["watermark"]["n_scored"] == 0
        plain = _words("w7 " + _complete(c).json()["choices"][0]["text"])
        d = c.post("/v1/detect", json={"model": "tiny", "text": plain, "key": "req-key", "ignore_repeated": False})
        assert not d.json()["watermark"]["watermarked"]
        # errors name the param
        r = _complete(c, watermark=True)
        assert r.status_code == 400 and r.json()["error"]["param"] == "watermark"
        r = c.post("/v1/detect", json={"model": "tiny", "text": plain})
        assert r.status_code == 400 and r.json()["error"]["param"] == "key"
        r = c.post("/v1/detect", json={"model": "tiny", "text": plain, "key": "k", "fpr": 2})
        assert r.status_code == 400


def test_server_key_marks_every_response(chat_dir):
    own = Watermark("server-key", delta=30)
    with _client(chat_dir, own) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "w5"}],
                                                 "max_tokens": 20, "seed": 1, "ignore_eos": True})
        assert r.status_code == 200, r.text
        text = _words(r.json()["choices"][0]["message"]["content"])
        d = c.post("/v1/detect", json={"model": "tiny", "text": text, "ignore_repeated": False}).json()["watermark"]
        assert d["n_scored"] >= 15 and d["green"] >= d["n_scored"] - 5 and d["watermarked"]
        for bad in (False, "another-key"):
            r = _complete(c, watermark=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "watermark"
        assert _complete(c, watermark=True).status_code == 200
