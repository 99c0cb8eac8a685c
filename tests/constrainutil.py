"""A tiny random Llama with a byte-level BPE tokenizer (every byte is a token, a few merges, ChatML specials), so
JSON, regexes and grammars can be written in its vocabulary (the word-level tiny models cannot spell "{")."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aigckit.text.tokenizer import _bytes_to_unicode  # GPT-2's byte alphabet

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MERGES = ['{ "', '" :', ': Ġ', ', Ġ', 'Ġ "', '" ,', '" }', 'a b', 'y e', 'ye s', 'n o', 't r', 'tr u', 'tru e']


def write_bytelevel_tokenizer(d: Path) -> int:
    """Writes tokenizer.json + tokenizer_config.json; returns the vocabulary size (specials included)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    sp = _bytes_to_unicode()
    vocab = {sp[b]: b for b in range(256)}
    merges = [tuple(m.split(" ")) for m in MERGES]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                                         "chat_template": CHATML}))
    return tok.get_vocab_size(with_added_tokens=True)


def make_tiny_bytes(d: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    d.mkdir(parents=True, exist_ok=True)
    n = write_bytelevel_tokenizer(d)
    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=n - 3, eos_token_id=n - 3, pad_token_id=n - 3)
    LlamaForCausalLM(cfg).eval().save_pretrained(d, safe_serialization=True)
    return d
