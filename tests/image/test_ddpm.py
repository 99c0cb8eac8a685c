import math

import pytest
import torch

from aigckit.errors import AigcError
from aigckit.image.diffusion import (DiffusionConfig, DiffusionModel, ddim_step, ddim_timesteps, ddpm_step,
                                     make_schedule, min_snr_weight, predict_x0, q_sample, sample, to_eps,
                                     v_target)
from aigckit.image.unet import UNet, UNetConfig


TINY = dict(base=8, mults=(1, 2), num_res_blocks=1, attn_levels=(1,), groups=4)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedules(kind):
    s = make_schedule(kind, 1000)
    assert s.T == 1000
    assert (s.betas > 0).all() and (s.betas < 1).all()
    assert (s.alpha_bars[1:] < s.alpha_bars[:-1]).all()
    assert s.alpha_bars[0] > 0.99 and s.alpha_bars[-1] < 1e-3


def test_forward_noising_statistics():
    s = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 0.5)
    for t in (0, 250, 999):
        xt = q_sample(s, x0, t, torch.randn(x0.shape, generator=g))
        ab = s.alpha_bars[t].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.5, abs=0.02)
        assert xt.var().item() == pytest.approx(1 - ab, abs=0.02 + 0.03 * (1 - ab))


def test_v_and_eps_conversions_are_consistent():
    s = make_schedule("cosine", 100)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    xt = q_sample(s, x0, t, eps)
    torch.testing.assert_close(to_eps(s, xt, v_target(s, x0, t, eps), t, "v"), eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(predict_x0(s, xt, eps, t), x0, atol=1e-3, rtol=1e-3)


def test_ddim_eta0_is_deterministic_and_eta1_equals_ddpm():
    s = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    for t in (999, 500, 10):
        a = ddim_step(x, eps, t, t - 1, schedule=s, eta=0.0, generator=torch.Generator().manual_seed(1))
        b = ddim_step(x, eps, t, t - 1, schedule=s, eta=0.0, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b)  # no noise at eta = 0
        # with eta = 1 and consecutive steps, DDIM's σ² is DDPM's posterior variance β̃_t: same step, same noise
        torch.testing.assert_close(ddim_step(x, eps, t, t - 1, schedule=s, eta=1.0, noise=z),
                                   ddpm_step(x, eps, t, schedule=s, noise=z), atol=1e-5, rtol=1e-5)


def test_ddim_1000_steps_matches_ddpm_paths():
    """With an exact denoiser for data at one point x*:
    - DDIM with eta=1 over all 1000 steps reproduces DDPM's ancestral path (same noise) within float tolerance;
    - each deterministic DDIM step (eta=0) lands within 0.03 of DDPM's posterior mean μ̃_t, and both
      deterministic paths (DDIM eta=0, DDPM posterior mean without noise) end at x*.
    (The two deterministic paths differ in between: the noise-free mean path drops the noise component faster.)"""
    s = make_schedule("linear", 1000)
    x_star = torch.tensor([[0.3, -0.7, 0.9, 0.0]])

    def oracle_eps(x, t):
        ab = s.alpha_bars[t].item()
        return (x - math.sqrt(ab) * x_star) / math.sqrt(1 - ab)

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(1, 4, generator=g)
    noises = torch.randn(1000, 1, 4, generator=g)
    ts = ddim_timesteps(1000, 1000)
    assert ts == list(range(999, -1, -1))
    xa, xb, xd, xp = (x_T.clone() for _ in range(4))
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        xa = ddim_step(xa, oracle_eps(xa, t), t, t_prev, schedule=s, eta=1.0, noise=noises[i])
        xb = ddpm_step(xb, oracle_eps(xb, t), t, schedule=s, noise=noises[i])
        torch.testing.assert_close(xa, xb, atol=1e-4, rtol=1e-4)
        one_d = ddim_step(xd, oracle_eps(xd, t), t, t_prev, schedule=s, eta=0.0)
        one_p = ddpm_step(xd, oracle_eps(xd, t), t, schedule=s, noise=torch.zeros_like(xd))
        assert (one_d - one_p).abs().max() < 0.03
        xd = one_d
        xp = ddpm_step(xp, oracle_eps(xp, t), t, schedule=s, noise=torch.zeros_like(xp))
    for x in (xa, xd, xp):
        torch.testing.assert_close(x, x_star, atol=1e-4, rtol=0)


def test_ddim_timesteps_any_count():
    assert ddim_timesteps(1000, 1) == [999]
    assert ddim_timesteps(1000, 50)[0] == 999 and ddim_timesteps(1000, 50)[-1] == 0
    assert len(ddim_timesteps(1000, 50)) == 50
    with pytest.raises(AigcError):
        ddim_timesteps(1000, 0)


@pytest.mark.parametrize("res,classes", [(28, 0), (32, 10), (16, 3)])
def test_unet_shapes(res, classes):
    m = UNet(UNetConfig(resolution=res, channels=1, num_classes=classes, **TINY))
    x = torch.randn(3, 1, res, res)
    y = torch.tensor([0, 1, 2]) if classes else None
    assert m(x, torch.tensor([0, 5, 999]), y).shape == x.shape


def test_wrong_resolution_raises():
    with pytest.raises(AigcError, match="divisible"):
        UNetConfig(resolution=30, mults=(1, 2, 2))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_steps_reduce_loss_on_fixed_batch(prediction):
    torch.manual_seed(0)
    cfg = DiffusionConfig(unet=UNetConfig(resolution=8, num_classes=2, **TINY), timesteps=100, prediction=prediction)
    m = DiffusionModel(cfg)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 1] * 4)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    before = [p.detach().clone() for p in m.parameters()]

    def fixed_loss():
        return m.loss(x0, y, torch.Generator().manual_seed(0)).item()

    first = fixed_loss()
    for i in range(30):
        loss = m.loss(x0, y, torch.Generator().manual_seed(i % 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert fixed_loss() < first


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weighting(prediction):
    sched = make_schedule("cosine", 1000)
    t = torch.tensor([0, 100, 500, 900, 999])
    snr = sched.alpha_bars[t] / (1 - sched.alpha_bars[t])
    w = min_snr_weight(sched, t, 5.0, prediction)
    want = [min(s, 5.0) / (s if prediction == "eps" else s + 1) for s in snr.tolist()]
    torch.testing.assert_close(w, torch.tensor(want, dtype=torch.float32))
    assert w[0] < 0.01 and (w[-1] == 1.0 if prediction == "eps" else w[-1] < 1.0)  # t = 0: SNR ~ 1e4, clipped
    # the model's loss is the weighted mean of the per-image errors at the drawn t (same draws as the simple loss)
    torch.manual_seed(0)
    unet = UNetConfig(resolution=8, **TINY)
    plain = DiffusionModel(DiffusionConfig(unet=unet, prediction=prediction))
    weighted = DiffusionModel(DiffusionConfig(unet=unet, prediction=prediction, min_snr_gamma=5.0))
    weighted.load_state_dict(plain.state_dict())
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(1)
    tt = torch.randint(0, 1000, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = q_sample(plain.schedule, x0, tt, eps)
    target = eps if prediction == "eps" else v_target(plain.schedule, x0, tt, eps)
    with torch.no_grad():
        err = ((plain(x_t, tt) - target) ** 2).flatten(1).mean(1)
        got = weighted.loss(x0, None, torch.Generator().manual_seed(1))
        simple = plain.loss(x0, None, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, (err * min_snr_weight(plain.schedule, tt, 5.0, prediction)).mean())
    torch.testing.assert_close(simple, err.mean())
    with pytest.raises(AigcError, match="min_snr_gamma"):
        DiffusionConfig(unet=unet, min_snr_gamma=-1)


def test_sample_with_guidance_is_seeded_and_bounded():
    torch.manual_seed(0)
    m = DiffusionModel(DiffusionConfig(unet=UNetConfig(resolution=8, num_classes=3, **TINY), timesteps=50)).eval()
    y = torch.tensor([0, 1, 2])
    a = sample(m, 3, labels=y, guidance=3.0, steps=5, generator=torch.Generator().manual_seed(1))
    b = sample(m, 3, labels=y, guidance=3.0, steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 1, 8, 8) and a.abs().max() <= 1
    d = sample(m, 3, labels=y, guidance=3.0, steps=5, generator=torch.Generator().manual_seed(1), dtype="bfloat16")
    assert d.dtype == torch.float32 and (d - a).abs().mean() < 0.2  # bf16 network, float32 sampler arithmetic
    c = sample(m, 2, sampler="ddpm", generator=torch.Generator().manual_seed(1))
    assert c.shape == (2, 1, 8, 8)
    with pytest.raises(AigcError, match="ddpm sampler"):
        sample(m, 2, sampler="ddpm", steps=10)
