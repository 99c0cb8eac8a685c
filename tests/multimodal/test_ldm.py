"""Latent diffusion: the autoencoder (round trip, checkpoint reload), an ldm run on captioned Fashion-MNIST that
trains, samples by prompt, resumes bit for bit, and the CLI's one-line errors. Tiny configs, fake text encoder."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from aigckit.errors import AigcError


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_autoencoder_shapes_loss_and_scale():
    from aigckit.image.autoencoder import Autoencoder, AutoencoderConfig, latent_scale

    torch.manual_seed(0)
    for res, ch, mults, lat in ((28, 1, (1, 2, 2), (4, 7, 7)), (32, 3, (1, 2, 2), (4, 8, 8)), (28, 1, (1, 2), (4, 14, 14))):
        ae = Autoencoder(AutoencoderConfig(resolution=res, channels=ch, base=8, mults=mults, groups=4))
        x = torch.rand(3, ch, res, res) * 2 - 1
        mu, logvar = ae.encode(x)
        assert mu.shape == logvar.shape == (3, *lat) == (3, *ae.cfg.latent_shape)
        assert ae.decode(mu).shape == x.shape
        out = ae.loss(x, generator=torch.Generator().manual_seed(0))
        assert set(out) == {"loss", "rec", "kl", "mse"} and torch.isfinite(out["loss"])
        assert torch.allclose(out["loss"], out["rec"] + ae.cfg.kl_weight * out["kl"])
    mu = torch.randn(100, 4, 7, 7) * 3.0
    assert abs(float((mu * latent_scale(mu)).std()) - 1.0) < 1e-6
    with pytest.raises(AigcError, match="divisible"):
        AutoencoderConfig(resolution=30, mults=(1, 2, 2))
    with pytest.raises(AigcError, match="takes 1 x 28"):
        ae = Autoencoder(AutoencoderConfig(base=8, groups=4))
        ae.encode(torch.zeros(1, 3, 28, 28))


def test_samplers_clip_x0_to_a_given_range():
    """Pixels clip x̂_0 to [-1, 1] (clip=True), latents to their own range (clip=B), or not at all (False)."""
    from aigckit.image.diffusion import ddim_step, ddpm_step, make_schedule, predict_x0

    sch = make_schedule("cosine", 50)
    x = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(0)) * 3
    eps = torch.zeros_like(x)
    x0 = predict_x0(sch, x, eps, 10)  # far outside [-1, 1]
    a_prev = sch.alpha_bars[4].item() ** 0.5
    assert torch.allclose(ddim_step(x, eps, 10, 4, schedule=sch, clip=False), ddim_step(x, eps, 10, 4, schedule=sch, clip=0))
    for clip, bound in ((True, 1.0), (2.5, 2.5)):
        out = ddim_step(x, eps, 10, -1, schedule=sch, clip=clip)  # to t = -1: x_prev is x̂_0 itself
        assert torch.allclose(out, x0.clamp(-bound, bound))
        assert ddpm_step(x, eps, 0, schedule=sch, clip=clip).abs().max() <= bound + 1e-6
    assert ddim_step(x, eps, 10, 4, schedule=sch, clip=False).abs().max() > a_prev * 2.5


@pytest.fixture(scope="module")
def ae_run(fake_home, tmp_path_factory):
    """`aigc image train --model autoencoder` on captioned Fashion-MNIST's images: a few steps."""
    from aigckit.train.loop import TrainArgs, train

    run = tmp_path_factory.mktemp("ae") / "run"
    train(TrainArgs(model="autoencoder", out=str(run), data="fashion-mnist-captions", steps=4, batch_size=8,
                    size="tiny", log_every=1, sample_every=1000), progress=False)
    return run


def test_autoencoder_run_reloads_and_reconstructs(ae_run):
    from aigckit import checkpoints as ck
    from aigckit.data.images import load_dataset, to_float
    from aigckit.image.autoencoder import Autoencoder, AutoencoderConfig, load_autoencoder, reconstruction_metrics

    ae, weights = load_autoencoder(ae_run)
    cfg = ck.read_config(weights.parent)
    assert cfg["family"] == "autoencoder" and weights.name == "ema.safetensors"
    again = Autoencoder(AutoencoderConfig(**cfg["model"]))
    ck.load_weights(again, weights)
    x = to_float(load_dataset("fashion-mnist", "test").images[:4])
    assert torch.equal(ae.reconstruct(x), again.reconstruct(x))  # the checkpoint is the whole model
    assert ae.reconstruct(x).shape == x.shape
    m = reconstruction_metrics(ae, load_dataset("fashion-mnist", "test").images[:16])
    assert m["images"] == 16 and m["mse"] > 0 and m["psnr"] == pytest.approx(10 * torch.log10(torch.tensor(4 / m["mse"])).item())
    assert (ae_run / "samples.png").exists()  # originals over reconstructions


@pytest.fixture
def small_data(monkeypatch):
    """Captioned Fashion-MNIST cut to 256 images per split: encoding all 60,000 for the latent cache is the slow
    part of a tiny ldm run, and it is the same code on fewer rows."""
    from aigckit.data.images import ImageDataset
    from aigckit.train import ldm, t2i

    real = t2i.caption_data

    def small(name, split, seed=0):
        ds, caps = real(name, split, seed)
        return ImageDataset(ds.images[:256], ds.labels[:256], [], name=ds.name), caps

    monkeypatch.setattr(t2i, "caption_data", small)
    monkeypatch.setattr(ldm, "caption_data", small)


