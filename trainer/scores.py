"""The metric math, in float64 (no library computes CMMD or DINO-MMD; torch-fidelity unpickles its weights).

    Frechet distance  |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2
                      the matrix square roots by `eigh` (symmetric PSD; eigenvalues < 0 from rounding are 0),
                      so n < d (singular covariances) stays finite and non-negative.
    MMD^2 (biased)    scale * (mean k(X, X) + mean k(Y, Y) - 2 mean k(X, Y)), diagonals kept,
                      k(x, y) = exp(-|x - y|^2 / (2 sigma^2)); CMMD's sigma 10 and scale 1000, computed in
                      chunks so 10,000 x 10,000 kernels never sit in memory at once.
    CLIP score        mean over pairs of max(100 cos(image, caption), 0).
    fid_prx transform uint8 v -> (v * 255) mod 256 = 256 - v (v > 0): what torchmetrics'
                      FrechetInceptionDistance(normalize=True) does to uint8 input with `(imgs * 255).byte()`.
"""
from __future__ import annotations

import numpy as np

MMD_SIGMA, MMD_SCALE = 10.0, 1000.0


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of N x D features, float64 (covariance with N - 1; N = 1 gives zeros)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be N x D with N >= 1, got shape {x.shape}")
    mu = x.mean(axis=0)
    if len(x) == 1:
        return mu, np.zeros((x.shape[1], x.shape[1]))
    return mu, np.cov(x, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance of two Gaussians (float64, via eigh)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    r1 = _sqrt_psd(s1)
    inner = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(value, 0.0)


def fid_from_features(a, b) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _kernel_mean(x: np.ndarray, y: np.ndarray, sigma: float, chunk: int) -> float:
    """mean over all pairs of exp(-|x - y|^2 / (2 sigma^2)), in row chunks of x."""
    gamma = 1.0 / (2 * sigma * sigma)
    yy = (y * y).sum(1)
    total = 0.0
    for i in range(0, len(x), chunk):
        xc = x[i:i + chunk]
        d2 = (xc * xc).sum(1)[:, None] + yy[None, :] - 2 * xc @ y.T
        total += np.exp(-gamma * np.clip(d2, 0, None)).sum()
    return total / (len(x) * len(y))


def mmd(x, y, sigma: float = MMD_SIGMA, scale: float = MMD_SCALE, chunk: int = 1024) -> float:
    """Biased RBF MMD^2 x scale (CMMD's estimator: diagonal terms kept)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ValueError(f"mmd needs N x D and M x D features, got {x.shape} and {y.shape}")
    value = _kernel_mean(x, x, sigma, chunk) + _kernel_mean(y, y, sigma, chunk) - 2 * _kernel_mean(x, y, sigma, chunk)
    return float(scale * value)


def clip_score(image_emb, text_emb) -> float:
    """Mean of max(100 cos, 0) over (image, caption) pairs; embeddings are normalised here."""
    a, b = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.maximum(100 * (a * b).sum(1), 0).mean())


def fid_prx_transform(images):
    """uint8 images -> what PRX's published FID saw: `(imgs * 255).byte()` wraps, v -> (256 - v) mod 256."""
    import torch

    if images.dtype != torch.uint8:
        raise TypeError(f"fid_prx transform takes uint8 images, got {images.dtype}")
    return (images.to(torch.int32) * 255 % 256).to(torch.uint8)
