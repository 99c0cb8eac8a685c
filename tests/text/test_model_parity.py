"""Our transformer loaded through our weight tables gives the same logits as transformers."""

from __future__ import annotations

import pytest
import torch
from lmutil import hf_model

from aigckit.text.kvcache import KVCache
from aigckit.text.weights import load_hf


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_llama_tied_dir", "tiny_gpt2_dir"])
def test_logits_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    cfg, ours = load_hf(path)
    ref = hf_model(path)
    tokens = torch.randint(3, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_cached_decode_equals_full_forward(fixture, request):
    cfg, model = load_hf(request.getfixturevalue(fixture))
    tokens = torch.randint(3, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.for_model(cfg, batch=2, max_len=32)
        parts = [model(tokens[:, :7], torch.arange(7), cache)]
        for t in range(7, 12):
            parts.append(model(tokens[:, t:t + 1], torch.tensor([t]), cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_matches_unpadded(tiny_llama_dir):
    """A ragged batch (left-padded, per-row start) gives each row the logits it has alone."""
    cfg, model = load_hf(tiny_llama_dir)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(3, 97, (1, 9), generator=g), torch.randint(3, 97, (1, 5), generator=g)
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, 4:] = a[0], b[0]
    start = torch.tensor([0, 4])
    with torch.no_grad():
        cache = KVCache.for_model(cfg, 2, 16)
        out = model(batch, torch.arange(9), cache, start=start)
        step = model(torch.tensor([[5], [6]]), torch.tensor([9]), cache, start=start)
        ref_a = model(torch.cat([a, torch.tensor([[5]])], 1))
        ref_b = model(torch.cat([b, torch.tensor([[6]])], 1))
    torch.testing.assert_close(out[0], ref_a[0, :9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 4:], ref_b[0, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[0, 0], ref_a[0, 9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], ref_b[0, 5], atol=1e-5, rtol=1e-5)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_onednn_kernels_match_torch_linears(fixture, request):
    from aigckit.text.kernels import onednn
    from aigckit.text.lm import load_lm

    if not onednn.available():
        pytest.skip("oneDNN not available in this torch build")
    path = request.getfixturevalue(fixture)
    fast, plain = load_lm(str(path)), load_lm(str(path), kernels="torch")
    assert fast.kernels == "onednn" and plain.kernels == "torch"
    tokens = torch.randint(3, fast.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(fast.model(tokens), plain.model(tokens), atol=1e-5, rtol=1e-5)
    assert fast.generate([5, 6, 7], temperature=0, max_new_tokens=12).token_ids == \
        plain.generate([5, 6, 7], temperature=0, max_new_tokens=12).token_ids


def test_sharded_safetensors_load(tmp_path):
    """A checkpoint split over several safetensors files with an index loads like the single file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    ref = LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 1
    _, ours = load_hf(tmp_path)
    tokens = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, atol=1e-4, rtol=1e-4)
