"""KGW watermark: integer seeding (same list on any thread count, numpy == Python ints), the exact binomial p-value
against exact rational arithmetic, the detector on hand-built token sequences, and the processor in every decoding
mode of the engine."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from aigckit.errors import AigcError
from aigckit.text.lm import load_lm
from aigckit.text.params import GenerationParams
from aigckit.text.scheduler import Scheduler
from aigckit.trust.detect import binom_sf, detect_ids, log_binom_sf, score_tokens, z_score
from aigckit.trust.watermark import Watermark, green_mask, is_green, key64

# ------------------------------------------------------------------------------------------------ seeding


@pytest.mark.parametrize("self_hash", [False, True])
def test_green_mask_equals_scalar_rule(self_hash):
    k = key64("secret")
    for ctx in ([5], [1, 2, 3, 4], [49151, 0]):
        mask = green_mask(k, ctx, 300, 0.25, self_hash)
        assert mask.tolist() == [is_green(k, ctx, v, 0.25, self_hash) for v in range(300)]


def test_green_fraction_is_gamma():
    k = key64("x")
    for gamma in (0.1, 0.25, 0.5):
        frac = np.mean([green_mask(k, [c], 4096, gamma, False).mean() for c in range(20)])
        assert abs(frac - gamma) < 0.01
    # different keys and contexts give different lists
    assert (green_mask(k, [1], 4096, 0.5, False) != green_mask(k, [2], 4096, 0.5, False)).mean() > 0.4
    assert (green_mask(k, [1], 4096, 0.5, False) != green_mask(key64("y"), [1], 4096, 0.5, False)).mean() > 0.4


_DIGEST = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from aigckit.trust.watermark import green_mask, key64
m = b"".join(green_mask(key64("k"), [7, 11, c], 49152, 0.25, sh).tobytes() for c in range(8) for sh in (0, 1))
print(hashlib.sha256(m).hexdigest())
"""


def test_same_list_on_any_thread_count():
    # this process runs tests on one thread; another one with three
    env = {**os.environ, "OMP_NUM_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", _DIGEST, "3"], env=env, capture_output=True, text=True, check=True)
    digests = {out.stdout.strip()}
    m = b"".join(green_mask(key64("k"), [7, 11, c], 49152, 0.25, sh).tobytes() for c in range(8) for sh in (0, 1))
    digests.add(hashlib.sha256(m).hexdigest())
    assert len(digests) == 1


def test_key_is_hidden_and_params_checked():
    assert "hunter2" not in repr(Watermark("hunter2"))
    for bad in (dict(gamma=0.0), dict(gamma=1.0), dict(delta=-1), dict(context_width=0), dict(context_width=99)):
        with pytest.raises(AigcError):
            Watermark("k", **bad)
    with pytest.raises(AigcError) as e:
        Watermark("")
    assert e.value.param == "watermark"


# ------------------------------------------------------------------------------------------------ p-value


def _exact_sf(k: int, n: int, p: Fraction) -> Fraction:
    return sum((Fraction(math.comb(n, i)) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1)), Fraction(0))


@pytest.mark.parametrize("n,p", [(10, Fraction(1, 2)), (50, Fraction(1, 4)), (200, Fraction(1, 4)),
                                 (333, Fraction(1, 10))])
