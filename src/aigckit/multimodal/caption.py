"""Image captioning with a small decoder of our own: a convolutional image encoder whose feature vector starts a GRU
that writes the caption word by word (Show and Tell, Vinyals et al. 2015, in miniature).

Why not a prefix into SmolLM2 (ClipCap): on this shared 2-core CPU a forward + backward pass through the 135M-parameter
language model for every training caption costs ~100x the whole decoder here; the captions' vocabulary is a few
hundred words, which a GRU learns in minutes. The vocabulary is the training captions' words (lower case, split on
spaces); decoding is greedy, sampling (temperature) or beam search, all pure functions of the model and the image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from aigckit.errors import AigcError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


@dataclass
class CaptionConfig:
    vocab: list[str] = field(default_factory=list)  # index 0..3 = PAD, BOS, EOS, UNK
    resolution: int = 28
    channels: int = 1
    widths: tuple[int, ...] = (16, 32, 64)
    hidden: int = 192
    embed: int = 64
    max_len: int = 16

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.vocab[:4] != [PAD, BOS, EOS, UNK]:
            raise AigcError("caption vocab must start with <pad> <bos> <eos> <unk>")

    def to_dict(self) -> dict:
        return asdict(self)


def build_vocab(texts: list[str]) -> list[str]:
    words = sorted({w for t in texts for w in t.split()})
    return [PAD, BOS, EOS, UNK] + words


def conv_encoder(channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """The captioners' image encoder: per width two 3x3 convolutions (GroupNorm, SiLU) and a 2x2 average pool."""
    layers, cin = [], channels
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                   nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(), nn.AvgPool2d(2)]
        cin = w
    return nn.Sequential(*layers)


def fit_images(x: torch.Tensor, channels: int, resolution: int) -> torch.Tensor:
    """Images in [-1, 1] -> the encoder's channel count (grey mean / repeated grey) and resolution (bilinear)."""
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, 3, -1, -1)
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution,) * 2, mode="bilinear", antialias=True)
    return x


class CaptionModel(nn.Module):
    def __init__(self, cfg: CaptionConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = conv_encoder(cfg.channels, cfg.widths)
        self.to_hidden = nn.Linear(cfg.widths[-1], cfg.hidden)
        self.emb = nn.Embedding(len(cfg.vocab), cfg.embed)
        self.gru = nn.GRU(cfg.embed + cfg.hidden, cfg.hidden, batch_first=True)
        self.out = nn.Linear(cfg.hidden, len(cfg.vocab))
        self.index = {w: i for i, w in enumerate(cfg.vocab)}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> feature N x hidden (also fed to every decoder step)."""
        x = fit_images(x, self.cfg.channels, self.cfg.resolution)
        return torch.tanh(self.to_hidden(self.encoder(x).mean((2, 3))))

    def tokens(self, texts: list[str]) -> torch.Tensor:
        """Captions -> ids N x (max_len + 2): BOS words EOS, PAD after."""
        L = self.cfg.max_len + 2  # noqa: N806
        ids = torch.zeros((len(texts), L), dtype=torch.long)
        for i, t in enumerate(texts):
            seq = [1] + [self.index.get(w, 3) for w in t.split()][: self.cfg.max_len] + [2]
            ids[i, : len(seq)] = torch.tensor(seq)
        return ids

    def step(self, feat: torch.Tensor, ids: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder over ids (N x T) given image features; -> (logits N x T x V, hidden)."""
        e = torch.cat([self.emb(ids), feat[:, None].expand(-1, ids.shape[1], -1)], -1)
        if h is None:
            h = feat[None].contiguous()
        o, h = self.gru(e, h)
        return self.out(o), h

    def loss(self, x: torch.Tensor, texts: list[str]) -> torch.Tensor:
        ids = self.tokens(texts)
        logits, _ = self.step(self.encode(x), ids[:, :-1], None)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=0)

    def describe(self, x: torch.Tensor, *, beams: int = 1, temperature: float = 0.0, seed: int = 0) -> list[str]:
        """Captions of images x (the interface both captioners share, see ``load_captioner``)."""
        return generate(self, x, beams=beams, temperature=temperature, generator=torch.Generator().manual_seed(seed))

    def words(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i == 2:
                break
            if i > 3:
                out.append(self.cfg.vocab[i])
        return " ".join(out)


def check_decoding(beams: int, temperature: float) -> None:
    """The decoding options both captioners take: beams 1..16, temperature 0..5, not both beams and sampling."""
    if beams < 1 or beams > 16:
        raise AigcError(f"beams must be in 1..16, got {beams}", param="beams")
    if temperature < 0 or temperature > 5:
        raise AigcError(f"temperature must be in [0, 5], got {temperature}", param="temperature")
    if beams > 1 and temperature > 0:
        raise AigcError("beam search is deterministic: use --beams or --temperature, not both", param="beams")


@torch.no_grad()
def generate(model: CaptionModel, x: torch.Tensor, *, beams: int = 1, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> list[str]:
    """Captions for images x: greedy (temperature 0, beams 1), sampling (temperature > 0) or beam search (beams > 1,
    highest total log-probability; finished beams keep their score)."""
    check_decoding(beams, temperature)
    model.eval()
    feat = model.encode(x)
    if beams == 1:
        n = x.shape[0]
        tok = torch.ones((n, 1), dtype=torch.long)
        h, done, out = None, torch.zeros(n, dtype=torch.bool), []
        for _ in range(model.cfg.max_len + 1):
            logits, h = model.step(feat, tok, h)
            logits = logits[:, -1]
            logits[:, [0, 1, 3]] = float("-inf")
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, 2), nxt)
            out.append(nxt)
            done |= nxt == 2
            tok = nxt[:, None]
            if done.all():
                break
        seqs = torch.stack(out, 1).tolist()
        return [model.words(s) for s in seqs]
    return [_beam(model, feat[i:i + 1], beams) for i in range(x.shape[0])]


