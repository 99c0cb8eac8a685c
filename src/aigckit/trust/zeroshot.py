"""Zero-shot AI-text detection: Fast-DetectGPT's sampling discrepancy, analytic form (Bao et al., ICLR 2024).

Symbols, as in the paper, for a text x = x_1..x_n and a model q (here the same model samples and scores):

    log q(x_t | x_<t)                  the text's token log-likelihoods
    mu_t = E_{x~q}[log q(x | x_<t)]    the expected log-likelihood of a token the model itself would sample
    s2_t = Var_{x~q}[log q(x | x_<t)]
    d(x) = (sum_t log q(x_t|x_<t) - sum_t mu_t) / sqrt(sum_t s2_t)

Machine text sits near the model's own high-probability choices (d well above 0); human text is more surprising
(d near or below 0). The verdict compares d with ``THRESHOLD``, calibrated on SmolLM2-135M samples against human
English text from Debian packages (``bench/trust_text.py``, docs/TRUST.md). Limits: the score is only as good as
the scoring model's knowledge of the text's language and genre: short texts (< ~50 tokens), non-English text, code
and texts from much larger models are detected far less reliably; never use the verdict alone against a person.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from aigckit.errors import AigcError
from aigckit.text.kvcache import KVCache

__all__ = ["ZeroShotResult", "next_token_log_probs", "sampling_discrepancy", "zero_shot", "THRESHOLD", "MIN_TOKENS"]

# Calibrated for smollm2-135m-instruct in bench/trust_text.py (docs/TRUST.md): between the median score of 200-token
# samples at temperature 1 (-0.69) and of human passages from Debian documents (-1.62). A small, weak calibration
# (8 model samples, 24 human passages: TPR 0.75 at FPR 0.46 there, AUROC 0.72); lower temperatures score higher.
THRESHOLD = -1.2
MIN_TOKENS = 50
MAX_TOKENS = 1024
CHUNK = 256


@dataclass
class ZeroShotResult:
    score: float          # the sampling discrepancy d(x)
    threshold: float
    ai: bool              # score > threshold
    n_tokens: int         # tokens scored
    log_likelihood: float  # mean log q(x_t | x_<t)
    note: str

    def to_dict(self) -> dict:
        return asdict(self)


def next_token_log_probs(ids: list[int], model, config):
    """Yield ``(c0, c1, log_probs)`` over ``ids`` in chunks: ``log_probs[j]`` (float32 ``[c1 - c0, vocab]``) is the
    model's next-token log-distribution after ``ids[:c0 + j + 1]``, i.e. the prediction of token ``c0 + j + 1``."""
    dtype = next(model.parameters()).dtype
    cache = KVCache.for_model(config, 1, len(ids), dtype)
    with torch.inference_mode():
        for c0 in range(0, len(ids) - 1, CHUNK):
            c1 = min(c0 + CHUNK, len(ids) - 1)  # the logits at token j predict token j + 1
            logits = model(torch.tensor([ids[c0:c1]]), torch.arange(c0, c1), cache)[0].float()
            yield c0, c1, torch.log_softmax(logits, dim=-1)


def sampling_discrepancy(ids: list[int], model, config) -> tuple[float, float, int]:
    """(d(x), mean log-likelihood, tokens scored) for token ids under ``model`` (an ``aigckit.text.model``)."""
    ids = ids[:MAX_TOKENS]
    if len(ids) < 2:
        raise AigcError("text is too short for zero-shot detection: need at least 2 tokens", param="text")
    ll = mu = var = 0.0
    for c0, c1, lp in next_token_log_probs(ids, model, config):
        p = lp.exp()
        target = torch.tensor(ids[c0 + 1:c1 + 1])
        ll += float(lp.gather(-1, target[:, None]).sum())
        m = (p * lp).sum(-1)
        mu += float(m.sum())
        var += float(((p * lp * lp).sum(-1) - m * m).sum())
    n = len(ids) - 1
    return (ll - mu) / math.sqrt(max(var, 1e-12)), ll / n, n


def zero_shot(text: str, lm, *, threshold: float = THRESHOLD) -> ZeroShotResult:
    """Fast-DetectGPT's verdict on ``text`` with the loaded model ``lm`` (``aigckit.text.lm.LM``) sampling and
    scoring. The text is tokenised without special tokens; at most ``MAX_TOKENS`` tokens are scored."""
    if not isinstance(text, str) or not text.strip():
        raise AigcError("text to test is empty", param="text")
    if not hasattr(lm, "model"):
        raise AigcError("zero-shot detection needs a local model (its logits), not a remote one", param="model")
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    d, mean_ll, n = sampling_discrepancy(ids, lm.model, lm.config)
    note = ""
    if n < MIN_TOKENS:
        note = f" (only {n} tokens: below {MIN_TOKENS} the verdict is unreliable)"
    return ZeroShotResult(d, threshold, d > threshold, n, mean_ll, note)
