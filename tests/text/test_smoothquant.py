"""SmoothQuant folds: the float model computes the same function, and activations get easier to quantise."""

from __future__ import annotations

import torch

from aigckit.text import quant, smoothquant
from aigckit.text.config import LMConfig
from aigckit.text.model import Transformer


def _model() -> Transformer:
    cfg = LMConfig(arch="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48,
                   block_size=64, tie_embeddings=True)
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights(std=0.2)
    with torch.no_grad():  # outlier channels, as real models have in their residual stream
        m.tok_emb.weight[:, 3] *= 30
        m.tok_emb.weight[:, 17] *= 20
    return m.eval()


def test_folds_keep_the_float_function_and_untie_the_head():
    m = _model()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = m(tokens)
        emb = m.tok_emb.weight.clone()
        n = smoothquant.smooth_llama(m, list(range(40)), alpha=0.5)
        after = m(tokens)
    assert n == 2 * 3 + 1  # per block: qkv, gate_up, down; plus the head
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert m.lm_head.weight is not m.tok_emb.weight and torch.equal(m.tok_emb.weight, emb)


def test_smoothing_flattens_activation_outliers_and_helps_w8a8():
    m, ref_model = _model(), _model()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    ids = tokens.flatten().tolist()

    def spread(model):  # how far the largest input channel of each qkv sticks out
        st = smoothquant.activation_absmax(model, ids)
        return max(float(st[f"{i}.qkv"].max() / st[f"{i}.qkv"].median()) for i in range(2))

    before = spread(m)
    smoothquant.smooth_llama(m, ids, alpha=0.5)
    assert before > 4 and spread(m) < before ** 0.6  # alpha 0.5 takes roughly the square root of the spread
    with torch.no_grad():
        ref = ref_model(tokens)
        plain = quant.quantize_model(_model(), "w8a8")(tokens)
        smooth = quant.quantize_model(m, "w8a8")(tokens)
    assert (smooth - ref).abs().mean() < (plain - ref).abs().mean()
