"""The SFT loss with the frozen head fused into a chunked cross-entropy (tune/trainer.py) against the plain path:
same loss, same LoRA gradients, several chunks, sparse labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aigckit.text.lm import load_lm
from aigckit.tune import trainer
from aigckit.tune.data import IGNORE
from aigckit.tune.lora import LoraConfig, add_lora, lora_parameters


def test_fused_head_loss_matches_plain_cross_entropy(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(trainer, "CE_CHUNK", 7)  # several chunks and a ragged last one
    lm = load_lm(tiny_llama_dir, kernels="torch")
    add_lora(lm.model, LoraConfig(r=4, alpha=8), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(lm.model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = torch.randint(3, 97, (3, 16), generator=g)
    labels = ids.clone()
    labels[0, :9] = IGNORE  # a prompt
    labels[2, 5:] = IGNORE  # padding
    params = lora_parameters(lm.model)

    def grads(loss_fn):
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    fused, g_fused = grads(lambda: trainer.sum_nll(lm.model, ids, labels))

    def plain():
        logits, target, _ = trainer.label_logits(lm.model, ids, labels)
        return F.cross_entropy(logits.float(), target, reduction="sum")

    ref, g_ref = grads(plain)
    assert int((labels[:, 1:] != IGNORE).sum()) > 2 * trainer.CE_CHUNK
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-5)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(float(a.abs().max()) > 1e-3 for a in g_fused)  # the gradients are not all ~0
    with torch.no_grad():  # evaluation: no gradient pass
        torch.testing.assert_close(trainer.sum_nll(lm.model, ids, labels), ref, atol=1e-4, rtol=1e-5)
