"""Continuous batching: concurrent requests give the same tokens as running each alone."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from aigckit.text.engine import GenerationParams
from aigckit.text.lm import load_lm
from aigckit.text.scheduler import QueueFull, Scheduler

PROMPTS = [[5, 17, 33, 9, 41], [70, 3, 12], [8, 8, 8, 8, 8, 8, 8, 8, 60], [44], [90, 91, 92, 93]]


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


def collect(handle):
    ids, text, reasons = {}, {}, {}
    for ev in handle:
        if ev.token_id is not None:
            ids.setdefault(ev.row, []).append(ev.token_id)
        text[ev.row] = text.get(ev.row, "") + ev.text
        if ev.finish_reason:
            reasons[ev.row] = ev.finish_reason
    return ids, text, reasons


def test_concurrent_requests_match_solo_generation(lm):
    sched = Scheduler(lm, max_batch=3, max_queue=16)  # fewer slots than requests: some wait, then join
    try:
        budgets = [9, 4, 12, 7, 5]
        params = [GenerationParams(temperature=0, max_new_tokens=b) for b in budgets]
        results = [None] * len(PROMPTS)

        def worker(i):
            results[i] = collect(sched.submit(PROMPTS[i], params[i]))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for i, p in enumerate(PROMPTS):
            solo = lm.generate(p, temperature=0, max_new_tokens=budgets[i])
            ids, text, reasons = results[i]
            assert ids[0] == solo.token_ids, i
            assert text[0] == solo.text and reasons[0] == solo.finish_reason
        assert sched.active == 0 and sched.queue_depth == 0
    finally:
        sched.close()


def test_sampling_with_seed_and_n_sequences_matches_static_batch(lm):
    sched = Scheduler(lm, max_batch=4)
    try:
        p = GenerationParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=8, num_return_sequences=3)
        ids, _, _ = collect(sched.submit(PROMPTS[0], p))
        res = lm.generate(PROMPTS[0], temperature=1.0, top_p=0.9, seed=7, max_new_tokens=8, num_return_sequences=3)
        assert [ids[i] for i in range(3)] == [s.token_ids for s in res.sequences]
    finally:
        sched.close()


def test_queue_full_and_cancel(lm):
    sched = Scheduler(lm, max_batch=1, max_queue=1)
    try:
        long = GenerationParams(temperature=0, max_new_tokens=60)
        h1 = sched.submit(PROMPTS[0], long)
        it = iter(h1)
        next(it)  # h1 is running
        h2 = sched.submit(PROMPTS[1], long)  # waits in the queue
        with pytest.raises(QueueFull):
            sched.submit(PROMPTS[2], long)
        h1.cancel()
        rest = list(it)
        assert rest[-1].finish_reason == "cancelled"
        ids, _, reasons = collect(h2)
        assert reasons[0] == "length" and len(ids[0]) == 60
    finally:
        sched.close()


def test_beam_search_shares_the_batched_step(lm):
    """Beam requests run in the same decode steps as sampled ones and give lm.generate's beams exactly."""
    sched = Scheduler(lm, max_batch=12, max_queue=16)
    try:
        beam_cases = [dict(num_beams=3, num_return_sequences=2, max_new_tokens=9),
                      dict(num_beams=4, length_penalty=0.5, early_stopping=True, max_new_tokens=7),
                      dict(num_beams=2, no_repeat_ngram_size=2, max_new_tokens=10)]
        out = {}

        def run_beam(i):
            out[("beam", i)] = sched.generate_beam(PROMPTS[i], GenerationParams(temperature=0, **beam_cases[i]))

        def run_greedy(i):
            out[("greedy", i)] = collect(sched.submit(PROMPTS[i], GenerationParams(temperature=0, max_new_tokens=8)))

        threads = [threading.Thread(target=run_beam, args=(i,)) for i in range(3)]
        threads += [threading.Thread(target=run_greedy, args=(i,)) for i in (3, 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for i, case in enumerate(beam_cases):
            want = lm.generate(PROMPTS[i], temperature=0, **case).sequences
            got = out[("beam", i)]
            assert [s.token_ids for s in got] == [s.token_ids for s in want], i
            assert [s.text for s in got] == [s.text for s in want]
            assert [s.score for s in got] == pytest.approx([s.score for s in want], abs=1e-5)
        for i in (3, 4):
            assert out[("greedy", i)][0][0] == lm.generate(PROMPTS[i], temperature=0, max_new_tokens=8).token_ids
        assert sched.active == 0
    finally:
        sched.close()


def test_rejects_bad_params(lm):
    sched = Scheduler(lm, max_batch=2)
    try:
        with pytest.raises(ValueError, match="num_beams must be <= 2"):
            sched.submit(PROMPTS[0], GenerationParams(num_beams=3))
        with pytest.raises(ValueError, match="top_p"):  # an invalid value cannot be made ...
            GenerationParams(temperature=0, top_p=3.0)
        with pytest.raises(dataclasses.FrozenInstanceError):  # ... nor a valid one made invalid
            GenerationParams(temperature=0).top_p = 3.0
    finally:
        sched.close()


def test_requests_waiting_together_are_prefilled_in_one_forward(lm):
    sched = Scheduler(lm, max_batch=8, max_queue=16)
    sizes = []
    real = sched._prefill
    sched._prefill = lambda reqs: sizes.append(len(reqs)) or real(reqs)
    try:
        greedy = GenerationParams(temperature=0, max_new_tokens=6)
        beams = GenerationParams(num_beams=3, max_new_tokens=5, ignore_eos=True)
        with sched.lock:  # the worker cannot admit until all four are queued
            handles = [sched.submit(p, greedy) for p in PROMPTS[:3]]
            beam_handle = sched.submit(PROMPTS[3], beams)
        got = [collect(h)[0][0] for h in handles]
        beam_ids, _, _ = collect(beam_handle)
    finally:
        sched.close()
    assert sizes == [4]  # one prefill for prompts of lengths 5, 3, 9 and 1 (right-padded)
    for p, ids in zip(PROMPTS, got):
        assert ids == lm.generate(p, temperature=0, max_new_tokens=6).token_ids
    solo = lm.generate(PROMPTS[3], num_beams=3, max_new_tokens=5, ignore_eos=True)
    assert beam_ids[0] == solo.token_ids


def test_prefill_rounds_are_capped_by_a_token_budget(lm, monkeypatch):
    from aigckit.text import scheduler as scheduler_mod

    monkeypatch.setattr(scheduler_mod, "PREFILL_TOKENS", 8)
    sched = Scheduler(lm, max_batch=8, max_queue=16)
    sizes = []
    real = sched._prefill
    sched._prefill = lambda reqs: sizes.append([len(r.prompt) for r in reqs]) or real(reqs)
    try:
        greedy = GenerationParams(temperature=0, max_new_tokens=4)
        with sched.lock:
            handles = [sched.submit(p, greedy) for p in PROMPTS[:4]]  # prompt lengths 5, 3, 9, 1
        got = [collect(h)[0][0] for h in handles]
    finally:
        sched.close()
    assert sizes == [[5, 3], [9], [1]]  # a round always takes one request, even one over the budget
    for p, ids in zip(PROMPTS, got):
        assert ids == lm.generate(p, temperature=0, max_new_tokens=4).token_ids


def collect_in_time(handle, timeout: float = 60):
    """collect(), but a request that never ends fails the test instead of hanging it."""
    box = {}

    def run():
        try:
            box["value"] = collect(handle)
        except BaseException as e:  # re-raised below, on the test's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the request never finished"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _four_together(sched, params):
    """Submit four requests while the worker is held, so they are prefilled and decoded as one batch."""
    with sched.lock:
        return [sched.submit(PROMPTS[i], p) for i, p in enumerate(params)]


def _solo(lm, i, p):
    return lm.generate(PROMPTS[i], p).token_ids


def test_a_tiny_temperature_does_not_poison_the_batch(lm):
    """temperature 1e-40 used to overflow the scaled logits; sampling raised and every request in the batch
    failed. Now it decodes greedily and the others are untouched."""
    sched = Scheduler(lm, max_batch=8)
    try:
        params = [GenerationParams(temperature=0.9, seed=i, max_new_tokens=10, ignore_eos=True) for i in range(4)]
        params[1] = GenerationParams(temperature=1e-40, seed=1, max_new_tokens=10, ignore_eos=True)
        got = [collect_in_time(h)[0][0] for h in _four_together(sched, params)]
    finally:
        sched.close()
    for i, p in enumerate(params):
        assert got[i] == _solo(lm, i, p), i
    assert got[1] == lm.generate(PROMPTS[1], temperature=0, max_new_tokens=10, ignore_eos=True).token_ids


def test_an_error_in_one_request_ends_that_request_alone(lm, monkeypatch):
    """A poisoned request in a batch of four: it gets an error that says what happened, the other three finish
    with exactly the tokens they get alone, and the scheduler goes on."""
    from aigckit.errors import GenerationError
    from aigckit.text import engine

    real = engine.RowState.process

    def process(self, scores):
        if self.params.seed == 666 and self.n_gen == 3:
            raise RuntimeError("probability tensor contains inf, nan or element < 0")
        return real(self, scores)

    monkeypatch.setattr(engine.RowState, "process", process)
    sched = Scheduler(lm, max_batch=8)
    try:
        params = [GenerationParams(temperature=0, max_new_tokens=9),
                  GenerationParams(temperature=0.8, seed=666, no_repeat_ngram_size=2, max_new_tokens=9),
                  GenerationParams(temperature=1.0, top_p=0.9, seed=4, max_new_tokens=12, num_return_sequences=2),
                  GenerationParams(temperature=0, max_new_tokens=7, repetition_penalty=1.3)]
        handles = _four_together(sched, params)
        results = {}
        for i, h in enumerate(handles):
            try:
                results[i] = collect_in_time(h)
            except GenerationError as e:
                results[i] = e
        assert isinstance(results[1], GenerationError)
        assert "RuntimeError: probability tensor contains inf" in str(results[1])
        for i in (0, 3):
            assert results[i][0][0] == _solo(lm, i, params[i]), i
        # n=2 in the scheduler: both rows equal the static batch with the same seed
        want = lm.generate(PROMPTS[2], params[2]).sequences
        assert [results[2][0][r] for r in range(2)] == [s.token_ids for s in want]
        assert sched.active == 0
        after = collect_in_time(sched.submit(PROMPTS[0], params[0]))[0][0]
        assert after == _solo(lm, 0, params[0])
    finally:
        sched.close()


def test_a_request_that_ends_at_its_first_token_leaves_slots_compact(lm):
    """Requests prefilled together: the first ends on its first token and frees its slot before the others took
    theirs; the batch used to lose track of a slot (and fail every request)."""
    sched = Scheduler(lm, max_batch=8)
    try:
        params = [GenerationParams(temperature=0, max_new_tokens=1), GenerationParams(temperature=0, max_new_tokens=6),
                  GenerationParams(temperature=0, max_new_tokens=1), GenerationParams(temperature=0, max_new_tokens=8)]
        got = [collect_in_time(h)[0][0] for h in _four_together(sched, params)]
    finally:
        sched.close()
    for i, p in enumerate(params):
        assert got[i] == _solo(lm, i, p), i


def test_queue_of_zero_is_refused(lm):
    with pytest.raises(ValueError, match="max_queue must be >= 1"):
        Scheduler(lm, max_queue=0)
