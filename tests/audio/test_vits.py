"""Our VITS on tiny random models: shapes, determinism, masks and windows, and the two tricky blocks (relative
attention, rational-quadratic spline) against independent straightforward implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aigckit.audio.vits import (MultiHeadAttention, VitsConfig, VitsModel, rational_quadratic_spline_inverse,
                                sequence_mask)
from aigckit.errors import AigcError
from audioutil import tiny_config, tiny_model


def test_config_validation():
    with pytest.raises(AigcError, match="n_heads"):
        VitsConfig(hidden_channels=10, n_heads=3)
    with pytest.raises(AigcError, match="resblock"):
        VitsConfig(resblock="1")
    with pytest.raises(AigcError, match="upsample_rates"):
        VitsConfig(upsample_rates=(8, 8), upsample_kernel_sizes=(16, 16, 8))
    assert VitsConfig().hop_length == 256
    assert tiny_config().hop_length == 8


def test_infer_shapes_and_alignment():
    model = tiny_model()
    ids = torch.randint(0, model.cfg.n_vocab, (1, 23))
    audio, align = model.infer(ids, generator=torch.Generator().manual_seed(0))
    n = int(align.frame_lengths[0])
    assert align.durations.shape == (1, 23) and int(align.durations.sum()) == n
    assert bool((align.durations >= 1).all())  # the tiny model's durations are 1..4 frames
    assert audio.shape == (1, n * model.cfg.hop_length)
    assert audio.abs().max() <= 1.0 and audio.std() > 0


def test_seeded_and_explicit_noise_are_deterministic():
    model = tiny_model()
    ids = torch.randint(0, model.cfg.n_vocab, (1, 17))
    a1, _ = model.infer(ids, generator=torch.Generator().manual_seed(5))
    a2, _ = model.infer(ids, generator=torch.Generator().manual_seed(5))
    a3, _ = model.infer(ids, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a1, a2)
    assert a1.shape != a3.shape or not torch.equal(a1, a3)
    # the generator path is exactly "draw dp noise, then z noise of the aligned length"
    g = torch.Generator().manual_seed(5)
    noise_dp = torch.randn(1, 2, 17, generator=g)
    a4, _ = model.infer(ids, noise_dp=noise_dp, noise_z=lambda shape: torch.randn(shape, generator=g))
    assert torch.equal(a1, a4)
    with pytest.raises(AigcError, match="noise_z must have shape"):
        model.infer(ids, noise_dp=noise_dp, noise_z=torch.zeros(1, 8, 1))


def test_noise_scales_matter_and_zero_noise_is_deterministic():
    model = tiny_model()
    ids = torch.randint(0, model.cfg.n_vocab, (1, 12))
    z0a, _ = model.infer(ids, noise_scale=0, noise_w=0, generator=torch.Generator().manual_seed(1))
    z0b, _ = model.infer(ids, noise_scale=0, noise_w=0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(z0a, z0b)  # no noise: the seed cannot matter
    slow, al_slow = model.infer(ids, noise_scale=0, noise_w=0, length_scale=2.0)
    assert int(al_slow.frame_lengths) > int(model.infer(ids, noise_scale=0, noise_w=0)[1].frame_lengths)


def test_padded_batch_equals_items():
    model = tiny_model()
    a = torch.randint(3, model.cfg.n_vocab, (9,))
    b = torch.randint(3, model.cfg.n_vocab, (14,))
    ids = torch.zeros(2, 14, dtype=torch.long)
    ids[0, :9], ids[1] = a, b
    batch, align = model.infer(ids, torch.tensor([9, 14]), noise_scale=0, noise_w=0)
    for i, x in enumerate((a, b)):
        single, al = model.infer(x[None], noise_scale=0, noise_w=0)
        n = single.shape[1]
        assert int(align.frame_lengths[i]) * model.cfg.hop_length == n
        torch.testing.assert_close(batch[i, :n], single[0], atol=3e-4, rtol=0)  # float32 rounding, |audio| <= 1
        assert not batch[i, n:].any()  # padding is silent


def test_decoder_padding_and_windows_are_exact():
    model = tiny_model()
    dec = model.dec
    z = torch.randn(1, model.cfg.inter_channels, 70)
    hop = model.cfg.hop_length
    with torch.inference_mode():
        full = dec(z)
        padded = dec(F.pad(z, (0, 26)), [70])
        torch.testing.assert_close(padded[..., :70 * hop], full, atol=1e-5, rtol=0)
        M = dec.receptive_field()
        # a window with M frames of context each side reproduces the middle; with too little it does not
        a, b = 30, 40
        win = dec(z[..., a - M:b + M])[..., M * hop:(M + b - a) * hop]
        torch.testing.assert_close(win, full[..., a * hop:b * hop], atol=1e-5, rtol=0)
        short = dec(z[..., a - 1:b + 1])[..., hop:(1 + b - a) * hop]
        assert (short - full[..., a * hop:b * hop]).abs().max() > 1e-3


def _reference_attention(attn: MultiHeadAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Shaw et al. relative attention written out with loops over (i, j)."""
    b, c, t = x.shape
    h, d, w = attn.n_heads, attn.k_channels, attn.window_size
    q = attn.conv_q(x).view(b, h, d, t)
    k = attn.conv_k(x).view(b, h, d, t)
    v = attn.conv_v(x).view(b, h, d, t)
    ek, ev = attn.emb_rel_k[0], attn.emb_rel_v[0]
    out = torch.zeros(b, h, d, t)
    for i in range(t):
        scores = torch.full((b, h, t), -1e4)
        for j in range(t):
            if mask[0, 0, i, j]:
                s = (q[..., i] * k[..., j]).sum(-1)
                if abs(j - i) <= w:
                    s = s + (q[..., i] * ek[j - i + w]).sum(-1)
                scores[..., j] = s / math.sqrt(d)
        p = scores.softmax(-1)
        for j in range(t):
            out[..., i] += p[..., j, None] * v[..., j]
            if abs(j - i) <= w:
                out[..., i] += p[..., j, None] * ev[j - i + w]
    return attn.conv_o(out.reshape(b, c, t))


