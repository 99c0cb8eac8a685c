"""The ClipCap captioner: an image prefix for a frozen language model, decoded by the text engine."""

from __future__ import annotations

import json

import torch

from aigckit.multimodal.caption import load_captioner
from aigckit.multimodal.prefixcap import PrefixCaptionConfig, PrefixCaptioner, PrefixMapper
from aigckit.text.lm import load_lm


def test_prefix_learns_captions_and_the_lm_stays_frozen(tiny_llama_dir):
    # A random tiny LM's layers barely move its residual stream, so the prefix can choose the first caption token
    # but not steer later ones: one-word captions, and the end token (the LM's own doing) is not generated. Its
    # small random head also caps how confident it can get (loss floor ~3.2 of 4.6 at the start).
    torch.manual_seed(0)
    lm = load_lm(str(tiny_llama_dir), kernels="torch")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg = PrefixCaptionConfig(lm=str(tiny_llama_dir), lm_dim=64, prefix_len=2, resolution=8, widths=(8,), hidden=32,
                              max_new_tokens=1)
    cap = PrefixCaptioner(PrefixMapper(cfg), lm)
    texts = ["w5", "w7"]
    x = torch.stack([torch.ones(1, 8, 8), -torch.ones(1, 8, 8)])
    opt = torch.optim.Adam(cap.mapper.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        loss = cap.loss(x, texts)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())  # frozen
    assert all(p.grad is None for p in lm.model.parameters())
    assert cap.describe(x) == texts  # greedy, through the engine's prefill with the prefix
    assert cap.describe(x, beams=3) == texts
    s = cap.describe(x, temperature=1.0, seed=4)
    assert s == cap.describe(x, temperature=1.0, seed=4) and len(s) == 2


def test_prefix_caption_train_and_cli(fake_home, tiny_llama_dir, tmp_path, capsys):
    from aigckit.cli import main
    from aigckit.image.io import save_png, to_pil

    run = tmp_path / "pc"
    assert main(["caption-train", "--out", str(run), "--decoder", "smollm2", "--lm", str(tiny_llama_dir),
                 "--prefix-len", "3", "--steps", "2", "--size", "tiny", "--batch-size", "4", "--eval-n", "8",
                 "--quiet"]) == 0
    capsys.readouterr()
    config = json.loads((run / "config.json").read_text())
    assert config["family"] == "prefix-caption" and config["model"]["prefix_len"] == 3
    rep = json.loads((run / "eval.json").read_text())
    assert rep["n"] == 8 and 0 <= rep["names_right_class"] <= 1
    model, _ = load_captioner(run)
    assert isinstance(model, PrefixCaptioner)
    names = {k for k in __import__("safetensors.torch").torch.load_file(
        str(next((run / "checkpoints").iterdir()) / "model.safetensors"))}
    assert names and all(n.startswith(("encoder.", "map.")) for n in names)  # the language model is not saved
    img = tmp_path / "x.png"
    save_png(to_pil(torch.zeros(1, 1, 28, 28))[0], img)
    for extra in ([], ["--beams", "2"], ["--temperature", "0.8"]):
        assert main(["caption", str(img), "--model", str(run), "--json", *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out[0]["image"] == str(img) and isinstance(out[0]["caption"], str)
    x = torch.zeros(1, 1, 28, 28)
    assert model.describe(x) == model.describe(x)
    assert main(["caption", str(img), "--model", str(run), "--beams", "2", "--temperature", "1"]) == 2
    capsys.readouterr()
    assert main(["caption-eval", str(run), "--n", "6", "--beams", "2"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["n"] == 6 and rep["beams"] == 2 and 0 <= rep["bleu4"] <= 1
    assert main(["caption-eval", str(run), "--n", "0"]) == 2
    assert main(["caption-train", "--out", str(tmp_path / "bad"), "--decoder", "gpt", "--steps", "1"]) == 2
