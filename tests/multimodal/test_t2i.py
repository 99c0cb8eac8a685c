import json

import pytest
import torch

from aigckit.errors import AigcError
from aigckit.image.diffusion import DiffusionConfig, DiffusionModel, sample
from aigckit.image.unet import TextCondition, UNet, UNetConfig

from .mmutil import FakeEncoder

TINY_TEXT = dict(base=8, mults=(1, 2), num_res_blocks=1, attn_levels=(1,), groups=4, context_dim=16, cross_levels=(1,),
                 heads=2)


def _model(seed=0, **kw) -> DiffusionModel:
    torch.manual_seed(seed)
    m = DiffusionModel(DiffusionConfig(unet=UNetConfig(resolution=8, **{**TINY_TEXT, **kw}), timesteps=50))
    for blk in m.unet.modules():  # zero-initialised output layers would hide the text path: randomise them
        if hasattr(blk, "proj") and isinstance(blk.proj, torch.nn.Conv2d):
            torch.nn.init.normal_(blk.proj.weight, std=0.2)
    torch.nn.init.normal_(m.unet.conv_out.weight, std=0.2)
    return m.eval()


def test_text_changes_the_prediction_and_padding_does_not():
    m, enc = _model(), FakeEncoder()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 40])
    a, b = enc.encode(["a red coat", "a blue bag"]), enc.encode(["a blue bag", "a red coat"])
    with torch.no_grad():
        out_a, out_b = m(x, t, text=a), m(x, t, text=b)
        assert not torch.allclose(out_a, out_b, atol=1e-4)
        # padding tokens (mask False) with garbage states change nothing
        pad = TextCondition(torch.cat([a.tokens, 100 * torch.randn(2, 5, 16)], 1),
                            torch.cat([a.mask, torch.zeros(2, 5, dtype=torch.bool)], 1), a.pooled)
        torch.testing.assert_close(m(x, t, text=pad), out_a, atol=1e-5, rtol=1e-5)
        # the cross-attention path matters on its own (same pooled vector, other tokens)
        swapped = TextCondition(b.tokens, b.mask, a.pooled)
        assert not torch.allclose(m(x, t, text=swapped), out_a, atol=1e-5)


def test_text_model_refuses_missing_text_and_class_model_refuses_text():
    m = _model()
    with pytest.raises(AigcError):
        m(torch.randn(1, 1, 8, 8), torch.tensor([3]))
    cls = DiffusionModel(DiffusionConfig(unet=UNetConfig(resolution=8, base=8, mults=(1, 2), num_res_blocks=1,
                                                         attn_levels=(1,), groups=4, num_classes=3), timesteps=50))
    assert not any("xattn" in k or "text_emb" in k for k in cls.state_dict())  # class models: same weights as before
    with pytest.raises(AigcError):
        sample(cls, 1, text=FakeEncoder().encode(["x"]), negative=FakeEncoder().encode([""]), steps=2)


