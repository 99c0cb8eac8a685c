"""Fixtures for the server tests: tiny text/embedding/image models and a live `aigc serve` app on a free port."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from serveutil import API_KEY, CHATML, CLASSES, LiveServer, free_port  # noqa: F401


@pytest.fixture(scope="session")
def tiny_chat_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with a ChatML template (its word-level tokenizer maps unknown words to w0)."""
    d = tmp_path_factory.mktemp("serve") / "tiny-chat"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("serve") / "tiny-bert"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sleeps", "runs", "fast", "."]
    vocab = {w: i for i, w in enumerate(words)}
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    transformers.BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(d, safe_serialization=True)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="session")
def tiny_image_runs(tmp_path_factory) -> dict[str, Path]:
    """Random-weight image runs saved as real checkpoints: a class-conditional DCGAN and a tiny DDPM."""
    from aigckit.image.api import build_model
    from aigckit.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("serve-runs")
    torch.manual_seed(0)
    runs = {}
    for name, family, cfg in [
        ("gan", "dcgan", {"nz": 16, "ngf": 8, "ndf": 8, "num_classes": 3}),
        ("ddpm", "ddpm", {"timesteps": 20, "unet": {"base": 8, "mults": [1, 2], "num_res_blocks": 1,
                                                   "attn_levels": [1], "groups": 4, "num_classes": 3}}),
    ]:
        c, model = build_model(family, cfg)
        config = {"family": family, "model": c.to_dict(), "data": {"class_names": CLASSES, "resolution": 28,
                                                                   "channels": 1}}
        save_checkpoint(root / name, step=1, config=config, model=model)
        runs[name] = root / name
    return runs


@pytest.fixture(scope="session")
def served(tiny_chat_dir, tiny_bert_dir, tiny_image_runs):
    """One live server for the session: tiny-chat (text), tiny-gpt-free word model, tiny-bert, gan and ddpm."""
    from aigckit.serve.app import create_app
    from aigckit.serve.models import Registry

    reg = Registry([f"tiny-chat={tiny_chat_dir}", f"tiny-bert={tiny_bert_dir}",
                    f"gan={tiny_image_runs['gan']}", f"ddpm={tiny_image_runs['ddpm']}"], max_queue=64)
    app = create_app(reg, api_key=API_KEY, max_body=64 * 1024)
    srv = LiveServer(app, free_port()).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(served):
    import openai

    return openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
