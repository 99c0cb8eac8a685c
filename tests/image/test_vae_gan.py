import pytest
import torch

from aigckit.errors import AigcError
from aigckit.image.dcgan import DCGAN, DCGANConfig
from aigckit.image.vae import VAE, VAEConfig
from aigckit.train.gan import Trainer as GanTrainer


@pytest.mark.parametrize("res", [28, 32])
def test_vae_shapes_loss_and_step(res):
    torch.manual_seed(0)
    m = VAE(VAEConfig(resolution=res, hidden=8, fc=32, latent_dim=4, num_classes=10))
    x = torch.rand(6, 1, res, res) * 2 - 1
    y = torch.arange(6)
    mu, logvar = m.encode(x, y)
    assert mu.shape == logvar.shape == (6, 4)
    assert m.decode(mu, y).shape == x.shape
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = m.loss(x, y, g())
    assert out["loss"].item() == pytest.approx(out["rec"].item() + out["kl"].item(), rel=1e-5)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = out["loss"].item()
    for _ in range(10):
        loss = m.loss(x, y, g())["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.loss(x, y, g())["loss"].item() < first
    assert m.sample(3, torch.tensor([1, 2, 3])).shape == (3, 1, res, res)
    assert m.interpolate(x[:1], x[1:2], 5, torch.tensor([0])).shape == (5, 1, res, res)
    with pytest.raises(AigcError, match="conditional"):
        m.sample(2)


@pytest.mark.parametrize("res", [28, 32, 64])
def test_dcgan_shapes(res):
    m = DCGAN(DCGANConfig(resolution=res, ngf=8, ndf=8, nz=16))
    z = torch.randn(4, 16, 1, 1)
    img = m.generator(z)
    assert img.shape == (4, 1, res, res) and img.abs().max() <= 1
    assert m.discriminator(img).shape == (4,)
    assert m.interpolate(z[:1], z[1:2], 6).shape == (6, 1, res, res)


def test_dcgan_init_and_wrong_resolution():
    m = DCGAN(DCGANConfig(resolution=28, ngf=16, ndf=16, nz=16))
    w = m.generator.net[0].weight
    assert abs(w.std().item() - 0.02) < 0.005
    with pytest.raises(AigcError, match="28, 32 or 64"):
        DCGANConfig(resolution=30)


def test_dcgan_step_changes_weights_and_discriminator_learns():
    torch.manual_seed(0)
    m = DCGAN(DCGANConfig(resolution=28, ngf=8, ndf=8, nz=16, num_classes=10))
    tr = GanTrainer()

    class A:
        lr = None
    opts = tr.optimizers(m, A())
    x = torch.rand(16, 1, 28, 28) * 2 - 1
    y = torch.arange(16) % 10
    before = [p.detach().clone() for p in m.parameters()]
    gen = torch.Generator().manual_seed(0)
    first = tr.step(m, opts, x, y, gen)
    assert all(k in first for k in ("loss_d", "loss_g"))
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    for _ in range(5):
        last = tr.step(m, opts, x, y, gen)
    assert last["loss_d"] < first["loss_d"]  # D separates this fixed real batch from early fakes
