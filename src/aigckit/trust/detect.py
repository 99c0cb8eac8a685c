"""Detecting the KGW watermark: count green tokens, an exact one-sided binomial test, windows for mixed text.

Under the null hypothesis (the text was written without the key) each scored token is green with probability
gamma, independently, so the green count G of T scored tokens is Binomial(T, gamma). The paper reports the z-score
``(G - gamma T) / sqrt(T gamma (1 - gamma))``; its normal tail is far too optimistic in the far tail for short texts,
so the verdict here uses the exact tail ``P(X >= G)``, summed in log space (``log_binom_sf``).

Repeated (context, token) n-grams break the independence (a text that repeats a phrase repeats its green tokens),
so by default each distinct (h context tokens, token) tuple is scored once, as the follow-up paper recommends.

Entropy-gated scoring (with the model): a watermark with an entropy gate (``Watermark.min_entropy``) marks only the
steps where the model was uncertain; the other tokens are green with probability gamma and only dilute the count.
Given the model's next-token entropies over the text (``token_entropies``), the detector scores only the tokens
whose step reaches the gate (SWEET, Lee et al. 2023). The choice depends only on the text *before* each token, never
on the token or the key, so under the null hypothesis the scored tokens are still independent Bernoulli(gamma)
draws and the p-value stays exact; under the watermark it keeps the marked steps and drops most unmarked ones. The
entropies seen here (text without the prompt, re-tokenised) differ a little from those at generation (prompt in
context), which costs some power but never validity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from aigckit.errors import AigcError
from aigckit.trust.watermark import Watermark, is_green

__all__ = ["log_binom_sf", "binom_sf", "z_score", "Detection", "WindowScore", "score_tokens", "detect_ids",
           "detect_text", "token_entropies"]


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def log_binom_sf(k: int, n: int, p: float) -> float:
    """Natural log of P(X >= k) for X ~ Binomial(n, p), exactly (up to float rounding), for any n.

    Sums log pmf(i) = lgamma(n+1) - lgamma(i+1) - lgamma(n-i+1) + i log p + (n-i) log(1-p) for i = k..n with a
    running log-sum-exp, stopping once the terms (which fall geometrically past the mode) cannot change the sum."""
    if not (isinstance(n, int) and isinstance(k, int)) or n < 0:
        raise AigcError(f"n must be a non-negative integer, got {n!r}", param="n")
    if not 0.0 < p < 1.0:
        raise AigcError(f"p must be in (0, 1), got {p!r}", param="p")
    if k <= 0:
        return 0.0
    if k > n:
        return -math.inf
    lp, lq, ln = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    mode = math.floor((n + 1) * p)
    if k <= mode:  # the upper tail holds most of the mass: 1 - P(X <= k - 1), the lower tail summed instead
        lower = -math.inf
        for i in range(k - 1, -1, -1):
            t = ln - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
            lower = _log_add(lower, t)
            if t < lower - 40:
                break
        return math.log1p(-min(1.0, math.exp(lower)))
    total = -math.inf
    for i in range(k, n + 1):
        t = ln - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
        total = _log_add(total, t)
        if t < total - 40:  # terms past the mode fall at least geometrically: the rest is < e^-40 of the sum
            break
    return min(0.0, total)


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p) (may underflow to 0 below ~1e-308; use ``log_binom_sf`` there)."""
    return math.exp(log_binom_sf(k, n, p))


def z_score(green: int, n: int, gamma: float) -> float:
    if n == 0:
        return 0.0
    return (green - gamma * n) / math.sqrt(n * gamma * (1 - gamma))


@dataclass
class WindowScore:
    start: int          # index of the first scored token of the window in the token list
    end: int            # one past the last
    n_scored: int
    green: int
    z: float
    p_value: float


@dataclass
class Detection:
    n_tokens: int                 # tokens in the text
    n_scored: int                 # tokens tested (after the first h and, by default, without repeated n-grams)
    green: int
    green_fraction: float
    z: float
    p_value: float                # exact one-sided binomial P(X >= green), X ~ Bin(n_scored, gamma)
    log10_p_value: float          # the same in log10 (still finite where p_value underflows to 0)
    fpr: float                    # the false-positive rate the verdict is taken at
    watermarked: bool             # p_value <= fpr (or, with windows, the best window's corrected p-value)
    params: dict = field(default_factory=dict)
    windows: list[WindowScore] | None = None
    best_window: WindowScore | None = None
    best_window_p_corrected: float | None = None   # Bonferroni over the windows tested

    def to_dict(self) -> dict:
        return asdict(self)


def score_tokens(ids: list[int], wm: Watermark, *, ignore_repeated: bool = True,
                 entropies: list[float | None] | None = None, entropy_gate: float | None = None) -> list[bool | None]:
    """Per token: True (green), False (red) or None (not scored: the first h tokens, a repeated n-gram, or, given
    ``entropies``, a token whose step's entropy is below ``entropy_gate``)."""
    h, k = wm.context_width, wm.k
    if entropies is not None and len(entropies) != len(ids):
        raise AigcError(f"entropies must have one value per token ({len(ids)}), got {len(entropies)}",
                        param="entropies")
    seen: set[tuple[int, ...]] = set()
    out: list[bool | None] = []
    for i, t in enumerate(ids):
        if i < h or (entropies is not None and (entropies[i] is None or entropies[i] < entropy_gate)):
            out.append(None)
            continue
        ctx = tuple(ids[i - h:i])
        if ignore_repeated:
            gram = (*ctx, t)
            if gram in seen:
                out.append(None)
                continue
            seen.add(gram)
        out.append(is_green(k, ctx, t, wm.gamma, wm.self_hash))
    return out


