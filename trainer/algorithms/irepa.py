"""iREPA (PRX's `iREPALoss`, arXiv 2512.10794): REPA with a spatial projector and spatially normalised targets.

What differs from REPA (trainer/algorithms/repa.py), as in PRX's prx/algorithm/repa.py:
- the projector is one 3x3 `Conv2d(hidden, D, padding=1)` over the token grid (B x hidden x H x W), not a
  token-wise MLP, so neighbouring tokens inform each projected token;
- the teacher features F (B x N x D) are spatially normalised before the cosine:
      g = mean over D of F            (B x N x 1, per token)
      F' = F - g * mean over N of F   (the token-mean, scaled per token by g)
      F'' = F' / (std over N of F' + 1e-6)   (unbiased std, as torch.std)
- loss = -weight x mean over samples and tokens of cos(conv(h), F'').

PRX's configs: weight 0.5, block 7 (iREPA-V2.yaml: DINOv2-L/14 with registers; iREPA-V3.yaml: DINOv3-L/16).
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.algorithms.repa import cosine_per_sample


def spatial_normalize(features: torch.Tensor) -> torch.Tensor:
    """B x N x D teacher features -> PRX's spatially normalised targets (float32)."""
    f = features.float()
    gamma = f.mean(dim=2, keepdim=True)
    f = f - gamma * f.mean(dim=1, keepdim=True)
    return f / (f.std(dim=1, keepdim=True) + 1e-6)


class IrepaProjector(nn.Conv2d):
    """hidden -> D, 3x3 convolution over the H x W token grid (seeded init)."""

    def __init__(self, hidden: int, dim: int, seed: int = 0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            super().__init__(hidden, dim, kernel_size=3, padding=1)

    def project(self, hidden: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """B x N x hidden tokens (row-major H x W grid) -> B x N x D."""
        b, n, c = hidden.shape
        if n != height * width:
            raise ValueError(f"iREPA: {n} tokens are not a {height} x {width} grid")
        grid = hidden.transpose(1, 2).reshape(b, c, height, width)
        return self(grid).flatten(2).transpose(1, 2)


def irepa_cosine(projector: IrepaProjector, hidden: torch.Tensor, features: torch.Tensor,
                 height: int, width: int) -> torch.Tensor:
    """B: mean over tokens of cos(conv(hidden), spatially normalised features)."""
    return cosine_per_sample(projector.project(hidden, height, width), spatial_normalize(features))


def irepa_loss(cos: torch.Tensor, weight: float) -> torch.Tensor:
    """-weight x mean cosine (PRX maximises the cosine)."""
    return -weight * cos.mean()
