"""Logits processors act in every decoding mode (greedy, sampling, beam search, scheduler rows and beams), keep
per-sequence state, fork with beams, and a processor that allows nothing fails its request alone."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from aigckit.errors import AigcError, GenerationError
from aigckit.text.lm import load_lm
from aigckit.text.params import GenerationParams
from aigckit.text.scheduler import Scheduler


@dataclass(frozen=True)
class Cycle:
    """Allows exactly one token per step: ``tokens[k % len(tokens)]`` at generated position k (a stateful rule)."""

    tokens: tuple[int, ...]

    def start(self, prompt, tokenizer, vocab_size):
        return _CycleState(self.tokens, 0, [])


@dataclass
class _CycleState:
    tokens: tuple[int, ...]
    k: int
    log: list

    def process(self, seq, scores):
        allowed = self.tokens[self.k % len(self.tokens)]
        out = torch.full_like(scores, float("-inf"))
        out[allowed] = scores[allowed]
        return out

    def advance(self, token):
        assert token == self.tokens[self.k % len(self.tokens)], "advance got a token the rule did not allow"
        self.log.append(token)
        self.k += 1

    def fork(self):
        return _CycleState(self.tokens, self.k, list(self.log))


@dataclass(frozen=True)
class Nothing:
    def start(self, prompt, tokenizer, vocab_size):
        return self

    def process(self, seq, scores):
        return torch.full_like(scores, float("-inf"))

    def advance(self, token):
        pass

    def fork(self):
        return self


WANT = [5, 6, 7, 5, 6, 7, 5, 6]


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, seed=3), dict(num_beams=3, temperature=0),
                                dict(num_return_sequences=2, temperature=0.8, seed=1)])
def test_processor_steers_every_mode(lm, kw):
    res = lm.generate([3, 4, 9], processors=(Cycle((5, 6, 7)),), max_new_tokens=8, ignore_eos=True, **kw)
    for seq in res.sequences:
        assert seq.token_ids == WANT


def test_processor_through_scheduler_rows_and_beams(lm):
    sched = Scheduler(lm, max_batch=8)
    try:
        plain = GenerationParams(temperature=0, max_new_tokens=8, ignore_eos=True)
        ruled = GenerationParams.make(plain, processors=(Cycle((5, 6, 7)),))
        handles = [sched.submit([3, 4, 9], ruled), sched.submit([3, 4, 9], plain)]
        outs = [[ev.token_id for ev in h if ev.token_id is not None] for h in handles]
        assert outs[0] == WANT
        assert outs[1] == lm.generate([3, 4, 9], plain).token_ids  # the other row is untouched
        beams = sched.generate_beam([3, 4, 9], GenerationParams.make(ruled, num_beams=3))
        assert beams[0].token_ids == WANT
    finally:
        sched.close()


def test_processor_that_allows_nothing_fails_alone(lm):
    with pytest.raises(GenerationError, match="allow no next token"):
        lm.generate([3, 4, 9], processors=(Nothing(),), max_new_tokens=4, temperature=0)
    sched = Scheduler(lm, max_batch=8)
    try:
        good = GenerationParams(temperature=0, max_new_tokens=6, ignore_eos=True)
        bad = sched.submit([3, 4, 9], GenerationParams.make(good, processors=(Nothing(),)))
        ok = sched.submit([3, 4, 9], good)
        with pytest.raises(GenerationError):
            list(bad)
        assert [ev.token_id for ev in ok if ev.token_id is not None] == lm.generate([3, 4, 9], good).token_ids
    finally:
        sched.close()


def test_processors_are_validated():
    with pytest.raises(AigcError) as e:
        GenerationParams(processors=(object(),))
    assert e.value.param == "processors"