def _ldm_args(out, **kw):
    from aigckit.train.loop import TrainArgs

    return TrainArgs(**{**dict(model="ldm", out=str(out), data="fashion-mnist-captions", condition="text",
                               batch_size=8, size="tiny", timesteps=20, grid_steps=2, log_every=1, sample_every=1000,
                               ckpt_every=2, vae_steps=3), **kw})


def test_ldm_trains_samples_and_resumes_bit_for_bit(fake_home, ae_run, small_data, tmp_path):
    from aigckit.cli import main
    from aigckit.image.api import load_image_model
    from aigckit.image.io import read_png_metadata
    from aigckit.train.loop import train

    # uninterrupted: the autoencoder is trained first into RUN/autoencoder
    a = train(_ldm_args(tmp_path / "a", steps=5), progress=False)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["family"] == "ldm" and cfg["model"]["autoencoder"]["latent_channels"] == 2
    assert cfg["model"]["unet"]["channels"] == 2 and cfg["model"]["unet"]["resolution"] == 14
    assert cfg["autoencoder"]["weights"].startswith(str(tmp_path / "a" / "autoencoder"))
    assert cfg["autoencoder"]["test_reconstruction"]["images"] == 256
    assert (tmp_path / "a" / "autoencoder" / "config.json").exists() and (tmp_path / "a" / "latents.safetensors").exists()
    mu = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "a" / "latents.safetensors"))["mu"]
    z = mu * cfg["model"]["autoencoder"]["scale_factor"]
    assert abs(float(z.std()) - 1) < 1e-4 and cfg["model"]["latent_clip"] == pytest.approx(float(z.abs().max()))

    # interrupted at step 2 and resumed to 5: the same weights, bit for bit
    train(_ldm_args(tmp_path / "b", steps=2), progress=False)
    b = train(_ldm_args(tmp_path / "b", steps=5), resume=True, progress=False)
    for f in ("model.safetensors", "ema.safetensors", "trainer_state.safetensors"):
        assert _sha(a / f) == _sha(b / f), f

    # sampling decodes: images of the data's shape, by prompt, through the API and the CLI with PNG metadata
    m = load_image_model(tmp_path / "a")
    assert m.text_conditioned and m.family == "ldm" and m.model.cfg.resolution == 28
    out = m.sample(4, prompts=["a coat", "a bag"], negative_prompt="a shirt", seed=0, steps=3, guidance=3)
    assert out.tensor.shape == (4, 1, 28, 28) and out.tensor.abs().max() <= 1
    assert torch.equal(out.tensor, m.sample(4, prompts=["a coat", "a bag"], negative_prompt="a shirt", seed=0,
                                            steps=3, guidance=3).tensor)
    assert main(["image", "sample", str(tmp_path / "a"), "--prompt", "a dark coat", "--n", "2", "--steps", "2",
                 "--guidance", "3", "--seed", "0", "--per-image", "--out", str(tmp_path / "imgs")]) == 0
    meta = read_png_metadata(tmp_path / "imgs" / "00001.png")
    assert meta["prompt"] == "a dark coat" and meta["model"] == "ldm"

    # the server and animate take an ldm run as they take a pixel one
    _serve_and_animate(tmp_path / "a", tmp_path)

    # a given autoencoder (--vae): no first stage in the run folder
    train(_ldm_args(tmp_path / "c", steps=1, vae=str(ae_run)), progress=False)
    assert not (tmp_path / "c" / "autoencoder").exists()
    assert json.loads((tmp_path / "c" / "config.json").read_text())["autoencoder"]["weights"].startswith(str(ae_run))


def _serve_and_animate(run, tmp_path):
    from fastapi.testclient import TestClient

    from aigckit.cli import main
    from aigckit.serve.app import create_app
    from aigckit.serve.models import Registry

    app = create_app(Registry([f"ldm={run}"]), load_in_background=False)
    with TestClient(app) as c:
        info = [m for m in c.get("/v1/models").json()["data"] if m["id"] == "ldm"][0]
        assert info["family"] == "ldm" and info["size"] == "28x28" and info["text_conditioned"] is True
        r = c.post("/v1/images/generations", json={"model": "ldm", "prompt": "a coat", "negative_prompt": "a bag",
                                                    "n": 2, "steps": 2, "guidance": 3, "seed": 1})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["parameters"]["model"] == "ldm"
        r = c.post("/v1/images/generations", json={"model": "ldm", "prompt": "a coat", "size": "7x7"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "size"
    assert main(["image", "animate", str(run), "--prompt", "a coat", "--prompt", "a bag", "--frames", "2",
                 "--steps", "2", "--out", str(tmp_path / "walk.gif")]) == 0
    assert (tmp_path / "walk.gif").exists()


def test_ldm_cli_errors(fake_home, ae_run, small_data, tmp_path, capsys):
    from aigckit.cli import main

    base = ["image", "train", "--model", "ldm", "--data", "fashion-mnist-captions", "--steps", "1", "--size", "tiny"]
    assert main(base + ["--out", str(tmp_path / "x")]) == 2
    assert "--condition text" in capsys.readouterr().err
    assert main(base + ["--condition", "text", "--vae", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "no autoencoder run" in capsys.readouterr().err
    assert main(base + ["--condition", "text", "--vae", str(tmp_path), "--out", str(tmp_path / "z")]) == 2
    assert "not an autoencoder run" in capsys.readouterr().err
    assert main(["image", "train", "--model", "ddpm", "--vae", str(ae_run), "--steps", "1", "--out",
                 str(tmp_path / "w")]) == 2
    assert "--vae applies to --model ldm" in capsys.readouterr().err
