"""The classifier reward (tune/classifier.py): a tiny random transformers BertForSequenceClassification, our
encoder + head against transformers' probabilities, through the reward spec syntax of ``aigc rl``."""

from __future__ import annotations

import json

import pytest
import torch

from aigckit.errors import AigcError, UnsupportedFormatError
from aigckit.tune.rewards import parse_reward

transformers = pytest.importorskip("transformers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sleeps", "runs", "fast", "."]
TEXTS = ["the cat sleeps .", "a dog runs fast", "dog dog dog", "", "the the cat runs . unknownword"]


def _save(d, num_labels, id2label=None, seed=0):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, num_labels=num_labels,
                                  initializer_range=0.3,
                                  **({"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
                                     if id2label else {}))
    model = transformers.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # a head with spread-out outputs (the random init is near-uniform)
        model.classifier.weight.mul_(5)
    model.save_pretrained(d, safe_serialization=True)
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(d / "tokenizer.json"))
    return model, tok


def _theirs(model, tok, texts):
    out = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok.encode(t or " ").ids])
            out.append(model(input_ids=ids).logits[0])
    return torch.stack(out)


def test_classifier_reward_matches_transformers(tmp_path):
    d = tmp_path / "clf"
    model, tok = _save(d, 3, {0: "negative", 1: "neutral", 2: "positive"})
    probs = torch.softmax(_theirs(model, tok, TEXTS), -1)
    assert probs[:, 2].max() - probs[:, 2].min() > 0.05  # the texts score differently
    completions = [[{"role": "assistant", "content": t}] for t in TEXTS]  # chat-shaped completions too
    for spec, col in [("classifier:{d}", 2), ("classifier:{d}:neutral", 1), ("classifier:{d}:0=2", 0)]:
        r = parse_reward(spec.format(d=d))
        got = r.fn(prompts=[""] * len(TEXTS), completions=TEXTS)
        torch.testing.assert_close(torch.tensor(got), probs[:, col], atol=1e-5, rtol=1e-4)
        assert r.fn(prompts=[""] * len(TEXTS), completions=completions) == pytest.approx(got, abs=1e-7)
    assert parse_reward(f"classifier:{d}:0=2").weight == 2.0
    with pytest.raises(AigcError, match="negative, neutral, positive"):
        parse_reward(f"classifier:{d}:happy")


def test_regression_head_gives_raw_scores(tmp_path):
    d = tmp_path / "rm"
    model, tok = _save(d, 1, seed=1)
    got = parse_reward(f"classifier:{d}").fn(prompts=[""] * len(TEXTS), completions=TEXTS)
    torch.testing.assert_close(torch.tensor(got), _theirs(model, tok, TEXTS)[:, 0], atol=1e-5, rtol=1e-4)


def test_bad_classifier_folders(tmp_path, tiny_llama_dir):
    with pytest.raises(AigcError, match="needs its argument"):
        parse_reward("classifier")
    with pytest.raises(AigcError, match="no config.json"):
        parse_reward(f"classifier:{tmp_path}")
    d = tmp_path / "clf"
    _save(d, 2)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(UnsupportedFormatError, match="ForSequenceClassification"):
        parse_reward(f"classifier:{d}")
