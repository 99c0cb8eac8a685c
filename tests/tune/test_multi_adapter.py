"""Several LoRA adapters side by side on one loaded base (text/multilora.py): the Python path, the scheduler's mixed
batches and `aigc serve --adapter`, each against a model loaded with that single adapter merged."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import pytest
import torch

from aigckit.errors import AigcError
from aigckit.text.lm import load_lm
from aigckit.text.params import GenerationParams
from aigckit.text.scheduler import Scheduler
from aigckit.tune.lora import LoraConfig, add_lora, lora_parameters, save_adapter

PROMPTS = [[5, 17, 3, 44], [9, 12, 80, 7, 1, 33], [60, 61]]
GREEDY = GenerationParams(max_new_tokens=10, temperature=0, ignore_eos=True)


def _adapter(base_dir, out, targets, r, seed):
    lm = load_lm(base_dir, kernels="torch")
    cfg = LoraConfig(r=r, alpha=2 * r, target_modules=targets)
    add_lora(lm.model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(lm.model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # strong enough to change greedy choices
    return save_adapter(lm.model, out, cfg, str(base_dir))


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return {"a": _adapter(tiny_llama_dir, d / "a", ["q_proj", "v_proj", "down_proj"], 4, 1),
            "b": _adapter(tiny_llama_dir, d / "b", "all-linear", 2, 2)}


@pytest.fixture(scope="module")
def references(tiny_llama_dir, adapters):
    """Greedy tokens of each prompt from the base and from each adapter merged at load (one model each)."""
    out = {}
    for name, path in [(None, None), *adapters.items()]:
        lm = load_lm(tiny_llama_dir, adapter=path)
        out[name] = [lm.generate(p, GREEDY).token_ids for p in PROMPTS]
    assert out[None] != out["a"] and out[None] != out["b"] and out["a"] != out["b"]  # the adapters matter
    return out


def test_with_adapter_matches_merged_and_shares_the_base(tiny_llama_dir, adapters, references):
    lm = load_lm(tiny_llama_dir, adapters=adapters)
    assert lm.adapters.names == ("a", "b")
    base_ptrs = {t.data_ptr() for t in lm.model.state_dict().values()}
    tree = lm.adapters.model.state_dict()
    own = {k for k, t in tree.items() if t.data_ptr() not in base_ptrs}
    assert own == set(), own  # the adapter tree holds the base tensors themselves (A, B are plain attributes)
    for name in (None, "a", "b"):
        m = lm if name is None else lm.with_adapter(name)
        assert [m.generate(p, GREEDY).token_ids for p in PROMPTS] == references[name]
    merged = load_lm(tiny_llama_dir, kernels="torch", adapter=adapters["b"])
    x = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        torch.testing.assert_close(lm.with_adapter("b").model(x), merged.model(x), atol=2e-5, rtol=1e-4)
    assert lm.with_adapter("a").run_config["adapter"] == str(adapters["a"])
    with pytest.raises(AigcError) as e:
        lm.with_adapter("zzz")
    assert e.value.param == "model" and "a, b" in str(e.value)
    with pytest.raises(AigcError):
        load_lm(tiny_llama_dir, adapters={"bad:name": adapters["a"]})


def test_scheduler_mixes_adapters_in_one_batch(tiny_llama_dir, adapters, references):
    lm = load_lm(tiny_llama_dir, adapters=adapters)
    sched = Scheduler(lm, max_batch=8)
    try:
        handles = {}
        for name in (None, "a", "b", "a", None, "b"):  # all submitted before the worker admits: mixed batches
            for i, p in enumerate(PROMPTS):
                handles.setdefault((name, i), []).append(sched.submit(p, GREEDY, adapter=name))
        for (name, i), hs in handles.items():
            for h in hs:
                assert [ev.token_id for ev in h if ev.token_id is not None] == references[name][i]
        beam = GenerationParams(max_new_tokens=6, num_beams=2)
        merged = load_lm(tiny_llama_dir, adapter=adapters["b"])
        assert sched.generate_beam(PROMPTS[0], beam, adapter="b")[0].token_ids == \
            merged.generate(PROMPTS[0], beam).token_ids
        with pytest.raises(AigcError) as e:
            sched.submit(PROMPTS[0], GREEDY, adapter="c")
        assert e.value.param == "model"
    finally:
        sched.close()


def test_serve_adapters_concurrently(tiny_llama_dir, adapters, references):
    import importlib.util

    import httpx

    spec = importlib.util.spec_from_file_location("serveutil", Path(__file__).parents[1] / "serve" / "serveutil.py")
    serveutil = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serveutil)
    LiveServer, free_port = serveutil.LiveServer, serveutil.free_port

    from aigckit.serve.app import create_app
    from aigckit.serve.models import Registry

    with pytest.raises(AigcError, match="not a LoRA adapter folder"):
        Registry([f"tiny={tiny_llama_dir}"], adapters=[f"a={tiny_llama_dir}"])
    with pytest.raises(AigcError, match="not a served text model"):
        Registry([f"tiny={tiny_llama_dir}"], adapters=[f"other:a={adapters['a']}"])
    reg = Registry([f"tiny={tiny_llama_dir}"], adapters=[f"a={adapters['a']}", f"tiny:b={adapters['b']}"])
    srv = LiveServer(create_app(reg), free_port()).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
            assert set(cards) == {"tiny", "tiny:a", "tiny:b"}
            assert cards["tiny:a"]["parent"] == "tiny" and cards["tiny:b"]["adapter"] == "b"

            def complete(model, prompt):
                r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 10,
                                                    "temperature": 0, "logprobs": 0})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            jobs = [(m, i) for _ in range(2) for m in ("tiny", "tiny:a", "tiny:b") for i in range(len(PROMPTS))]
            with cf.ThreadPoolExecutor(len(jobs)) as pool:
                texts = list(pool.map(lambda j: complete(j[0], PROMPTS[j[1]]), jobs))
            lm = load_lm(tiny_llama_dir)
            for (m, i), text in zip(jobs, texts):
                name = None if m == "tiny" else m.split(":")[1]
                assert text.split() == lm.tokenizer.decode(references[name][i]).split(), (m, i)
            r = c.post("/v1/completions", json={"model": "tiny:zzz", "prompt": "w1", "max_tokens": 2})
            assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    finally:
        srv.stop()


def test_gpt2_layout(tiny_gpt2_dir, tmp_path):
    """GPT-2's unfused attention linears (c_attn covers the whole qkv) take the same path."""
    ad = _adapter(tiny_gpt2_dir, tmp_path / "g", "all-linear", 4, 3)
    lm = load_lm(tiny_gpt2_dir, adapters={"g": ad})
    merged = load_lm(tiny_gpt2_dir, adapter=ad)
    want = merged.generate(PROMPTS[1], GREEDY).token_ids
    assert want != lm.generate(PROMPTS[1], GREEDY).token_ids
    assert lm.with_adapter("g").generate(PROMPTS[1], GREEDY).token_ids == want
