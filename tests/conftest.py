"""Shared fixtures: tiny random HF models saved as safetensors, and the real models from the store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests check behaviour, not speed: one thread keeps them fast and steady on a busy machine (two OpenMP threads
# competing with other processes were measured 30x slower here). AIGC_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("AIGC_TEST_THREADS", "1")))



def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (20 s or more on the 2-core CPU) run first, the rest in file order: under `make test`'s
    parallel workers (pytest-xdist) the long ones start at once instead of leaving one worker busy at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


STORE_HOME = Path(os.environ.get("AIGC_HOME", Path.home() / ".cache" / "aigckit"))
SMOLLM_GGUF = STORE_HOME / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIR = STORE_HOME / "models" / "minilm-l6-v2"


def write_wordlevel_tokenizer(d: Path, vocab_size: int, eos_id: int) -> None:
    """A tokenizer.json whose tokens are "w0".."wN" (space separated), enough to drive the engine on tiny models."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"w{eos_id}", "pad_token": "w0"}))


def _save_tiny(tmp: Path, model, name: str) -> Path:
    d = tmp / name
    model.save_pretrained(d, safe_serialization=True)
    write_wordlevel_tokenizer(d, model.config.vocab_size, model.config.eos_token_id)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Tiny random Llama: GQA (4 heads, 2 KV heads), untied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    return _save_tiny(tmp_path_factory.mktemp("hf"), LlamaForCausalLM(cfg).eval(), "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _save_tiny(tmp_path_factory.mktemp("hf"), LlamaForCausalLM(cfg).eval(), "tiny-llama-tied")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=101, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=100,
                     eos_token_id=100)
    return _save_tiny(tmp_path_factory.mktemp("hf"), GPT2LMHeadModel(cfg).eval(), "tiny-gpt2")


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    if not SMOLLM_GGUF.exists():
        pytest.skip("SmolLM2 not pulled: run `aigc pull smollm2-135m-instruct` (make test does)")
    return SMOLLM_GGUF
