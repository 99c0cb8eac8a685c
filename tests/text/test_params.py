"""GenerationParams as one validated value, the shared limit set, the memory estimate, the temperature floor, and the
TextModel protocol that LM and RemoteLM both satisfy."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from aigckit.errors import AigcError
from aigckit.text import sampling
from aigckit.text.lm import load_lm
from aigckit.text.params import LIMITS, MAX_NEW_TOKENS_DEFAULT, TEMPERATURE_FLOOR, GenerationParams
from aigckit.text.protocol import TextModel

PROMPT = [5, 17, 33, 9, 41]


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


def test_a_value_is_valid_frozen_and_overridable():
    p = GenerationParams(temperature=0, max_new_tokens=8, stop="x")
    assert p.stop == ("x",) and p.greedy
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0
    assert GenerationParams.make(p) is p  # no overrides: the value itself, not re-validated
    q = GenerationParams.make(p, seed=3, temperature=0.5)
    assert (q.seed, q.temperature, q.max_new_tokens) == (3, 0.5, 8) and p.seed is None
    with pytest.raises(AigcError, match="unknown generation parameter") as e:
        GenerationParams.make(p, tempreature=1)
    assert e.value.param == "tempreature"
    with pytest.raises(AigcError, match="params must be a GenerationParams"):
        GenerationParams.make({"temperature": 0})


@pytest.mark.parametrize("kw, param, msg", [
    (dict(num_beams=1000), "num_beams", f"num_beams must be <= {LIMITS.num_beams}"),
    (dict(num_return_sequences=100000), "num_return_sequences", f"<= {LIMITS.num_return_sequences}"),
    (dict(temperature=math.inf), "temperature", "finite"),
    (dict(temperature=math.nan), "temperature", "temperature must be >= 0"),
    (dict(length_penalty=math.nan), "length_penalty", "finite"),
    (dict(length_penalty=math.inf), "length_penalty", "finite"),
    (dict(seed=-1), "seed", "seed must be >= 0"),
    (dict(seed=2**63), "seed", "seed must be <="),
    (dict(no_repeat_ngram_size=10**6), "no_repeat_ngram_size", "<= 64"),
    (dict(repetition_penalty=1e-40), "repetition_penalty", "repetition_penalty must be in [0.01, 10]"),
    (dict(num_beams=2.5), "num_beams", "must be an integer"),
    (dict(max_new_tokens=True), "max_new_tokens", "must be an integer"),
    (dict(stop=["a"] * 17), "stop", "at most 16 stop strings"),
    (dict(stop=["x" * 300]), "stop", "at most 256 characters"),
    (dict(early_stopping=1), "early_stopping", "early_stopping"),
    (dict(logprobs="yes"), "logprobs", "true or false"),
])
def test_limits_are_one_set_with_the_param_named(kw, param, msg):
    with pytest.raises(AigcError, match=msg.replace("[", r"\[").replace("(", r"\(")) as e:
        GenerationParams(**kw)
    assert e.value.param == param


def test_parameters_are_validated_once_not_per_step(lm, monkeypatch):
    calls = []
    real = GenerationParams.validate
    monkeypatch.setattr(GenerationParams, "validate", lambda self: calls.append(1) or real(self))
    p = GenerationParams(temperature=0.8, seed=1, max_new_tokens=20, ignore_eos=True)
    calls.clear()
    res = lm.generate(PROMPT, p)
    assert len(res.token_ids) == 20 and calls == []  # the value is passed through as it is
    lm.generate(PROMPT, p, seed=2)
    assert calls == [1]  # overrides: one new value, validated once
    assert lm.generate(PROMPT, p).token_ids == lm.generate(PROMPT, temperature=0.8, seed=1, max_new_tokens=20,
                                                           ignore_eos=True).token_ids


def test_tiny_temperatures_decode_greedily(lm):
    """logits / 1e-40 overflow float32 (softmax of inf is NaN): below the floor sampling is its t -> 0 limit."""
    greedy = lm.generate(PROMPT, temperature=0, max_new_tokens=12, ignore_eos=True).token_ids
    for t in (1e-45, 1e-40, 1e-20, TEMPERATURE_FLOOR / 2):
        assert lm.generate(PROMPT, temperature=t, seed=0, max_new_tokens=12, ignore_eos=True).token_ids == greedy
    logits = torch.randn(3, 50) * 30
    assert torch.equal(sampling.sample(logits, temperature=1e-40), logits.argmax(-1))
    # at and just above the floor the scaled logits stay finite: sampling works
    out = sampling.sample(logits, temperature=TEMPERATURE_FLOOR, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, logits.argmax(-1))


def test_memory_estimate_refuses_before_allocating(lm, monkeypatch):
    monkeypatch.setenv("AIGC_MAX_MEMORY_GB", "0.0001")  # 100 KiB
    with pytest.raises(AigcError, match=r"more than the memory limit of 0\.00 GiB \(AIGC_MAX_MEMORY_GB\)") as e:
        lm.generate(PROMPT, num_return_sequences=64, max_new_tokens=100)
    assert e.value.param == "num_return_sequences"
    with pytest.raises(AigcError, match="memory limit") as e:
        lm.generate(PROMPT, num_beams=32, max_new_tokens=100)
    assert e.value.param == "num_beams"
    monkeypatch.setenv("AIGC_MAX_MEMORY_GB", "1")
    assert len(lm.generate(PROMPT, num_beams=4, max_new_tokens=3).sequences) == 1


def test_prompt_errors_name_the_param(lm):
    with pytest.raises(AigcError, match="context window") as e:
        lm.generate([5] * 200, max_new_tokens=4)
    assert e.value.param == "prompt"
    with pytest.raises(AigcError, match=r"token ids must be integers in \[0, 97\)") as e:
        lm.generate([5, -1], max_new_tokens=2)
    assert e.value.param == "prompt"
    with pytest.raises(AigcError, match="max_length") as e:
        lm.generate(PROMPT, max_length=3)
    assert e.value.param == "max_length"


def test_lm_and_remote_lm_are_text_models(lm):
    from aigckit.text.remote import RemoteLM

    remote = RemoteLM("x", base_url="http://127.0.0.1:9/v1", api_key="k", max_retries=0)
    assert isinstance(lm, TextModel) and isinstance(remote, TextModel)
    assert remote._request(GenerationParams(), chat=False)["max_tokens"] == MAX_NEW_TOKENS_DEFAULT
    with pytest.raises(AigcError, match="top_p"):
        remote.stream("w5", top_p=2.0)  # validated before any request, as the local model does


def test_remote_does_not_import_the_local_stack():
    """remote.py -> protocol/params only: no lm.py <-> remote.py cycle, and no torch for a remote model."""
    code = ("import sys, aigckit.text.remote; "
            "bad = [m for m in ('aigckit.text.lm', 'aigckit.text.engine', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