def test_binomial_tail_matches_exact_rationals(n, p):
    for k in sorted({0, 1, n // 10, int(n * p), int(n * p) + 1, n // 2, (3 * n) // 4, n - 1, n}):
        want = _exact_sf(k, n, p)
        got = log_binom_sf(k, n, float(p))
        if want == 0:
            assert got == -math.inf
            continue
        # log of an exact rational: via numerator/denominator bit lengths, no float underflow
        lw = math.log(want.numerator) - math.log(want.denominator)
        assert abs(got - lw) < 1e-9 * max(1.0, abs(lw)), (k, n, got, lw)


def test_binomial_tail_known_values():
    assert binom_sf(8, 10, 0.5) == pytest.approx(56 / 1024, rel=1e-12)
    assert log_binom_sf(200, 200, 0.25) == pytest.approx(200 * math.log(0.25), rel=1e-12)
    assert binom_sf(0, 7, 0.3) == 1.0 and binom_sf(8, 7, 0.3) == 0.0
    # far tails stay finite in log space where the float underflows
    assert log_binom_sf(4000, 5000, 0.25) < -2000
    # the normal approximation is optimistic in the far tail; the exact tail is larger
    z = z_score(120, 200, 0.25)
    assert binom_sf(120, 200, 0.25) > 0.5 * math.erfc(z / math.sqrt(2))


# ------------------------------------------------------------------------------------------------ detector


def _make_green_sequence(wm: Watermark, n: int, green: bool, start=(3,)) -> list[int]:
    """Tokens chosen by hand: each the smallest id that is green (or red) after the previous h tokens."""
    ids = list(start)
    k = wm.k
    while len(ids) < n:
        ctx = ids[len(ids) - wm.context_width:]
        m = green_mask(k, ctx, 500, wm.gamma, wm.self_hash)
        cands = np.flatnonzero(m == green)
        ids.append(int(cands[len(ids) % len(cands)]))  # vary the choice so n-grams do not repeat
    return ids


@pytest.mark.parametrize("self_hash,h", [(False, 1), (True, 4)])
def test_detector_on_hand_built_sequences(self_hash, h):
    wm = Watermark("key", context_width=h, self_hash=self_hash)
    all_green = _make_green_sequence(wm, 60, True, start=tuple(range(3, 3 + h)))
    d = detect_ids(all_green, wm)
    assert d.n_scored == 60 - h and d.green == d.n_scored and d.watermarked
    assert d.p_value == pytest.approx(wm.gamma ** d.n_scored, rel=1e-9)
    red = _make_green_sequence(wm, 60, False, start=tuple(range(3, 3 + h)))
    d = detect_ids(red, wm)
    assert d.green == 0 and d.p_value == 1.0 and not d.watermarked
    # another key sees about gamma green
    other = detect_ids(all_green, Watermark("other", context_width=h, self_hash=self_hash))
    assert not other.watermarked


def test_repeated_ngrams_are_scored_once():
    wm = Watermark("key")
    seq = _make_green_sequence(wm, 12, True)
    looped = seq * 20  # the same green bigrams over and over
    d = detect_ids(looped, wm)
    d_all = detect_ids(looped, wm, ignore_repeated=False)
    assert d.n_scored <= 13 and d_all.n_scored == len(looped) - 1
    assert score_tokens(looped, wm)[len(seq) + 1] is None


def test_windowed_detection_finds_a_marked_part():
    wm = Watermark("key")
    rng = np.random.default_rng(0)
    human = [int(x) for x in rng.integers(0, 500, 400)]
    marked = _make_green_sequence(wm, 40, True, start=(human[-1],))[1:]
    mixed = human + marked + [int(x) for x in rng.integers(0, 500, 400)]
    whole = detect_ids(mixed, wm, fpr=1e-6)
    win = detect_ids(mixed, wm, fpr=1e-6, window=40, stride=10)
    assert whole.p_value > win.best_window.p_value
    assert win.watermarked and win.best_window_p_corrected <= 1e-6
    assert 390 <= win.best_window.start <= 420
    plain = detect_ids(human, wm, fpr=1e-6, window=40, stride=10)
    assert not plain.watermarked
    with pytest.raises(AigcError):
        detect_ids(mixed, wm, fpr=0)


# ------------------------------------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


STRONG = Watermark("engine-key", gamma=0.25, delta=30.0)


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, seed=3), dict(num_beams=3, temperature=0),
                                dict(num_return_sequences=2, temperature=0.9, seed=1)])
def test_processor_marks_every_mode(lm, kw):
    prompt = [3, 4, 9]
    res = lm.generate(prompt, watermark=STRONG, max_new_tokens=24, ignore_eos=True, **kw)
    for seq in res.sequences:
        d = detect_ids(prompt[-1:] + seq.token_ids, STRONG, ignore_repeated=False)
        assert d.green == d.n_scored == 24
    plain = lm.generate(prompt, max_new_tokens=24, ignore_eos=True, **kw)
    d = detect_ids(prompt[-1:] + plain.sequences[0].token_ids, STRONG, ignore_repeated=False)
    assert d.green < 20


def test_processor_in_scheduler_rows(lm):
    sched = Scheduler(lm, max_batch=4)
    try:
        p = GenerationParams(temperature=0.8, seed=2, max_new_tokens=16, ignore_eos=True, processors=(STRONG,))
        handles = [sched.submit([5, 6], p), sched.submit([7], p)]
        for prompt, h in zip(([5, 6], [7]), handles):
            toks = [ev.token_id for ev in h if ev.token_id is not None]
            assert detect_ids(prompt[-1:] + toks, STRONG, ignore_repeated=False).green == 16
    finally:
        sched.close()


def test_watermark_argument_checked(lm):
    with pytest.raises(AigcError) as e:
        lm.generate([3], watermark="a key string", max_new_tokens=2)
    assert e.value.param == "watermark"


def test_entropy_gate():
    """The bias goes only where the next-token entropy reaches min_entropy; min_entropy=0 marks every step."""
    import torch

    from aigckit.trust.watermark import entropy

    V = 1000
    flat = torch.zeros(V)
    assert entropy(flat) == pytest.approx(math.log(V), rel=1e-6)
    sure = torch.full((V,), -30.0)
    sure[7] = 10.0
    assert entropy(sure) < 1e-6
    masked = torch.full((V,), float("-inf"))
    masked[:4] = 0.0
    assert entropy(masked) == pytest.approx(math.log(4), rel=1e-6)  # -inf scores carry no mass, no NaN
    ctx = [5]
    green = torch.from_numpy(green_mask(key64("g"), ctx, V, 0.5, False))
    for gate, scores, marked in ((1.0, flat, True), (1.0, sure, False), (0.0, sure, True),
                                 (math.log(V) + 0.01, flat, False)):
        wm = Watermark("g", gamma=0.5, delta=2.0, min_entropy=gate)
        out = wm.start([1], None, V).process(ctx, scores.clone())
        want = scores + 2.0 * green if marked else scores
        assert torch.equal(out, want), (gate, marked)
    for bad in (-0.1, 21.0, True, "1"):
        with pytest.raises(AigcError) as e:
            Watermark("g", min_entropy=bad)
        assert e.value.param == "min_entropy"


