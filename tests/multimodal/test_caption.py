import json

import torch

from aigckit.multimodal.caption import CaptionConfig, CaptionModel, _beam, bleu4, build_vocab, generate
from aigckit.train.caption import named_class


def test_bleu4_and_class_naming():
    assert bleu4(["a photo of a red coat"], [["a photo of a red coat"]]) == 1.0
    assert bleu4(["x y z w"], [["a b c d"]]) == 0.0
    mid = bleu4(["a photo of a coat here"], [["a photo of a coat"]])
    assert 0 < mid < 1
    assert named_class("a dark pair of sneakers") == 7
    assert named_class("a photo of a sneaker") == 7
    assert named_class("a photo of an ankle boot") == 9  # "ankle boot" wins over "boot" (both class 9 anyway)
    assert named_class("a dress shirt") == 6  # held-out noun "dress shirt" is longer than "dress"
    assert named_class("a nice thing") is None


def test_decoder_learns_and_beam1_is_greedy():
    torch.manual_seed(0)
    texts = ["a bright coat", "a dark bag"]
    model = CaptionModel(CaptionConfig(vocab=build_vocab(texts), resolution=8, widths=(8,), hidden=32, embed=8))
    x = torch.stack([torch.ones(1, 8, 8), -torch.ones(1, 8, 8)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(60):
        loss = model.loss(x, texts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert generate(model, x) == texts
    assert [_beam(model, model.encode(x[i:i + 1]), 1) for i in range(2)] == texts
    assert generate(model, x, beams=3) == texts
    s = generate(model, x, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert s == generate(model, x, temperature=1.0, generator=torch.Generator().manual_seed(0))


def test_caption_train_and_cli(fake_home, tmp_path, capsys):
    from aigckit.cli import main
    from aigckit.image.io import save_png, to_pil

    assert main(["caption-train", "--out", str(tmp_path / "cap"), "--steps", "2", "--size", "tiny",
                 "--batch-size", "8", "--eval-n", "20", "--quiet"]) == 0
    rep = json.loads((tmp_path / "cap" / "eval.json").read_text())
    assert rep["n"] == 20 and 0 <= rep["names_right_class"] <= 1
    img = tmp_path / "x.png"
    save_png(to_pil(torch.zeros(1, 1, 28, 28))[0], img)
    capsys.readouterr()
    assert main(["caption", str(img), "--model", str(tmp_path / "cap"), "--json", "--beams", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["image"] == str(img) and isinstance(out[0]["caption"], str)
    assert main(["caption", str(img), "--model", str(tmp_path / "cap"), "--beams", "2", "--temperature", "1"]) == 2
    assert main(["caption", "--model", str(tmp_path / "cap")]) == 2


def test_shapes_caption_eval_and_grey_detection(tmp_path):
    from aigckit.image.io import save_png, to_pil
    from aigckit.multimodal import shapes as S
    from aigckit.multimodal.io import is_grey
    from aigckit.train.caption import evaluate_shapes_captioner

    texts = S.train_captions().texts[1:]
    model = CaptionModel(CaptionConfig(vocab=build_vocab(texts), resolution=32, channels=3, widths=(8,), hidden=16,
                                       embed=8, max_len=4))
    rep = evaluate_shapes_captioner(model, n=4)
    assert rep["seen"]["exact"] == 0.0 and 0 <= rep["heldout"]["bleu4"] <= 1  # an untrained decoder
    import random

    img = S.render(S.Scene(S.Obj("red", "circle", "large")), random.Random(0))
    save_png(to_pil(img[None].float() / 127.5 - 1)[0], tmp_path / "red.png")
    save_png(to_pil(torch.zeros(1, 1, 8, 8))[0], tmp_path / "grey.png")
    assert not is_grey(tmp_path / "red.png") and is_grey(tmp_path / "grey.png")
