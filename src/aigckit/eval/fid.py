"""Fréchet distance and kernel inception distance on feature vectors (here: our classifier's features).

FID (Heusel et al. 2017): ||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½), with Tr (Σ1 Σ2)^½ computed as the sum of the square
roots of the eigenvalues of Σ1^½ Σ2 Σ1^½ (symmetric, so no general matrix square root is needed).
KID (Bińkowski et al. 2018): unbiased MMD² with the kernel k(x, y) = (x·y / d + 1)³, averaged over random subsets.
"""

from __future__ import annotations

import torch


def feature_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = f.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    r = _sqrtm_psd(s1)
    tr_covmean = torch.linalg.eigvalsh(r @ s2 @ r).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def fid(f1: torch.Tensor, f2: torch.Tensor) -> float:
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def kid(f1: torch.Tensor, f2: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """-> (mean, std) of the unbiased MMD² over ``subsets`` random subsets of both feature sets."""
    g = torch.Generator().manual_seed(seed)
    f1, f2 = f1.double(), f2.double()
    m = min(subset_size, f1.shape[0], f2.shape[0])
    d = f1.shape[1]
    vals = []
    for _ in range(subsets):
        x = f1[torch.randperm(f1.shape[0], generator=g)[:m]]
        y = f2[torch.randperm(f2.shape[0], generator=g)[:m]]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - kxx.diagonal().sum()) + (kyy.sum() - kyy.diagonal().sum())) / (m * (m - 1)) \
            - 2 * kxy.mean()
        vals.append(float(mmd))
    t = torch.tensor(vals)
    return float(t.mean()), float(t.std()) if len(vals) > 1 else 0.0
