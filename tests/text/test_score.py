"""LM.score on texts longer than the context: sliding windows with a stride (transformers' perplexity guide),
bounded memory, and the windowing reported."""

from __future__ import annotations

import math

import pytest
import torch

from aigckit.errors import AigcError
from aigckit.text import lm as lm_mod
from aigckit.text.lm import load_lm


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


def _text(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


def _guide(lm, ids, window, stride):
    """The loop of transformers' perplexity guide: full forwards of each window, labels masked to the new tokens."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = lm.model(x).float()
        shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
        nll_sum += float(torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100,
                                                           reduction="sum"))
        n_tokens += int((shift_labels != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("window, stride", [(128, 64), (100, 37), (64, 1), (128, 128)])
def test_windows_match_the_perplexity_guide(lm, window, stride):
    ids = _text(300)
    res = lm.score(ids, window=window, stride=stride)
    want, n = _guide(lm, ids, window, stride)
    assert res.n_tokens == n and res.nll == pytest.approx(want, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(want), rel=1e-5)
    assert (res.window, res.stride) == (window, stride)


def test_stride_equal_to_window_is_non_overlapping_windows(lm):
    ids = _text(250, seed=1)
    res = lm.score(ids, window=50, stride=50)
    total, count = 0.0, 0
    for s in range(0, len(ids), 50):  # each chunk on its own: its first token has no context
        chunk = torch.tensor([ids[s:s + 50]])
        with torch.no_grad():
            logits = lm.model(chunk).float()[0]
        total += float(torch.nn.functional.cross_entropy(logits[:-1], chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    assert res.windows == 5 and res.n_tokens == count
    assert res.nll == pytest.approx(total / count, rel=1e-5)


def test_long_text_scores_in_bounded_memory(lm, monkeypatch):
    """A text 40x the context: every forward holds at most one chunk of logits and one window of KV cache."""
    monkeypatch.setattr(lm_mod, "SCORE_CHUNK", 16)
    seen = []
    real = lm.model.forward

    def forward(tokens, input_pos=None, cache=None, **kw):
        seen.append((tokens.shape[1], None if cache is None else cache.max_len, kw.get("last_only", False)))
        return real(tokens, input_pos, cache, **kw)

    monkeypatch.setattr(lm.model, "forward", forward)
    ids = _text(40 * 128, seed=2)
    res = lm.score(ids)  # defaults: window = the context (128), stride = 64
    assert (res.window, res.stride) == (128, 64) and res.n_tokens == len(ids) - 1
    assert max(t for t, _, _ in seen) <= 16 and {c for _, c, _ in seen} == {128}
    assert res.windows == (len(ids) - 128) // 64 + 1
    monkeypatch.setattr(lm.model, "forward", real)
    want, _ = _guide(lm, ids[:1000], 128, 64)
    assert lm.score(ids[:1000]).nll == pytest.approx(want, rel=1e-5)


def test_short_text_is_one_window_as_before(lm):
    ids = _text(40, seed=3)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).float()[0]
    want = float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])))
    res = lm.score(ids)
    assert res.windows == 1 and res.n_tokens == 39 and res.nll == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kw, msg", [(dict(window=1), "window must be >= 2"), (dict(window=129), "window must be <= 128"),
                                     (dict(window=64, stride=65), "stride must be <= 64"),
                                     (dict(stride=0), "stride must be >= 1")])
def test_bad_windowing_is_refused(lm, kw, msg):
    with pytest.raises(AigcError, match=msg) as e:
        lm.score(_text(10), **kw)
    assert e.value.param in ("window", "stride")