def test_entropy_gated_scoring_on_hand_built_sequences():
    """With entropies, low-entropy tokens are not scored: a text whose uncertain steps are green and whose sure
    steps are red is diluted when every token is scored and clear-cut when only the gated steps are."""
    wm = Watermark("key", min_entropy=2.0)
    green_seq = _make_green_sequence(wm, 80, True)
    ids, ents = [green_seq[0]], [None]
    for i in range(1, 80):  # odd positions: a sure step with a red token; even: an uncertain one with a green token
        ctx = ids[-1:]
        m = green_mask(wm.k, ctx, 500, wm.gamma, False)
        cands = np.flatnonzero(m == (i % 2 == 0))
        ids.append(int(cands[i % len(cands)]))
        ents.append(3.0 if i % 2 == 0 else 0.5)
    plain = detect_ids(ids, wm)
    gated = detect_ids(ids, wm, entropies=ents)
    assert plain.n_scored == 79 and plain.green == 39 and not plain.watermarked
    assert gated.n_scored == 39 and gated.green == 39 and gated.watermarked
    assert gated.params["entropy_gate"] == 2.0 and plain.params["entropy_gate"] is None
    assert detect_ids(ids, wm, entropies=ents, entropy_gate=0.0).n_scored == 79  # a gate of 0 scores everything
    assert score_tokens(ids, wm, entropies=ents, entropy_gate=2.0)[1] is None
    with pytest.raises(AigcError) as e:
        detect_ids(ids, wm, entropies=ents[:-1])
    assert e.value.param == "entropies"
    with pytest.raises(AigcError) as e:
        detect_ids(ids, wm, entropies=ents, entropy_gate=-1)
    assert e.value.param == "entropy_gate"


def test_token_entropies_reproduce_the_generation_gate(lm):
    """The detector's entropies over prompt + text are the ones the processor saw while generating: with a strong
    bias, exactly the gated steps come out green, so gated scoring finds all of them green; and under the null
    hypothesis (unmarked text) the gated green share stays near gamma."""
    import torch

    from aigckit.text.kvcache import KVCache
    from aigckit.trust.detect import token_entropies
    from aigckit.trust.watermark import entropy

    prompt = [3, 4, 9]
    probe = lm.generate(prompt, max_new_tokens=40, ignore_eos=True, temperature=1.0, seed=5)
    ents = token_entropies(prompt + probe.sequences[0].token_ids, lm.model, lm.config)
    with torch.inference_mode():  # entry i is the entropy of the distribution that predicted token i
        full = lm.model(torch.tensor([prompt]), torch.arange(3), KVCache.for_model(lm.config, 1, 3, torch.float32))[0]
    assert ents[0] is None and ents[3] == pytest.approx(entropy(full[-1]), abs=1e-4)
    gate = float(np.median([e for e in ents[3:]]))  # a gate that splits this model's steps
    wm = Watermark("engine-key", gamma=0.25, delta=30.0, min_entropy=gate)
    marked = lm.generate(prompt, watermark=wm, max_new_tokens=40, ignore_eos=True, temperature=1.0, seed=5)
    ids = prompt + marked.sequences[0].token_ids
    e = token_entropies(ids, lm.model, lm.config)
    gated = detect_ids(ids[2:], wm, entropies=e[2:], ignore_repeated=False)
    every = detect_ids(ids[2:], wm, ignore_repeated=False)
    assert 5 <= gated.n_scored < every.n_scored
    assert gated.green == gated.n_scored  # every marked step green, no unmarked step scored
    assert every.green < every.n_scored
    # null hypothesis: random texts, gated scoring, green share ~ gamma (0.25)
    rng = np.random.default_rng(0)
    green = scored = 0
    for _ in range(12):
        rand = [int(x) for x in rng.integers(0, lm.config.vocab_size, 60)]
        d = detect_ids(rand, wm, entropies=token_entropies(rand, lm.model, lm.config), ignore_repeated=False)
        green, scored = green + d.green, scored + d.n_scored
    assert scored > 100 and abs(green / scored - 0.25) < 0.1


def test_server_watermark_defaults_are_the_library_defaults():
    from aigckit.serve.schemas import WatermarkSpec

    spec, wm = WatermarkSpec(key="k"), Watermark("k")
    fields = ("gamma", "delta", "context_width", "self_hash", "min_entropy")
    assert [getattr(spec, f) for f in fields] == [getattr(wm, f) for f in fields]
