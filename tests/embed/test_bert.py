"""BERT embeddings: parity with transformers on a tiny random model, strict loading, the real MiniLM, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from aigckit import store
from aigckit.embed import BertConfig, Embedder, load_embedder
from aigckit.errors import AigcError, CorruptFileError, UnsupportedFormatError
from embedutil import make_tiny_bert_dir

TEXTS = ["A man is eating food.", "The girl is carrying a baby!", "dogs", "the cat sleeps , the dog runs fast ?",
         "unknown zebra", ""]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Embedder:
    return load_embedder(tiny_dir)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------- tiny parity


def test_hidden_states_match_transformers_with_padding(tiny_dir, tiny):
    import transformers

    hf = transformers.BertModel.from_pretrained(tiny_dir).eval()
    ids, mask = tiny.tokenize(TEXTS)
    assert ids.shape[0] == len(TEXTS) and (mask == 0).any(), "the batch should contain padding"
    with torch.inference_mode():
        ours = tiny.model(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.bool()
    torch.testing.assert_close(ours[m], ref[m], atol=1e-5, rtol=1e-5)
    # each text alone (no padding) gives the same hidden states as inside the padded batch
    for i, t in enumerate(TEXTS):
        one_ids, one_mask = tiny.tokenize([t])
        with torch.inference_mode():
            alone = tiny.model(one_ids, one_mask)[0]
        torch.testing.assert_close(alone, ours[i, : one_ids.shape[1]], atol=1e-5, rtol=1e-5)


def test_token_type_ids_match_transformers(tiny_dir, tiny):
    import transformers

    hf = transformers.BertModel.from_pretrained(tiny_dir).eval()
    ids, mask = tiny.tokenize(TEXTS[:2])
    tt = (torch.arange(ids.shape[1]) >= 3).long().expand_as(ids).contiguous()
    with torch.inference_mode():
        ours = tiny.model(ids, mask, tt)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


def test_embed_is_normalised_mean_pooling_and_order_preserving(tiny):
    ids, mask = tiny.tokenize(TEXTS)
    with torch.inference_mode():
        h = tiny.model(ids, mask)
    m = mask[..., None].float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    got = tiny.embed(TEXTS, batch_size=2)  # sorted by length internally, returned in input order
    assert got.shape == (len(TEXTS), tiny.dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)))
    raw = tiny.embed(TEXTS, normalize=False)
    torch.testing.assert_close(raw, (h * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5)
    assert tiny.embed("A man is eating food.").shape == (1, tiny.dim)


def test_concurrent_calls_agree(tiny):
    from concurrent.futures import ThreadPoolExecutor

    want = [tiny.embed(TEXTS[i:] or TEXTS) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: tiny.embed(TEXTS[i:] or TEXTS, batch_size=2), range(4)))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_tokenizer_settings_replaced_truncation_and_counts(tiny):
    # tokenizer.json pads to 16; ours pads to the longest in the batch and truncates at max_seq_length (12)
    ids, mask = tiny.tokenize(["dogs", "a man eating"])
    assert ids.shape == (2, 5) and mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert tiny.max_seq_length == 12
    assert tiny.count_tokens(["dogs", "a man", "the " * 50]) == [4, 4, 12]
    assert tiny.count_tokens("") == [2]


def test_cls_pooling(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "cls")
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    emb = load_embedder(d)
    ids, mask = emb.tokenize(TEXTS)
    with torch.inference_mode():
        h = emb.model(ids, mask)
    torch.testing.assert_close(emb.embed(TEXTS), torch.nn.functional.normalize(h[:, 0], dim=-1), atol=1e-5, rtol=0)


def test_unsupported_pooling_and_modules_refused(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "max")
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(UnsupportedFormatError, match="pooling"):
        load_embedder(d)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(UnsupportedFormatError, match="Dense"):
        load_embedder(d)


def test_bfloat16_close_to_float32(tiny_dir, tiny):
    emb = load_embedder(tiny_dir, dtype="bfloat16")
    assert emb.model.embed.word.weight.dtype == torch.bfloat16
    got = emb.embed(TEXTS)
    assert got.dtype == torch.float32
    assert (got * tiny.embed(TEXTS)).sum(-1).min() > 0.98


# --------------------------------------------------------------------------------------------- strict loading


def _rewrite_weights(d: Path, edit) -> None:
    sd = load_file(str(d / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"))


@pytest.mark.parametrize("case, match", [
    ("extra", "unknown"),
    ("missing", "missing"),
    ("shape", "shape"),
    ("extra_layer", "unexpected"),
])
def test_strict_loading_errors(tiny_dir, tmp_path, case, match):
    d = _copy(tiny_dir, tmp_path / case)

    def edit(sd):
        if case == "extra":
            sd["cls.predictions.bias"] = torch.zeros(40)
        elif case == "missing":
            del sd["encoder.layer.1.output.dense.weight"]
        elif case == "shape":
            sd["encoder.layer.0.attention.self.key.weight"] = torch.zeros(32, 31)
        elif case == "extra_layer":
            sd["encoder.layer.7.output.dense.bias"] = torch.zeros(32)

    _rewrite_weights(d, edit)
    with pytest.raises(CorruptFileError, match=match) as ei:
        load_embedder(d)
    assert isinstance(ei.value, AigcError)


def test_bert_prefix_and_ignored_buffers_accepted(tiny_dir, tiny, tmp_path):
    d = _copy(tiny_dir, tmp_path / "prefixed")

    def edit(sd):
        for k in list(sd):
            sd["bert." + k] = sd.pop(k)
        sd["bert.embeddings.position_ids"] = torch.arange(64)[None]

    _rewrite_weights(d, edit)
    torch.testing.assert_close(load_embedder(d).embed(TEXTS), tiny.embed(TEXTS))


def test_bin_only_dir_refused(tiny_dir, tmp_path):
    d = tmp_path / "binonly"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    shutil.copy(tiny_dir / "tokenizer.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(UnsupportedFormatError, match="safetensors"):
        load_embedder(d)


def test_bad_config_and_arguments(tiny_dir, tiny, tmp_path):
    d = _copy(tiny_dir, tmp_path / "roberta")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    with pytest.raises(UnsupportedFormatError, match="roberta"):
        load_embedder(d)
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(UnsupportedFormatError, match="hidden_act"):
        load_embedder(d)
    with pytest.raises(AigcError, match="dtype"):
        load_embedder(tiny_dir, dtype="int8")
    with pytest.raises(AigcError, match="no input"):
        tiny.embed([])
    with pytest.raises(AigcError, match="expected a string"):
        tiny.embed(["ok", 3])
    with pytest.raises(AigcError, match="batch_size"):
        tiny.embed(["ok"], batch_size=0)
    assert BertConfig.from_hf(cfg).head_dim == 8


# ----------------------------------------------------------------------------------------- real all-MiniLM-L6-v2


def _minilm_dir() -> Path:
    try:
        return store.resolve("minilm-l6-v2").path
    except AigcError as e:
        pytest.skip(f"minilm-l6-v2 not available ({e}); run: aigc pull minilm-l6-v2")


SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a horse.", "Hello!", "Über-long words like antidisestablishmentarianism, 1234 and ©.",
             "the quick brown fox jumps over the lazy dog " * 40]  # last one is truncated at 256 tokens


@pytest.mark.integration
def test_minilm_matches_transformers():
    import transformers

    d = _minilm_dir()
    emb = load_embedder("minilm-l6-v2")
    assert emb.dim == 384 and emb.pooling == "mean" and emb.max_seq_length == 256
    tok = transformers.AutoTokenizer.from_pretrained(d)
    hf = transformers.BertModel.from_pretrained(d).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 256
    with torch.inference_mode():
        h = hf(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    got = emb.embed(SENTENCES, batch_size=3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert emb.count_tokens(SENTENCES) == enc["attention_mask"].sum(1).tolist()


@pytest.mark.integration
def test_minilm_semantic_sanity():
    _minilm_dir()
    emb = load_embedder("minilm-l6-v2")
    a, b, c = emb.embed(["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."])
    assert float(a @ b) > float(b @ c) + 0.3
    assert float(a @ b) > float(a @ c) + 0.3
