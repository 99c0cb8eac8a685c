"""Memorisation checks: nearest training images find planted copies (and the threshold from held-out data flags
them, not the others); the longest shared token run with a corpus; zero-shot scoring runs on a model."""

from __future__ import annotations

import torch

from aigckit.text.lm import load_lm
from aigckit.trust.memorisation import memorisation_report, nearest, ngram_overlap, pairs_grid
from aigckit.trust.zeroshot import sampling_discrepancy, zero_shot


def test_nearest_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(7, 5, generator=g), torch.randn(30, 5, generator=g)
    d, i = nearest(q, r)
    full = torch.cdist(q, r)
    assert torch.equal(i, full.argmin(1)) and torch.allclose(d, full.min(1).values, atol=1e-4)


def test_planted_copies_are_flagged(tmp_path):
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, 256, (300, 1, 12, 12), generator=g, dtype=torch.uint8)
    test = torch.randint(0, 256, (100, 1, 12, 12), generator=g, dtype=torch.uint8)
    gen = torch.rand(20, 1, 12, 12, generator=g) * 2 - 1
    gen[:5] = train[[3, 50, 77, 120, 299]].float() / 127.5 - 1 + 0.01 * torch.randn(5, 1, 12, 12, generator=g)
    feats = lambda x: x.float().flatten(1)[:, :16]  # noqa: E731  (a stand-in for classifier features)
    rep = memorisation_report(gen, feats(gen), train, feats(train / 127.5 - 1), test)
    # the 5 copies, plus about 1% of the others by the threshold's construction (they are drawn like test images)
    assert 0.25 <= rep["near_copy_share"] <= 0.35
    assert sorted(p["train"] for p in rep["closest_pairs"][:5]) == [3, 50, 77, 120, 299]
    assert rep["closest_pairs"][0]["pixel_rms"] < rep["copy_threshold_rms"]
    out = pairs_grid(gen, train, {"closest_pairs": rep["closest_pairs"][:4]}, tmp_path / "pairs.png")
    assert out.exists()


def test_longest_ngram_overlap(tiny_llama_dir, tmp_path):
    lm = load_lm(str(tiny_llama_dir))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("w1 w3 w5 w7 w9 w11 w13 w15 w17")
    (corpus / "b.md").write_text("w40 w41 w42 w43 w44 w45 w46 w47 w48 w49 w50")
    res = ngram_overlap("w30 w31 w42 w43 w44 w45 w46 w60 w5 w7", corpus, lm.tokenizer)
    assert res.longest == 5 and res.source.endswith("b.md") and res.text.split() == ["w42", "w43", "w44", "w45",
                                                                                        "w46"]
    assert ngram_overlap("w90 w91", corpus, lm.tokenizer).longest == 0


def test_zero_shot_scores_model_samples_above_shuffled_text(tiny_llama_dir):
    lm = load_lm(str(tiny_llama_dir))
    ids = lm.generate([3, 4, 5], max_new_tokens=60, temperature=0, ignore_eos=True).token_ids
    d_model, _, n = sampling_discrepancy(ids, lm.model, lm.config)
    shuffled = list(torch.randint(3, 97, (60,), generator=torch.Generator().manual_seed(0)).tolist())
    d_rand, _, _ = sampling_discrepancy(shuffled, lm.model, lm.config)
    assert n == 59 and d_model > d_rand  # greedy text is the model's own most likely choice
    res = zero_shot("w5 w6 w7 w8", lm)
    assert res.n_tokens == 3 and "unreliable" in res.note
