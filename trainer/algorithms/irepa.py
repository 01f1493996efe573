"""iREPA (PRX's `iREPA`, arXiv 2512.10794): REPA with a spatial projector and spatially normalised targets.

`--repa-variant irepa` switches the REPA algorithm (trainer/algorithms/repa.py: same features, block, weight,
burn-in, hook) to these projectors and targets; what differs from REPA, as in PRX's prx/algorithm/repa.py:

- the teacher features F (B x N x D, the full token grid) are spatially normalised before the cosine:
      g = mean over D of F            (B x N x 1, per token)
      F' = F - g * mean over N of F   (the token-mean, scaled per token by g)
      F'' = F' / (std over N of F' + 1e-6)   (unbiased std, as torch.std)
  and only then gathered to the tokens the block saw (TREAD/SPRINT);
- the projector (`--irepa-projector`) reads the block's tokens on their H x W grid:
  - `attention` (PRX's `iREPA` default, so its iREPA-V2/V3 configs): one attention layer with 2-D RoPE on the
    tokens' grid coordinates (q, k, v, out: hidden -> hidden; 4 heads, theta 1e4), then Linear(hidden -> D).
    It works with routing: the kept tokens attend to each other at their own coordinates;
  - `conv`: one 3x3 `Conv2d(hidden, D, padding=1)` over the grid (PRX's `iREPALoss` default). It needs every
    token, so it is refused with TREAD/SPRINT routing through the REPA block (as PRX raises);
- loss = -weight x mean over samples and tokens of cos(projector(h), F'') (PRX: weight 0.5, block 7).
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.algorithms.repa import cosine_per_sample
from trainer.algorithms.routing import gather_tokens

PROJECTORS = ("attention", "conv")


def spatial_normalize(features: torch.Tensor) -> torch.Tensor:
    """B x N x D teacher features -> PRX's spatially normalised targets (float32)."""
    f = features.float()
    gamma = f.mean(dim=2, keepdim=True)
    f = f - gamma * f.mean(dim=1, keepdim=True)
    return f / (f.std(dim=1, keepdim=True) + 1e-6)


def grid_coords(grid: tuple[int, int], batch: int, keep: torch.Tensor | None, device) -> tuple[torch.Tensor, ...]:
    """(rows, columns), B x K float: the grid coordinates of the kept tokens (all, row-major, when keep is None)."""
    h, w = grid
    index = keep if keep is not None else torch.arange(h * w, device=device).unsqueeze(0).expand(batch, -1)
    return (index // w).float(), (index % w).float()


class IrepaConvProjector(nn.Conv2d):
    """hidden -> D, 3x3 convolution over the H x W token grid (seeded init)."""

    def __init__(self, hidden: int, dim: int, seed: int = 0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            super().__init__(hidden, dim, kernel_size=3, padding=1)

    def project(self, hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """B x N x hidden tokens (row-major H x W grid) -> B x N x D."""
        b, n, c = hidden.shape
        if n != grid[0] * grid[1]:
            raise ValueError(f"iREPA's conv projector needs every token of the {grid[0]} x {grid[1]} grid, got {n} "
                             "(routing through the REPA block needs --irepa-projector attention)")
        return self(hidden.transpose(1, 2).reshape(b, c, *grid)).flatten(2).transpose(1, 2)

    def cosine(self, hidden, features, grid, keep=None) -> torch.Tensor:
        if keep is not None:
            raise ValueError("iREPA's conv projector needs every token: use --irepa-projector attention with routing")
        return cosine_per_sample(self.project(hidden, grid), spatial_normalize(features))


class IrepaAttentionProjector(nn.Module):
    """PRX's `AttentionProjector`: multi-head self-attention with 2-D RoPE, then Linear(hidden -> D)."""

    def __init__(self, hidden: int, dim: int, seed: int = 0, heads: int = 4, theta: float = 10000.0):
        super().__init__()
        if hidden % heads or (hidden // heads) % 4:
            raise ValueError(f"iREPA's attention projector splits the hidden size {hidden} into {heads} heads whose "
                             "size must divide by 4 (2-D RoPE)")
        self.heads, self.theta = heads, theta
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(hidden, hidden) for _ in range(4))
            self.output = nn.Linear(hidden, dim)

    def rope(self, pos: torch.Tensor, dim: int) -> torch.Tensor:
        """B x N positions -> B x N x dim/2 x 2 x 2 rotations (PRX's `rope`)."""
        omega = 1.0 / self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
        angle = pos.unsqueeze(-1) * omega.unsqueeze(0)
        out = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], dim=-1)
        return out.view(*out.shape[:-1], 2, 2).float()

    @staticmethod
    def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """B x H x N x d by B x N x d/2 x 2 x 2 (PRX's `apply_rope`)."""
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        rot = rot.unsqueeze(1)
        return (rot[..., 0] * pairs[..., 0] + rot[..., 1] * pairs[..., 1]).reshape(*x.shape).type_as(x)

    def forward(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        half = d // self.heads // 2
        rot = torch.cat([self.rope(rows, half), self.rope(cols, half)], dim=2)
        attn = nn.functional.scaled_dot_product_attention(self.rotate(q, rot), self.rotate(k, rot), v)
        return self.output(self.out_proj(attn.transpose(1, 2).reshape(b, n, d)))

    def cosine(self, hidden, features, grid, keep=None) -> torch.Tensor:
        target = spatial_normalize(features)  # over the full grid, then the kept tokens (as PRX)
        if keep is not None:
            target = gather_tokens(target, keep)
        rows, cols = grid_coords(grid, hidden.shape[0], keep, hidden.device)
        return cosine_per_sample(self(hidden, rows, cols), target)


def build_projector(kind: str, hidden: int, dim: int, seed: int = 0) -> nn.Module:
    if kind not in PROJECTORS:
        raise ValueError(f"--irepa-projector {kind!r}: use one of {', '.join(PROJECTORS)}")
    return (IrepaAttentionProjector if kind == "attention" else IrepaConvProjector)(hidden, dim, seed=seed)