def _beam(model: CaptionModel, feat: torch.Tensor, k: int) -> str:
    beams = [([], 0.0, None, False)]  # (ids, log-prob, hidden, finished)
    for _ in range(model.cfg.max_len + 1):
        cand = []
        for ids, score, h, fin in beams:
            if fin:
                cand.append((ids, score, h, True))
                continue
            tok = torch.tensor([[ids[-1] if ids else 1]])
            logits, h2 = model.step(feat, tok, h)
            lp = F.log_softmax(logits[0, -1], -1)
            lp[[0, 1, 3]] = float("-inf")
            top = lp.topk(k)
            for v, i in zip(top.values.tolist(), top.indices.tolist()):
                cand.append((ids + [i], score + v, h2, i == 2))
        beams = sorted(cand, key=lambda b: -b[1])[:k]
        if all(b[3] for b in beams):
            break
    return model.words(beams[0][0])


def load_captioner(run):
    """A trained captioning run (newest intact checkpoint), a checkpoint folder or a built-in name -> (model, config):
    a ``CaptionModel`` (family caption) or a ``prefixcap.PrefixCaptioner`` (family prefix-caption, with its language
    model). Both caption images with ``model.describe(x, beams=, temperature=, seed=)``."""
    from aigckit.multimodal.io import load_run, run_config

    if run_config(run)[1].get("family") == "prefix-caption":
        from aigckit.multimodal.prefixcap import load_prefix_captioner

        return load_prefix_captioner(run)
    return load_run(run, "caption", CaptionConfig, CaptionModel)


def bleu4(hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002): clipped n-gram precisions n = 1..4, geometric mean, brevity penalty
    against the closest reference length."""
    import math
    from collections import Counter

    match, total = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for h, rs in zip(hyps, refs):
        hw, rws = h.split(), [r.split() for r in rs]
        hyp_len += len(hw)
        ref_len += min((abs(len(r) - len(hw)), len(r)) for r in rws)[1]
        for n in range(1, 5):
            hc = Counter(tuple(hw[i:i + n]) for i in range(len(hw) - n + 1))
            mx: Counter = Counter()
            for r in rws:
                for g, c in Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1)).items():
                    mx[g] = max(mx[g], c)
            match[n - 1] += sum(min(c, mx[g]) for g, c in hc.items())
            total[n - 1] += max(len(hw) - n + 1, 0)
    if min(match) == 0:
        return 0.0
    logp = sum(math.log(m / t) for m, t in zip(match, total)) / 4
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))
    return bp * math.exp(logp)
