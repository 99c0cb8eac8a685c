import json

import pytest
import torch

from aigckit.errors import AigcError
from aigckit.multimodal.animate import slerp
from aigckit.multimodal.clip import ClipConfig, ClipModel, zero_shot



def test_clip_loss_learns_to_pair_images_with_texts():
    """Four image 'classes' (a bright quadrant each) with four text vectors: a few steps of the symmetric loss make
    zero-shot classification right; identical captions in a batch are not negatives."""
    torch.manual_seed(0)
    model = ClipModel(ClipConfig(resolution=8, widths=(8,), embed_dim=8, text_dim=6))
    texts = torch.randn(4, 6)
    x = -torch.ones(64, 1, 8, 8)
    y = torch.arange(64) % 4
    for i in range(64):
        r, c = divmod(int(y[i]), 2)
        x[i, 0, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = 1.0
    x = x + 0.1 * torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = (zero_shot(model, x, texts) == y).float().mean().item()
    for _ in range(60):
        loss = model.loss(x, texts[y], same=y[:, None] == y[None, :])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert (zero_shot(model, x, texts) == y).float().mean().item() == 1.0 > before


def test_slerp_endpoints_and_norm():
    a, b = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert mid.norm() > 0.9 * min(a.norm(), b.norm())  # a lerp would shrink towards zero


def test_clip_train_cli_and_animation(fake_home, t2i_run, tmp_path, capsys):
    from aigckit.cli import main
    from aigckit.image.io import read_png_metadata, save_png, to_pil

    assert main(["clip", "train", "--out", str(tmp_path / "clip"), "--steps", "3", "--size", "tiny",
                 "--batch-size", "16", "--eval-n", "200", "--quiet"]) == 0
    rep = json.loads((tmp_path / "clip" / "eval.json").read_text())
    assert 0 <= rep["zero_shot_accuracy"] <= 1 and rep["retrieval_n"] == 1000
    img = tmp_path / "x.png"
    save_png(to_pil(torch.zeros(1, 1, 28, 28))[0], img)
    capsys.readouterr()
    assert main(["clip", "score", str(tmp_path / "clip"), str(img), "--text", "a coat", "--text", "a bag",
                 "--json"]) == 0
    ranking = json.loads(capsys.readouterr().out)[0]["ranking"]
    assert sorted(r["text"] for r in ranking) == ["a bag", "a coat"]
    assert ranking[0]["score"] >= ranking[1]["score"]
    assert main(["clip", "search", str(tmp_path / "clip"), "a coat", str(img), str(tmp_path / "nope.png")]) == 2

    # an animation between two prompts of the tiny text-to-image run
    run = t2i_run
    out = tmp_path / "walk.gif"
    assert main(["image", "animate", str(run), "--prompt", "a coat", "--prompt", "a bag", "--frames", "3",
                 "--steps", "2", "--out", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.n_frames == 3
    meta = read_png_metadata(tmp_path / "walk_frames" / "0002.png")
    assert meta["to"] == "a bag" and json.loads(meta["s"]) == 1.0
    assert main(["image", "animate", str(run), "--prompt", "a coat", "--out", str(out)]) == 2
    with pytest.raises(AigcError):
        from aigckit.multimodal.animate import save_animation
        save_animation(torch.zeros(2, 1, 4, 4), [{}, {}], tmp_path / "a.mp4")
