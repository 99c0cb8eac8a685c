"""A few server checks on the real models (SmolLM2 + MiniLM from the store): chat and embeddings through the API
equal the library."""

from __future__ import annotations

import pytest
from serveutil import LiveServer, free_port

pytestmark = pytest.mark.integration


def test_smollm_chat_and_minilm_embeddings(smollm_gguf):
    import openai
    import torch

    from aigckit import store
    from aigckit.embed import load_embedder
    from aigckit.serve.app import create_app
    from aigckit.serve.models import Registry
    from aigckit.text.lm import load_lm

    if not (store.models_dir() / "minilm-l6-v2").exists():
        pytest.skip("minilm-l6-v2 not pulled")
    lm, emb = load_lm("smollm2-135m-instruct"), load_embedder("minilm-l6-v2")
    srv = LiveServer(create_app(Registry.from_objects(text={"smollm2": lm}, embedding={"minilm": emb})),
                     free_port()).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        want = lm.chat(msgs, max_new_tokens=8, temperature=0).text
        got = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, temperature=0)
        assert got.choices[0].message.content == want and "Paris" in want
        chunks = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        texts = ["A man is eating food.", "A man is eating a piece of bread."]
        r = client.embeddings.create(model="minilm", input=texts)
        torch.testing.assert_close(torch.tensor([d.embedding for d in r.data]), emb.embed(texts), atol=1e-6, rtol=0)
    finally:
        srv.stop()
