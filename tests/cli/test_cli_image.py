import json

import pytest
import torch

from aigckit.cli import main
from aigckit.errors import AigcError
from aigckit.image.io import read_png_metadata
from imageutil import needs_data




def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys):
    assert main(["image", "train", "--model", "gan9", "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    assert "unknown model" in _err(capsys)
    assert main(["image", "train", "--model", "vae", "--data", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "r"), "--steps", "1"]) == 2
    assert "not found" in _err(capsys)
    assert main(["image", "sample", str(tmp_path / "norun"), "--out", str(tmp_path / "g.png")]) == 2
    assert "not found" in _err(capsys)
    assert main(["image", "train", "--model", "vae", "--out", str(tmp_path / "r")]) == 2
    assert "--steps" in _err(capsys)


@needs_data
def test_wrong_resolution_is_one_line(tmp_path, capsys):
    assert main(["image", "train", "--model", "dcgan", "--resolution", "30", "--out", str(tmp_path / "r"),
                 "--steps", "1", "--quiet"]) == 2
    assert "28, 32 or 64" in _err(capsys)
    assert main(["image", "train", "--model", "ddpm", "--resolution", "30", "--out", str(tmp_path / "r"),
                 "--steps", "1", "--quiet"]) == 2
    assert "divisible" in _err(capsys)


@needs_data
def test_train_sample_and_corrupt_checkpoint(tmp_path, capsys):
    run = tmp_path / "ddpm"
    assert main(["image", "train", "--model", "ddpm", "--size", "tiny", "--conditional", "--out", str(run),
                 "--steps", "2", "--batch-size", "8", "--timesteps", "50", "--grid-n", "4", "--min-snr-gamma", "5",
                 "--quiet"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["min_snr_gamma"] == cfg["train"]["min_snr_gamma"] == 5.0
    assert main(["image", "train", "--model", "ddpm", "--out", str(run), "--steps", "2", "--quiet"]) == 2
    assert "--resume" in _err(capsys)
    grid = tmp_path / "g.png"
    assert main(["image", "sample", str(run), "--n", "4", "--out", str(grid), "--class", "sneaker",
                 "--steps", "3", "--guidance", "2", "--seed", "5"]) == 0
    meta = read_png_metadata(grid)
    assert meta["model"] == "ddpm" and meta["seed"] == "5" and meta["sampler"] == "ddim"
    assert meta["steps"] == "3" and json.loads(meta["guidance"]) == 2.0 and json.loads(meta["classes"]) == ["sneaker"]
    assert main(["image", "sample", str(run), "--n", "3", "--out", str(tmp_path / "each"), "--per-image",
                 "--steps", "2", "--seed", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert main(["image", "sample", str(run), "--n", "2", "--out", str(grid), "--class", "hat"]) == 2
    assert "unknown class" in _err(capsys)
    assert main(["image", "interpolate", str(run), "--out", str(grid)]) == 2
    assert "vae and dcgan" in _err(capsys)
    assert main(["image", "sample", str(run), "--n", "2", "--out", str(grid), "--temperature", "0.5"]) == 2
    assert "temperature applies to VAE and GAN" in _err(capsys)
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    (ckpt / "ema.safetensors").write_bytes(b"not a safetensors file")
    assert main(["image", "sample", str(run), "--n", "2", "--out", str(grid)]) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()  # the only checkpoint is damaged
    assert warning.startswith(f"aigc: warning: skipping damaged checkpoint {ckpt.name}: ema.safetensors")
    assert error.startswith("aigc: error: ") and "no intact checkpoint" in error
    assert main(["image", "sample", str(ckpt), "--n", "2", "--out", str(grid)]) == 2  # that checkpoint itself
    assert "ema.safetensors" in _err(capsys)


@needs_data
def test_resume_takes_the_runs_own_options(tmp_path, capsys):
    run = tmp_path / "vae"
    assert main(["image", "train", "--model", "vae", "--size", "tiny", "--conditional", "--out", str(run),
                 "--steps", "1", "--batch-size", "8", "--grid-n", "4", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["image", "train", "--out", str(run), "--resume", "--model", "ddpm", "--steps", "2"]) == 2
    assert "is a vae run, not ddpm" in _err(capsys)
    assert main(["image", "train", "--out", str(run), "--resume", "--steps", "2", "--quiet"]) == 0  # no --model
    assert capsys.readouterr().out.strip().endswith("step-000000002")
    assert json.loads((run / "config.json").read_text())["train"]["conditional"] is True
    assert main(["image", "train", "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    assert "give --model" in _err(capsys)


@needs_data
def test_api_sample_and_interpolate(tmp_path):
    from aigckit import load_image_model

    for family in ("vae", "dcgan"):
        run = tmp_path / family
        assert main(["image", "train", "--model", family, "--size", "tiny", "--out", str(run), "--steps", "2",
                     "--batch-size", "8", "--grid-n", "4", "--quiet"]) == 0
        m = load_image_model(run)
        out = m.sample(5, seed=0)
        assert out.tensor.shape == (5, 1, 28, 28) and len(out.images) == 5
        assert (out.tensor == m.sample(5, seed=0).tensor).all()
        assert m.interpolate(6, seed=1).tensor.shape == (6, 1, 28, 28)
        # temperature scales the latent: near 0 every seed decodes the same (the prior's mean), at 1 they differ
        cold = [m.sample(2, seed=s, temperature=1e-6).tensor for s in (1, 2)]
        assert torch.allclose(cold[0], cold[1], atol=1e-4)
        assert not torch.allclose(m.sample(2, seed=1).tensor, m.sample(2, seed=2).tensor, atol=1e-4)
        assert m.sample(2, seed=1, temperature=0.5).params["temperature"] == 0.5
        with pytest.raises(AigcError, match="temperature"):
            m.sample(2, temperature=0)
    g = tmp_path / "cold.png"
    assert main(["image", "sample", str(tmp_path / "vae"), "--n", "2", "--temperature", "0.7", "--out", str(g)]) == 0
    assert json.loads(read_png_metadata(g)["temperature"]) == 0.7
    assert main(["image", "interpolate", str(tmp_path / "vae"), "--steps", "4", "--rows", "2",
                 "--out", str(tmp_path / "i.png")]) == 0


def test_train_on_rgb_image_folder(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from aigckit import load_image_model

    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(0)
    for i in range(24):
        d = tmp_path / "pics" / ("red" if i % 2 else "blue")
        d.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
        a[..., 0 if i % 2 else 2] += 180
        Image.fromarray(a).save(d / f"{i}.jpg" if i % 3 else d / f"{i}.png")
    run = tmp_path / "rgb"
    assert main(["image", "train", "--model", "ddpm", "--data", str(tmp_path / "pics"), "--resolution", "16",
                 "--size", "tiny", "--conditional", "--out", str(run), "--steps", "2", "--batch-size", "4",
                 "--timesteps", "20", "--grid-n", "4", "--quiet"]) == 0
    m = load_image_model(run)
    assert m.class_names == ["blue", "red"]
    out = m.sample(2, classes="red", steps=3, seed=0)
    assert out.tensor.shape == (2, 3, 16, 16) and out.images[0].mode == "RGB"