def test_relative_attention_matches_loops():
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2, 2)
    with torch.no_grad():
        attn.emb_rel_k.normal_()
        attn.emb_rel_v.normal_()
    x = torch.randn(1, 8, 7)
    m = sequence_mask(torch.tensor([6]), 7)[:, None, :]
    mask = m[:, :, :, None] & m[:, :, None, :]
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask)[..., :6], _reference_attention(attn, x, mask)[..., :6],
                                   atol=1e-5, rtol=1e-5)


def _spline_forward(x, uw, uh, ud, B, min_w=1e-3, min_h=1e-3, min_d=1e-3):
    """Durkan et al.'s rational-quadratic spline, forward direction, one scalar at a time."""
    K = len(uw)
    if not -B <= x <= B:
        return x
    w = [min_w + (1 - min_w * K) * p for p in torch.softmax(uw, 0).tolist()]
    h = [min_h + (1 - min_h * K) * p for p in torch.softmax(uh, 0).tolist()]
    xs, ys = [-B], [-B]
    for i in range(K):
        xs.append(xs[-1] + 2 * B * w[i])
        ys.append(ys[-1] + 2 * B * h[i])
    xs[-1], ys[-1] = B, B
    d = [1.0] + [min_d + math.log1p(math.exp(u)) for u in ud.tolist()] + [1.0]
    k = max(i for i in range(K) if xs[i] <= x)
    wk, hk = xs[k + 1] - xs[k], ys[k + 1] - ys[k]
    s = hk / wk
    th = (x - xs[k]) / wk
    return ys[k] + hk * (s * th * th + d[k] * th * (1 - th)) / (s + (d[k] + d[k + 1] - 2 * s) * th * (1 - th))


def test_spline_inverse_inverts_the_forward_spline():
    torch.manual_seed(3)
    K, B = 10, 5.0
    n = 200
    uw, uh, ud = torch.randn(n, K), torch.randn(n, K), torch.randn(n, K - 1)
    x = torch.empty(n).uniform_(-6, 6)  # some outside the tails: identity there
    y = torch.tensor([_spline_forward(float(x[i]), uw[i].double(), uh[i].double(), ud[i].double(), B)
                      for i in range(n)], dtype=torch.float64)
    back = rational_quadratic_spline_inverse(y, uw.double(), uh.double(), ud.double(), tail_bound=B)
    torch.testing.assert_close(back, x.double(), atol=1e-9, rtol=0)  # the algebra is exact
    back32 = rational_quadratic_spline_inverse(y.float(), uw, uh, ud, tail_bound=B)
    torch.testing.assert_close(back32, x, atol=2e-3, rtol=0)  # float32: flat bins amplify rounding


def test_model_builds_on_meta_and_has_vits_names():
    with torch.device("meta"):
        m = VitsModel(tiny_config())
    names = set(m.state_dict())
    assert "enc_p.encoder.attn_layers.0.emb_rel_k" in names
    assert "dp.flows.3.proj.weight" in names and not any(n.startswith("dp.flows.1.") for n in names)
    assert "flow.flows.2.enc.res_skip_layers.1.weight" in names and "dec.conv_post.weight" in names
