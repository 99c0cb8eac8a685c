"""The models that ship inside the package: listed, loadable, and (with MiniLM pulled) usable by prompt."""

import json

import pytest

from aigckit import store

MINILM = store.models_dir() / "minilm-l6-v2"
REAL_HOME = str(store.models_dir().parent)


@pytest.fixture
def real_store(monkeypatch):
    """The real store and MiniLM, also after another test of this package has installed the session's fake home and
    fake text encoder (conftest.fake_home): tests run in any order (slow ones first, parallel workers)."""
    from aigckit.multimodal import textcond

    monkeypatch.setenv("AIGC_HOME", REAL_HOME)
    monkeypatch.setattr(textcond, "load_text_encoder", _REAL_LOAD_TEXT_ENCODER)
    if not (MINILM / "manifest.json").exists():
        pytest.skip("MiniLM not pulled: run `aigc pull minilm-l6-v2` (make test does)")


def _real_loader():
    from aigckit.multimodal import textcond

    return textcond.load_text_encoder  # read when this module is imported: before any fixture has run


_REAL_LOAD_TEXT_ENCODER = _real_loader()


def test_builtin_models_are_listed_and_load(capsys):
    from aigckit.cli import main
    from aigckit.image.api import load_image_model
    from aigckit.multimodal.caption import load_captioner
    from aigckit.multimodal.clip import load_clip

    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name in ("fmnist-t2i", "shapes-t2i", "fmnist-clip", "fmnist-caption"):
        assert rows[name]["builtin"] and rows[name]["bytes"] < 20e6
    assert "fmnist-t2i" not in [r["name"] for r in store.list_models()]  # the store itself lists pulled models
    m = load_image_model("fmnist-t2i")
    assert m.text_conditioned and m.model.cfg.text_encoder == "minilm-l6-v2"
    assert load_image_model("shapes-t2i").model.cfg.channels == 3
    assert load_clip("fmnist-clip")[1]["family"] == "clip"
    assert load_captioner("fmnist-caption")[1]["family"] == "caption"


@pytest.mark.integration
def test_fmnist_t2i_samples_by_prompt_with_minilm(tmp_path, real_store):
    import torch

    from aigckit.embed.bert import load_embedder
    from aigckit.image.api import load_image_model
    from aigckit.multimodal.textcond import load_text_encoder

    enc = load_text_encoder("minilm-l6-v2", 32)
    c = enc.encode(["a pair of trainers", "a bag"])
    ref = load_embedder("minilm-l6-v2").embed(["a pair of trainers", "a bag"])
    torch.testing.assert_close(c.pooled, ref, atol=1e-4, rtol=1e-4)  # pooled = the sentence embedding
    out = load_image_model("fmnist-t2i").sample(2, prompts="a pair of trainers", negative_prompt="a bag", steps=3,
                                                seed=0)
    assert out.tensor.shape == (2, 1, 28, 28) and out.params["prompt"] == "a pair of trainers"


def test_caption_picks_the_model_by_image_colour(tmp_path, capsys):
    import random

    import torch

    from aigckit.cli import main
    from aigckit.image.io import save_png, to_pil
    from aigckit.multimodal import captions as C
    from aigckit.multimodal import shapes as S

    if store.builtin_path("shapes-caption") is None:
        pytest.skip("shapes-caption is not in this checkout")
    img = S.render(S.Scene(S.Obj("red", "circle", "large")), random.Random(0))
    save_png(to_pil(img[None].float() / 127.5 - 1)[0], tmp_path / "shape.png")
    save_png(to_pil(-torch.ones(1, 1, 28, 28))[0], tmp_path / "grey.png")
    capsys.readouterr()
    assert main(["caption", str(tmp_path / "shape.png"), str(tmp_path / "grey.png"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    shape_words = {w for t in S.train_captions().texts for w in t.split()}
    garment_words = {w for t in C.train_captions().texts for w in t.split()}
    assert out[0]["caption"] and set(out[0]["caption"].split()) <= shape_words
    assert out[1]["caption"] and set(out[1]["caption"].split()) <= garment_words


@pytest.mark.integration
def test_shapes_t2i_draws_the_colour_it_is_asked_for(real_store):
    from aigckit.image.api import load_image_model

    m = load_image_model("shapes-t2i")
    for prompt, want, other in (("a large red square", 0, 2), ("a large blue square", 2, 0)):
        x = (m.sample(4, prompts=prompt, steps=20, guidance=3, seed=0).tensor + 1) / 2  # 4 x 3 x 32 x 32 in [0, 1]
        assert x.shape == (4, 3, 32, 32)
        drawn = x.amax(1, keepdim=True) > 0.3  # the shape's pixels (the background is black)
        mean = (x * drawn).sum((2, 3)) / drawn.sum((2, 3)).clamp(min=1)  # its mean colour, per image
        assert (drawn.flatten(1).float().mean(1) > 0.05).all(), prompt  # a large shape, not an empty image
        assert int((mean[:, want] > mean[:, other] + 0.2).sum()) >= 3, (prompt, mean.tolist())