def _p(green: int, n: int, gamma: float) -> tuple[float, float]:
    lp = log_binom_sf(green, n, gamma) if n else 0.0
    return math.exp(lp), lp / math.log(10)


def detect_ids(ids: list[int], wm: Watermark, *, fpr: float = 1e-3, ignore_repeated: bool = True,
               window: int | None = None, stride: int | None = None, entropies: list[float | None] | None = None,
               entropy_gate: float | None = None) -> Detection:
    """Test token ids for ``wm``'s watermark. With ``window`` (scored tokens per window) the text is also tested
    window by window (``stride`` scored tokens apart, default window // 2): the verdict is then "watermarked" if
    the whole text or the best window passes at ``fpr`` after a Bonferroni correction for the windows tested (for
    a text where only a part was generated with the key). With ``entropies`` (``token_entropies``: the model's
    entropy before each token) only tokens at steps of at least ``entropy_gate`` nats are scored (default: the
    watermark's ``min_entropy``)."""
    if not 0.0 < fpr < 1.0:
        raise AigcError(f"fpr must be in (0, 1), got {fpr!r}", param="fpr")
    if entropy_gate is None:
        entropy_gate = wm.min_entropy
    if not isinstance(entropy_gate, (int, float)) or isinstance(entropy_gate, bool) or not 0 <= entropy_gate <= 20:
        raise AigcError(f"entropy_gate must be in [0, 20] nats, got {entropy_gate!r}", param="entropy_gate")
    marks = score_tokens(ids, wm, ignore_repeated=ignore_repeated, entropies=entropies, entropy_gate=entropy_gate)
    scored = [(i, g) for i, g in enumerate(marks) if g is not None]
    n, green = len(scored), sum(1 for _, g in scored if g)
    p, lp10 = _p(green, n, wm.gamma)
    params = {k: v for k, v in wm.describe().items() if k != "delta"}
    params["ignore_repeated"] = ignore_repeated
    params["entropy_gate"] = entropy_gate if entropies is not None else None  # None: every token scored
    det = Detection(len(ids), n, green, green / n if n else 0.0, z_score(green, n, wm.gamma), p, lp10, fpr,
                    n > 0 and p <= fpr, params)
    if window is not None:
        if not isinstance(window, int) or window < 1:
            raise AigcError(f"window must be a positive integer, got {window!r}", param="window")
        stride = stride or max(1, window // 2)
        if not isinstance(stride, int) or stride < 1:
            raise AigcError(f"stride must be a positive integer, got {stride!r}", param="stride")
        wins = []
        starts = list(range(0, max(1, n - window + 1), stride))
        if n > window and starts[-1] != n - window:
            starts.append(n - window)  # the last window ends at the last scored token
        for s in starts:
            part = scored[s:s + window]
            if not part:
                break
            g = sum(1 for _, x in part if x)
            wp, _ = _p(g, len(part), wm.gamma)
            wins.append(WindowScore(part[0][0], part[-1][0] + 1, len(part), g, z_score(g, len(part), wm.gamma), wp))
        det.windows = wins
        if wins:
            best = min(wins, key=lambda w: w.p_value)
            det.best_window = best
            det.best_window_p_corrected = min(1.0, best.p_value * len(wins))
            det.watermarked = det.watermarked or det.best_window_p_corrected <= fpr
    return det


def token_entropies(ids: list[int], model, config) -> list[float | None]:
    """The model's next-token entropy (nats, over its whole output vocabulary) before each token of ``ids``: entry
    i is the entropy of the distribution that predicts ``ids[i]`` from ``ids[:i]``; entry 0 is None (no context)."""
    from aigckit.trust.zeroshot import next_token_log_probs

    if not ids:
        return []
    if len(ids) > config.block_size:
        raise AigcError(f"text has {len(ids)} tokens, more than the model's context ({config.block_size}); test "
                        "it in parts", param="text")
    out: list[float | None] = [None]
    for _, _, lp in next_token_log_probs(ids, model, config):
        out.extend((-(lp.exp() * lp.nan_to_num(neginf=0.0)).sum(-1)).tolist())
    return out


def detect_text(text: str, wm: Watermark, tokenizer, *, lm=None, **kw) -> Detection:
    """``detect_ids`` on ``text`` tokenised without special tokens (the tokenizer the text was generated with).
    With ``lm`` (a loaded ``aigckit.text.lm.LM``, the model that generated the text) only the steps that reach
    the entropy gate are scored (``token_entropies``)."""
    if not isinstance(text, str) or not text.strip():
        raise AigcError("text to test is empty", param="text")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if lm is not None:
        if not hasattr(lm, "model"):
            raise AigcError("entropy-gated detection needs a local model (its logits), not a remote one",
                            param="model")
        kw["entropies"] = token_entropies(ids, lm.model, lm.config)
    return detect_ids(ids, wm, **kw)


def load_tokenizer(model: str | None = None):
    """The tokenizer of a store model, .gguf file or HF directory (no weights loaded)."""
    from aigckit import store
    from aigckit.text.tokenizer import Tokenizer

    res = store.resolve(model)
    return Tokenizer.from_gguf(res.path) if res.format == "gguf" else Tokenizer.from_dir(res.path)
