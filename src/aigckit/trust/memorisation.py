"""Memorisation / copyright checks: does a model hand back its training data?

Images (``aigc image eval`` reports it): for each generated image the nearest training image by the evaluation
classifier's features (Euclidean) and by pixels (RMS difference in [0, 1] grey levels), the share of near-copies
and a grid of the closest pairs. The near-copy threshold is calibrated on held-out data, not guessed: a held-out
test image is by construction no copy of a training image, so a generated image closer (in pixels) to a training
image than the closest 1% of test images are to theirs (``COPY_QUANTILE``) counts as a near-copy. (Fashion-MNIST
has near-duplicates across its splits, so the floor share is 1% by construction and a model that copies shows far
more.)

Text (``aigc detect --against CORPUS``): the longest run of tokens the text shares with a corpus (a file or a
folder of .txt / .md files), found by binary search on the length with hashed n-gram sets; verbatim runs of
more than ~50 tokens are rarely coincidence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aigckit.errors import AigcError

__all__ = ["nearest", "memorisation_report", "pairs_grid", "Overlap", "ngram_overlap", "COPY_QUANTILE"]

COPY_QUANTILE = 0.01
CHUNK = 2048


def nearest(query: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of the nearest row of ``ref`` for each row of ``query`` (Euclidean, float32, chunked)."""
    q, r = query.flatten(1).float(), ref.flatten(1).float()
    rn = (r * r).sum(1)
    dists, idx = [], []
    for s in range(0, len(q), CHUNK):
        qc = q[s:s + CHUNK]
        d2 = (qc * qc).sum(1, keepdim=True) - 2 * qc @ r.T + rn[None, :]
        m, i = d2.min(1)
        dists.append(m.clamp_min(0).sqrt())
        idx.append(i)
    return torch.cat(dists), torch.cat(idx)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 or [-1, 1] float images -> [0, 1] float rows."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else (x.float() + 1) / 2
    return x.flatten(1)


def memorisation_report(generated: torch.Tensor, f_gen: torch.Tensor, train_images: torch.Tensor,
                        f_train: torch.Tensor, test_images: torch.Tensor, *, n_floor: int = 2000,
                        top: int = 16) -> dict:
    """Nearest training image of each generated one (features and pixels), the near-copy threshold from held-out
    test images, the share of near-copies, and the ``top`` closest pairs (indices, distances)."""
    if len(generated) == 0:
        raise AigcError("no generated images to check", param="n")
    g, tr = _pixels(generated), _pixels(train_images)
    d_pix, i_pix = nearest(g, tr)
    d_feat, i_feat = nearest(f_gen, f_train)
    d_test, _ = nearest(_pixels(test_images[:n_floor]), tr)
    dim = g.shape[1] ** 0.5  # Euclidean -> RMS per pixel
    thr = float(torch.quantile(d_test, COPY_QUANTILE)) / dim
    rms = d_pix / dim
    order = torch.argsort(rms)[:top]
    return {
        "n": len(generated),
        "pixel_rms_to_nearest": {"min": round(float(rms.min()), 4), "median": round(float(rms.median()), 4)},
        "feature_distance_to_nearest": {"min": round(float(d_feat.min()), 4),
                                        "median": round(float(d_feat.median()), 4)},
        "feature_and_pixel_agree": round(float((i_pix == i_feat).float().mean()), 4),
        "copy_threshold_rms": round(thr, 4),
        "copy_threshold_rule": f"the {COPY_QUANTILE:.0%} quantile of held-out test images' nearest-train RMS "
                               f"(n = {len(d_test)})",
        "test_median_rms_to_nearest": round(float(d_test.median()) / dim, 4),
        "near_copy_share": round(float((rms < thr).float().mean()), 4),
        "closest_pairs": [{"generated": int(j), "train": int(i_pix[j]), "pixel_rms": round(float(rms[j]), 4)}
                          for j in order],
    }


def pairs_grid(generated: torch.Tensor, train_images: torch.Tensor, report: dict, path) -> Path:
    """A PNG of the closest pairs: each column a generated image above its nearest training image."""
    from aigckit.data.images import to_float
    from aigckit.image.io import make_grid, save_png

    pairs = report["closest_pairs"]
    gen = torch.stack([generated[p["generated"]].float() for p in pairs])
    tr = to_float(torch.stack([train_images[p["train"]] for p in pairs]))
    grid = make_grid(torch.cat([gen, tr]), nrow=len(pairs))
    return save_png(grid, path, {"memorisation": "top: generated, bottom: nearest training image (pixels)"})


# ------------------------------------------------------------------------------------------------ text


@dataclass
class Overlap:
    longest: int          # tokens in the longest run shared with the corpus
    text: str             # that run, decoded
    source: str | None    # the corpus file it is in
    n_tokens: int         # tokens in the text
    corpus_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _corpus_files(corpus) -> list[Path]:
    p = Path(corpus).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (".txt", ".md", ".rst", ""))
        if files:
            return files
    raise AigcError(f"corpus {corpus} is not a file or a folder with .txt/.md files", param="against")


def _grams(ids: list[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


def ngram_overlap(text: str, corpus, tokenizer) -> Overlap:
    """The longest token run of ``text`` that also occurs in ``corpus``."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    docs = [(str(f), tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False))
            for f in _corpus_files(corpus)]

    def found(n: int):
        if n == 0:
            return (0, None)
        grams = _grams(ids, n)
        for name, d in docs:
            for i in range(len(d) - n + 1):
                if tuple(d[i:i + n]) in grams:
                    return (i, name, tuple(d[i:i + n]))
        return None

    lo, hi, best = 0, len(ids), None  # invariant: a run of lo tokens is shared
    while lo < hi:
        mid = (lo + hi + 1) // 2
        hit = found(mid)
        if hit:
            lo, best = mid, hit
        else:
            hi = mid - 1
    total = sum(len(d) for _, d in docs)
    if not best or lo == 0:
        return Overlap(0, "", None, len(ids), total)
    return Overlap(lo, tokenizer.decode(list(best[2])), best[1], len(ids), total)
