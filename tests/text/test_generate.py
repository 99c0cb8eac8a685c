"""Greedy and beam outputs are token-identical to transformers' generate; sampling, streaming, stops, validation."""

from __future__ import annotations

import pytest
import torch
from lmutil import hf_model

from aigckit.errors import AigcError
from aigckit.text.lm import load_lm

PROMPTS = [[5, 17, 33, 9, 41], [70, 3, 12], [8, 8, 8, 8, 8, 8, 8, 8, 60]]


def _hf_generate(ref, prompt, eos, **kw):
    out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                       eos_token_id=eos, pad_token_id=0, **kw)
    rows = []
    for seq in out:
        gen = seq[len(prompt):].tolist()
        if eos in gen:  # cut at EOS; our token_ids exclude it
            gen = gen[:gen.index(eos)]
        rows.append(gen)
    return rows


def _frequent_token(lm, prompt):
    """A token the model actually emits early, used as EOS so that EOS handling is exercised."""
    return lm.generate(prompt, temperature=0, max_new_tokens=6, ignore_eos=True).token_ids[3]


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_llama_tied_dir", "tiny_gpt2_dir"])
def pair(request):
    path = request.getfixturevalue(request.param)
    return load_lm(str(path)), hf_model(path)


def test_greedy_matches_transformers(pair):
    lm, ref = pair
    for prompt in PROMPTS:
        want = _hf_generate(ref, prompt, eos=lm.config.eos_ids[0], do_sample=False, max_new_tokens=24)[0]
        got = lm.generate(prompt, temperature=0, max_new_tokens=24).token_ids
        assert got == want


def test_greedy_stops_at_eos_like_transformers(pair):
    lm, ref = pair
    prompt = PROMPTS[0]
    eos = _frequent_token(lm, prompt)
    lm.tokenizer.eos_token_ids, saved = {eos}, lm.tokenizer.eos_token_ids
    try:
        res = lm.generate(prompt, temperature=0, max_new_tokens=24)
    finally:
        lm.tokenizer.eos_token_ids = saved
    assert res.finish_reason == "stop"
    assert res.token_ids == _hf_generate(ref, prompt, eos=eos, do_sample=False, max_new_tokens=24)[0]


def test_ragged_batch_equals_single_prompts(pair):
    lm, _ = pair
    batch = lm.generate_batch(PROMPTS, temperature=0, max_new_tokens=16)
    for prompt, res in zip(PROMPTS, batch):
        assert res.token_ids == lm.generate(prompt, temperature=0, max_new_tokens=16).token_ids


BEAM_CASES = [
    dict(num_beams=2),
    dict(num_beams=4, num_return_sequences=3),
    dict(num_beams=3, length_penalty=0.5, early_stopping=True),
    dict(num_beams=4, length_penalty=2.0, early_stopping="never", num_return_sequences=2),
    dict(num_beams=3, no_repeat_ngram_size=2, num_return_sequences=3),
    dict(num_beams=5, repetition_penalty=1.3, length_penalty=-1.0),
]


