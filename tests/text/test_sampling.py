"""Sampling functions: masks (top-k with ties, top-p, min-p), temperature, repetition penalty, n-gram bans, seeds;
checked against transformers' logits warpers where it has them."""

from __future__ import annotations

import pytest
import torch

from aigckit.text import sampling

NEG = float("-inf")


def test_top_k_keeps_ties_with_the_kth_value():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.5]])
    out = sampling.top_k_filter(logits, 2)
    # 3.0 and both 2.0s survive (tie with the 2nd largest), the rest are masked
    assert out.tolist() == [[NEG, 3.0, 2.0, 2.0, NEG]]
    assert torch.equal(sampling.top_k_filter(logits, 0), logits)
    assert torch.equal(sampling.top_k_filter(logits, 10), logits)


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(sampling.top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(sampling.top_p_filter(logits, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(sampling.top_p_filter(logits, 0.01))  # never empty: the top token stays
    assert kept.tolist() == [[True, False, False, False]]


def test_min_p_relative_to_top_probability():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    kept = torch.isfinite(sampling.min_p_filter(probs.log(), 0.2))  # threshold 0.12
    assert kept.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.7), dict(min_p=0.05), dict(top_k=7, top_p=0.9)])
def test_warpers_match_transformers(kw):
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    logits[0, :6] = 2.0  # ties
    ref = TemperatureLogitsWarper(0.8)(None, logits.clone())
    if "top_k" in kw:
        ref = TopKLogitsWarper(kw["top_k"])(None, ref)
    if "top_p" in kw:
        ref = TopPLogitsWarper(kw["top_p"])(None, ref)
    if "min_p" in kw:
        ref = MinPLogitsWarper(kw["min_p"])(None, ref)
    ours = sampling.warp(logits.clone(), temperature=0.8, **kw)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    torch.testing.assert_close(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


def test_sample_is_greedy_at_temperature_zero_and_seeded_otherwise():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampling.sample(logits, temperature=0), logits.argmax(-1))
    a = sampling.sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = sampling.sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    draws = {tuple(sampling.sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(s)).tolist())
             for s in range(10)}
    assert len(draws) > 1
    masked = sampling.sample(logits, temperature=5.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masked, logits.argmax(-1))


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    scores = torch.tensor([[1.0, -1.0, 2.0, -3.0, 0.5]])
    ids = torch.tensor([[0, 1, 1, 3]])
    seen = torch.zeros_like(scores, dtype=torch.bool)
    seen[0, ids[0]] = True
    ref = RepetitionPenaltyLogitsProcessor(1.5)(ids, scores.clone())
    assert torch.equal(sampling.apply_repetition_penalty(scores, seen, 1.5), ref)


def test_no_repeat_ngram_bans_completing_tokens():
    seq = [1, 2, 3, 1, 2]
    assert sorted(sampling.banned_ngram_tokens(seq, 3)) == [3]  # "1 2" was followed by 3
    assert sorted(sampling.banned_ngram_tokens(seq, 2)) == [3]  # "2" was followed by 3
    assert sampling.banned_ngram_tokens([1], 3) == []


@pytest.mark.parametrize("kw, msg", [(dict(temperature=-0.1), "temperature"), (dict(top_p=1.5), "top_p"),
                                     (dict(top_k=-1), "top_k"), (dict(min_p=-0.1), "min_p"),
                                     (dict(temperature=float("nan")), "temperature")])
def test_validation(kw, msg):
    with pytest.raises(ValueError, match=msg) as e:  # sample() trusts its arguments; GenerationParams validates
        sampling.validate(**kw)
    assert e.value.param == msg
