"""Model files with impossible sizes fail with one-line errors naming the field, never deep in the model.

Tiny GGUF headers are written with the ``gguf`` package (as in test_gguf.py); HF variants are config.json dicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFWriter

from aigckit.errors import AigcError, CorruptFileError
from aigckit.text.config import LMConfig
from aigckit.text.weights import load_gguf, load_hf


def write_header_gguf(path, **overrides):
    """A llama GGUF with metadata only (plus one tensor), values overridable; None leaves a key out."""
    meta = dict(block_count=1, context_length=64, embedding_length=8, feed_forward_length=16, head_count=2,
                head_count_kv=1, layer_norm_rms_eps=1e-5, rope_freq_base=10000.0, vocab_size=4)
    meta.update(overrides)
    w = GGUFWriter(str(path), "llama")
    for k, v in meta.items():
        if v is not None:
            getattr(w, f"add_{k}")(v)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("overrides,key", [
    (dict(head_count=0), "llama.attention.head_count"),
    (dict(head_count_kv=0), "llama.attention.head_count_kv"),
    (dict(head_count_kv=3), "llama.attention.head_count_kv"),  # 2 heads are not a multiple of 3 KV heads
    (dict(context_length=4294967295), "llama.context_length"),
    (dict(block_count=0), "llama.block_count"),
    (dict(embedding_length=7), "llama.attention.head_count"),  # 7 is not divisible by 2 heads
    (dict(vocab_size=0), "llama.vocab_size"),
    (dict(layer_norm_rms_eps=float("nan")), "llama.attention.layer_norm_rms_epsilon"),
    (dict(rope_freq_base=-1.0), "llama.rope.freq_base"),
    (dict(embedding_length=None), "llama.embedding_length"),  # missing
    (dict(feed_forward_length=None), "llama.feed_forward_length"),
])
def test_gguf_invalid_sizes_name_the_key(tmp_path, overrides, key):
    path = write_header_gguf(tmp_path / "bad.gguf", **overrides)
    with pytest.raises(CorruptFileError) as e:
        load_gguf(path)
    msg = str(e.value)
    assert key in msg and "\n" not in msg, msg


def test_gguf_valid_header_passes_validation(tmp_path):
    path = write_header_gguf(tmp_path / "ok.gguf")
    with pytest.raises(CorruptFileError, match="missing tensor"):  # sizes are fine: it fails on the weights only
        load_gguf(path)


def _llama_hf(**overrides):
    d = dict(model_type="llama", vocab_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             hidden_size=8, intermediate_size=16, max_position_embeddings=64, rms_norm_eps=1e-5)
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not None}


@pytest.mark.parametrize("hf,key", [
    (_llama_hf(num_attention_heads=0), "num_attention_heads"),
    (_llama_hf(num_key_value_heads=0), "num_key_value_heads"),
    (_llama_hf(max_position_embeddings=4294967295), "max_position_embeddings"),
    (_llama_hf(hidden_size=None), "hidden_size"),
    (_llama_hf(vocab_size="32"), "vocab_size"),
    (_llama_hf(head_dim=3), "head_dim"),
    (_llama_hf(eos_token_id=99), "eos_token_id"),
    (_llama_hf(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                             "high_freq_factor": 4.0}), "rope_scaling"),
    ({"model_type": "gpt2", "vocab_size": 10, "n_layer": 1, "n_head": 0, "n_embd": 8, "n_positions": 16}, "n_head"),
    ({"model_type": "gpt2", "vocab_size": 10, "n_layer": 1, "n_head": 2, "n_embd": 8}, "n_positions"),
])
def test_hf_config_invalid_values_name_the_key(tmp_path, hf, key):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CorruptFileError) as e:
        load_hf(tmp_path)
    assert repr(key) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_hf_config_valid_values_give_the_same_config():
    cfg = LMConfig.from_hf(_llama_hf(rope_theta=500000, eos_token_id=[2, 3]))
    assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.block_size, cfg.eos_ids) == (2, 1, 4, 64, [2, 3])
    assert isinstance(cfg.rope_theta, float) and cfg.rope_theta == 500000.0
    gpt2 = LMConfig.from_hf({"model_type": "gpt2", "vocab_size": 10, "n_layer": 1, "n_head": 2, "n_embd": 8,
                             "n_positions": 16, "n_inner": None})
    assert gpt2.intermediate_size == 32 and gpt2.bias and gpt2.tie_embeddings


def test_lmconfig_direct_errors():
    with pytest.raises(AigcError, match="n_kv_head must be in 1..4, got 0"):
        LMConfig(n_head=4, n_kv_head=0)
    with pytest.raises(AigcError, match="block_size must be in 1..1048576"):
        LMConfig(block_size=2**32 - 1)
    with pytest.raises(AigcError, match="n_layer must be an integer"):
        LMConfig(n_layer=2.0)