@pytest.mark.parametrize("case", BEAM_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("with_eos", [False, True])
def test_beam_matches_transformers(pair, case, with_eos):
    lm, ref = pair
    for prompt in PROMPTS[:2]:
        eos = _frequent_token(lm, prompt) if with_eos else lm.config.eos_ids[0]
        saved = lm.tokenizer.eos_token_ids
        lm.tokenizer.eos_token_ids = {eos}
        try:
            res = lm.generate(prompt, temperature=0, max_new_tokens=12, **case)
        finally:
            lm.tokenizer.eos_token_ids = saved
        hf_kw = {k: v for k, v in case.items()}
        want = _hf_generate(ref, prompt, eos=eos, do_sample=False, max_new_tokens=12, **hf_kw)
        got = [s.token_ids for s in res.sequences]
        assert got == want, (case, prompt)
        scores = [s.score for s in res.sequences]
        assert scores == sorted(scores, reverse=True)


def test_sampling_is_reproducible_with_seed(tiny_llama_dir):
    lm = load_lm(str(tiny_llama_dir))
    a = lm.generate(PROMPTS[0], temperature=1.0, top_p=0.9, seed=123, max_new_tokens=20).token_ids
    b = lm.generate(PROMPTS[0], temperature=1.0, top_p=0.9, seed=123, max_new_tokens=20).token_ids
    c = lm.generate(PROMPTS[0], temperature=1.0, top_p=0.9, seed=124, max_new_tokens=20).token_ids
    assert a == b and a != c
    greedy = lm.generate(PROMPTS[0], temperature=0, max_new_tokens=20).token_ids
    assert lm.generate(PROMPTS[0], temperature=1.5, top_k=1, seed=5, max_new_tokens=20).token_ids == greedy


def test_num_return_sequences_sampling_gives_distinct_rows(tiny_llama_dir):
    lm = load_lm(str(tiny_llama_dir))
    res = lm.generate(PROMPTS[0], temperature=1.0, seed=0, max_new_tokens=10, num_return_sequences=3, logprobs=True)
    assert len(res.sequences) == 3
    assert len({tuple(s.token_ids) for s in res.sequences}) > 1
    for s in res.sequences:
        assert len(s.logprobs) == len(s.token_ids) and all(lp <= 0 for lp in s.logprobs)


def test_logprobs_are_the_model_distribution(tiny_llama_dir):
    lm = load_lm(str(tiny_llama_dir))
    res = lm.generate(PROMPTS[1], temperature=0, max_new_tokens=3, logprobs=True)
    ids = PROMPTS[1] + res.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids])).float(), -1)[0]
    want = [float(logp[len(PROMPTS[1]) - 1 + i, t]) for i, t in enumerate(res.token_ids)]
    assert res.sequences[0].logprobs == pytest.approx(want, abs=1e-4)


def test_stream_concatenates_to_generate_text(tiny_gpt2_dir):
    lm = load_lm(str(tiny_gpt2_dir))
    full = lm.generate("w5 w6", temperature=0.8, seed=3, max_new_tokens=15)
    assert "".join(lm.stream("w5 w6", temperature=0.8, seed=3, max_new_tokens=15)) == full.text


def test_stop_string_cuts_text(tiny_llama_dir):
    lm = load_lm(str(tiny_llama_dir))
    full = lm.generate(PROMPTS[0], temperature=0, max_new_tokens=12)
    words = full.text.split()
    stop = " " + words[4]
    res = lm.generate(PROMPTS[0], temperature=0, max_new_tokens=12, stop=[stop])
    assert res.finish_reason == "stop"
    assert res.text == full.text[: full.text.index(stop)]
    streamed = "".join(lm.stream(PROMPTS[0], temperature=0, max_new_tokens=12, stop=[stop]))
    assert streamed == res.text


def test_max_length_counts_prompt(tiny_llama_dir):
    lm = load_lm(str(tiny_llama_dir))
    res = lm.generate(PROMPTS[0], temperature=0, max_length=len(PROMPTS[0]) + 4)
    assert len(res.token_ids) == 4 and res.finish_reason == "length"


@pytest.mark.parametrize("kw, msg", [
    (dict(top_p=2.0), "top_p must be in"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(num_beams=0), "num_beams must be >= 1"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(bogus=1), "unknown generation parameter"),
])
def test_bad_parameters_raise(tiny_llama_dir, kw, msg):
    lm = load_lm(str(tiny_llama_dir))
    with pytest.raises(ValueError, match=msg):
        lm.generate(PROMPTS[0], **kw)


def test_prompt_longer_than_context_raises(tiny_llama_dir):
    lm = load_lm(str(tiny_llama_dir))
    with pytest.raises(AigcError, match="context window"):
        lm.generate([5] * 200, max_new_tokens=4)
    with pytest.raises(AigcError, match="empty prompt"):
        lm.generate([], max_new_tokens=4)
