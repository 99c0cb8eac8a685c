"""Helpers shared by the embedding tests (a uniquely named module: several conftest.py files exist): a tiny random
BERT saved as an HF directory with a WordPiece tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["the", "a", "man", "is", "eating", "food", "girl", "carrying", "baby", "piece", "of", "bread", "dog",
         "runs", "fast", "cat", "sleeps", ".", ",", "!", "?", "##s", "##ing", "play", "un", "##known"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tokenizer_json(path: Path, *, max_len: int | None = None) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    # like MiniLM's tokenizer.json: fixed padding + truncation that the loader must override
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=16)
    tok.enable_truncation(max_length=16)
    tok.save(str(path))


def hf_config(**kw):
    import transformers

    args = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
                initializer_range=0.3)  # large weights: an approximate GELU or a wrong mask shows at 1e-5
    args.update(kw)
    return transformers.BertConfig(**args)


def make_tiny_bert_dir(d: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    hf = transformers.BertModel(hf_config(), add_pooling_layer=True).eval()
    with torch.no_grad():  # make LayerNorms and biases non-trivial so a swapped name would show
        for n, p in hf.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(d, safe_serialization=True)
    tokenizer_json(d / "tokenizer.json")
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12}))
    return d