def test_guidance_with_negative_equal_to_prompt_is_the_conditional_model():
    """ε̂ = ε̂(neg) + w·(ε̂(text) - ε̂(neg)) is ε̂(text) for any w when neg = text; and a negative prompt matters."""
    m, enc = _model(), FakeEncoder()
    text = enc.encode(["a dark coat"]).repeat(2)
    kw = dict(sampler="ddim", steps=5)
    plain = sample(m, 2, text=text, negative=enc.encode([""]).repeat(2), guidance=1.0,
                   generator=torch.Generator().manual_seed(0), **kw)
    same = sample(m, 2, text=text, negative=text, guidance=7.0, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(same, plain, atol=3e-3, rtol=0)  # batch 4 vs 2: other conv blocking
    g_empty = sample(m, 2, text=text, negative=enc.encode([""]).repeat(2), guidance=4.0,
                     generator=torch.Generator().manual_seed(0), **kw)
    g_neg = sample(m, 2, text=text, negative=enc.encode(["a bag"]).repeat(2), guidance=4.0,
                   generator=torch.Generator().manual_seed(0), **kw)
    assert not torch.allclose(g_empty, g_neg, atol=1e-4)
    again = sample(m, 2, text=text, negative=enc.encode(["a bag"]).repeat(2), guidance=4.0,
                   generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(g_neg, again)  # stateless: same inputs, same images
    with pytest.raises(AigcError):
        sample(m, 3, text=text, negative=text, steps=2)  # 2 prompt rows for 3 images


def test_train_sample_cli_and_png_metadata(t2i_run, tmp_path, capsys):
    """A few steps of `aigc image train --condition text` on captioned Fashion-MNIST (fake text encoder, see
    conftest), then sampling by prompt through the API and the CLI; the prompt lands in the PNG metadata."""
    from aigckit.cli import main
    from aigckit.image.api import load_image_model
    from aigckit.image.io import read_png_metadata

    run = t2i_run
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["unet"]["context_dim"] == 16 and cfg["model"]["text_encoder"] == "minilm-l6-v2"
    assert (run / "samples.png").exists()

    m = load_image_model(run)
    assert m.text_conditioned
    out = m.sample(4, prompts=["a coat", "a pair of trainers"], negative_prompt="a bag", seed=1, steps=3)
    assert out.tensor.shape == (4, 1, 28, 28)
    assert out.prompts == ["a coat", "a coat", "a pair of trainers", "a pair of trainers"]
    with pytest.raises(AigcError, match="multiple"):
        m.sample(3, prompts=["a", "b"], steps=2)
    with pytest.raises(AigcError, match="text-conditioned"):
        m.sample(2, classes="coat", steps=2)

    assert main(["image", "sample", str(run), "--prompt", "a dark coat", "--negative-prompt", "a bag", "--n", "2",
                 "--steps", "2", "--seed", "0", "--per-image", "--out", str(tmp_path / "imgs")]) == 0
    meta = read_png_metadata(tmp_path / "imgs" / "00001.png")
    assert meta["prompt"] == "a dark coat" and meta["negative_prompt"] == "a bag"
    assert main(["image", "sample", str(run), "--class", "coat", "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "text-conditioned" in capsys.readouterr().err


def test_caption_bank_is_cached_and_conditions_pad(fake_home):
    from aigckit import store
    from aigckit.multimodal.textcond import CaptionBank

    enc = FakeEncoder()
    texts = ["", "a coat", "a long dark coat on a black background"]
    before = set(store.cache_dir("captions").glob("*.safetensors"))
    a = CaptionBank.build(texts, enc)
    after = set(store.cache_dir("captions").glob("*.safetensors"))
    assert len(after - before) == 1
    b = CaptionBank.build(texts, enc)  # read back from the cache
    assert set(store.cache_dir("captions").glob("*.safetensors")) == after
    assert torch.equal(a.cond.tokens, b.cond.tokens) and torch.equal(a.cond.mask, b.cond.mask)
    one = b.take(torch.tensor([1]))
    assert one.tokens.dtype == torch.float32 and one.mask[0].sum() == 4  # [cls] a coat [sep]
    both = TextCondition.cat([enc.encode(["a"]), enc.encode(["a b c d"])])
    assert both.tokens.shape[:2] == (2, 6) and both.mask.sum(1).tolist() == [3, 6]
    assert len(both.repeat(3)) == 6 and torch.equal(both.repeat(3)[2].pooled, both[0].pooled)


def test_prompt_sequence_cycles_classes_over_heldout_phrasings():
    from aigckit.eval.evaluate import prompt_sequence
    from aigckit.multimodal.captions import heldout_prompts, seen_prompts

    assert prompt_sequence(10, phrasings="training")[0] == [p for p, _ in seen_prompts(1)]
    with pytest.raises(AigcError, match="phrasings"):
        prompt_sequence(10, phrasings="other")
    prompts, labels = prompt_sequence(23, seed=0)
    assert labels.tolist() == [i % 10 for i in range(23)]
    allowed = set(heldout_prompts(50, seed=0))
    assert all((p, c) in allowed for p, c in zip(prompts, labels.tolist()))
    assert len(set(prompts[0::10])) == 3  # a class's prompts vary


@pytest.mark.slow
def test_eval_of_a_text_model_samples_heldout_prompts_by_class(t2i_run, fake_home, tmp_path):
    """`aigc image eval` on a text-to-image run: FID beside the floor, and class accuracy from held-out prompts."""
    from aigckit.eval.classifier import train_classifier
    from aigckit.eval.evaluate import evaluate_run

    clf = train_classifier(epochs=1, limit=256, threads=1, progress=False, store_dir=tmp_path / "clf")
    rep = evaluate_run(t2i_run, n=20, steps=2, progress=False, reference_n=500, classifier_path=clf)
    assert rep["fid"] > 0 and rep["floor"]["n"] == 20 and rep["prompts"].startswith("held-out")
    assert len(rep["class_accuracy_per_class"]) == 10 and "trouser" in rep["class_accuracy_per_class"]
    assert sum(rep["predicted_class_histogram"]) == 20


def test_seen_prompts_are_attribute_free_training_captions():
    from aigckit.multimodal.captions import heldout_prompts, seen_prompts, train_captions

    caps = train_captions()
    pairs = seen_prompts(4, seed=1)
    assert [c for _, c in pairs] == [c for c in range(10) for _ in range(4)]
    assert all(caps.texts.index(p) in caps.choices[3 * c] for p, c in pairs)
    assert not {p for p, _ in pairs} & {p for p, _ in heldout_prompts(50)}
