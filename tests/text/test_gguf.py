"""GGUF loading: tiny files written with the gguf package (F32/F16/Q8_0/Q4_0/Q4_1/BF16) load to the source weights,
with llama.cpp's Q/K row permutation undone; logits match transformers on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

from aigckit.errors import CorruptFileError, UnsupportedFormatError
from aigckit.text.weights import load_gguf

N_LAYER, D, H, KV, FF, V = 2, 64, 4, 2, 96, 128


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to Q and K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=N_LAYER,
                      num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=64, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def write_gguf(path, sd: dict[str, np.ndarray], qtype: Q) -> None:
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(N_LAYER)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)

    def put(name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, arr)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", llamacpp_permute(sd[p + "self_attn.q_proj.weight"], H))
        put(f"blk.{i}.attn_k.weight", llamacpp_permute(sd[p + "self_attn.k_proj.weight"], KV))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def roundtrip(arr: np.ndarray, qtype: Q) -> np.ndarray:
    """The exact values a reader should recover for ``arr`` stored as ``qtype``."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == Q.F32:
        return arr
    if qtype == Q.F16:
        return arr.astype(np.float16).astype(np.float32)
    return dequantize(quantize(arr, qtype), qtype)


@pytest.fixture(scope="module")
def source():
    return hf_weights()


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_weights_equal_source_after_dequantisation(tmp_path, source, qtype):
    _, sd = source
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(path, sd, qtype)
    cfg, model = load_gguf(path)
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.vocab_size) == (N_LAYER, H, KV, D, V)
    assert cfg.tie_embeddings
    ours = model.state_dict()
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        # permute -> quantise -> dequantise -> our un-permute must give the source rows back (up to quantisation)
        q = llamacpp_permute(sd[p + "self_attn.q_proj.weight"], H)
        k = llamacpp_permute(sd[p + "self_attn.k_proj.weight"], KV)
        want_q = torch.from_numpy(roundtrip(q, qtype)).reshape(H, D // H // 2, 2, D).transpose(1, 2).reshape(D, D)
        want_k = torch.from_numpy(roundtrip(k, qtype)).reshape(KV, D // H // 2, 2, D).transpose(1, 2).reshape(-1, D)
        want_v = torch.from_numpy(roundtrip(sd[p + "self_attn.v_proj.weight"], qtype))
        torch.testing.assert_close(ours[f"blocks.{i}.attn.qkv.weight"], torch.cat([want_q, want_k, want_v]))
        torch.testing.assert_close(ours[f"blocks.{i}.mlp.gate_up.weight"], torch.from_numpy(np.concatenate(
            [roundtrip(sd[p + "mlp.gate_proj.weight"], qtype), roundtrip(sd[p + "mlp.up_proj.weight"], qtype)])))
        torch.testing.assert_close(ours[f"blocks.{i}.attn_norm.weight"], torch.from_numpy(sd[p + "input_layernorm.weight"]))
        # and close to the unquantised source
        tol = {Q.F32: 1e-7, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 2e-3, Q.Q4_0: 3e-2, Q.Q4_1: 3e-2}[qtype]
        src_q = torch.from_numpy(sd[p + "self_attn.q_proj.weight"])
        assert (ours[f"blocks.{i}.attn.qkv.weight"][:D] - src_q).abs().max() <= tol


def test_gguf_logits_match_transformers(tmp_path, source):
    model_hf, sd = source
    path = tmp_path / "tiny-f32.gguf"
    write_gguf(path, sd, Q.F32)
    _, ours = load_gguf(path)
    tokens = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), model_hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_gguf_missing_tensor_and_corrupt_file(tmp_path, source):
    _, sd = source
    bad = dict(sd)
    path = tmp_path / "ok.gguf"
    write_gguf(path, bad, Q.F32)
    data = path.read_bytes()
    trunc = tmp_path / "truncated.gguf"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError):
        load_gguf(trunc)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CorruptFileError):
        load_gguf(junk)


def test_gguf_unsupported_architecture(tmp_path):
    w = GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedFormatError, match="mamba"):
        load_gguf(tmp_path / "x.gguf")
