"""TREAD and SPRINT token routing for PRXTransformer2DModel (training-time compute savers).

Both pick, per sample, a random `routed_count(N, ratio) = clamp(round(N x ratio), 1, N - 1)` of the N image
tokens (Python's round) before block `route_start`; the other tokens, with their rotary rows, run blocks
`route_start .. route_end` (both included: PRX's post-hook on `blocks[route_end]`, so its (2, 12) routes blocks
2..12 of 16); after block `route_end` the full sequence comes back:

- TREAD (Krause et al. 2025): the routed tokens skip those blocks and are put back unchanged (their values
  from before `route_start`). In eval mode nothing is routed: the model is exactly the plain denoiser.
- SPRINT (Park et al. 2025): the sparse middle's output, with a mask token at the dropped positions, is
  concatenated with the dense output of block `route_start - 1` and fused by a Linear(2d -> d) before the
  remaining blocks. At inference the middle sees every token and the fusion is still applied, so a SPRINT
  run's weights are a PRXTransformer2DModel *plus* `sprint_fusion` (in `aux.safetensors`): they cannot be
  loaded as a plain PRXTransformer2DModel.

The route is drawn on the CPU from a generator seeded by (seed, step, rank, micro-batch), outside the
blocks, so gradient checkpointing recomputes the blocks on the same tokens. `routed_forward` is the
diffusers forward written out with the model's own submodules (no library method is patched); with nothing
routed and no fusion it equals `PRXTransformer2DModel.forward` bit for bit (tested).

The training algorithms are trainer/algorithms/tread.py and sprint.py; this module is what the denoiser
(trainer.model.Denoiser) runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def routed_count(n_tokens: int, ratio: float) -> int:
    """Tokens routed past the blocks: round(N x ratio) clamped to [1, N - 1]; 0 when N < 2 or ratio <= 0."""
    if n_tokens < 2 or ratio <= 0:
        return 0
    return min(max(round(n_tokens * ratio), 1), n_tokens - 1)


@dataclass
class Route:
    start: int                  # first routed block
    end: int                    # last routed block: the tokens rejoin after it
    keep: torch.Tensor | None   # B x K indices (sorted) of the tokens that run the routed blocks; None = all


def draw_route(batch: int, n_tokens: int, ratio: float, seed: int, device: torch.device) -> torch.Tensor | None:
    """B x (N - routed) sorted indices of the kept tokens, a fresh random subset per sample; None if none routed."""
    routed = routed_count(n_tokens, ratio)
    if routed == 0:
        return None
    g = torch.Generator().manual_seed(int(seed))
    order = torch.rand(batch, n_tokens, generator=g).argsort(dim=1)
    return order[:, : n_tokens - routed].sort(dim=1).values.to(device)


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """B x N x D -> B x K x D at the kept indices."""
    return torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_rotary(pe: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """PRX's rotary table B x 1 x N x h x 2 x 2 -> B x 1 x K x h x 2 x 2 (the kept tokens' rows)."""
    idx = keep.view(keep.shape[0], 1, keep.shape[1], 1, 1, 1).expand(-1, pe.shape[1], -1, *pe.shape[3:])
    return torch.gather(pe, 2, idx)


def scatter_tokens(full: torch.Tensor, keep: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`full` (B x N x D) with the rows at `keep` replaced by `kept` (B x K x D); out of place."""
    return full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]), kept.to(full.dtype))


class SprintFusion(nn.Module):
    """SPRINT's sparse-dense residual fusion: Linear(concat[sparse deep restored, dense shallow]) -> d.

    Dropped positions of the sparse path hold a mask token, a trained parameter that starts at zero (PRX's
    `learnable_mask: true`, `sprint_mask_token`); the linear layer is Xavier-initialised with a zero bias."""

    def __init__(self, hidden: int, seed: int = 0):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(hidden))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.linear = nn.Linear(2 * hidden, hidden)
            nn.init.xavier_uniform_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        if keep is not None:
            base = self.mask_token.to(sparse.dtype).expand_as(dense)
            sparse = scatter_tokens(base, keep, sparse)
        return self.linear(torch.cat([sparse, dense], dim=-1))


def _block(model, block, img, txt, vec, pe, mask):
    if torch.is_grad_enabled() and model.gradient_checkpointing:
        return model._gradient_checkpointing_func(block.__call__, img, txt, vec, pe, mask)
    return block(hidden_states=img, encoder_hidden_states=txt, temb=vec, image_rotary_emb=pe, attention_mask=mask)


def routed_forward(model, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   attention_mask: torch.Tensor | None, route: Route, fusion: SprintFusion | None = None):
    """PRXTransformer2DModel.forward with blocks route.start .. route.end on the kept tokens only, put back
    after block route.end (TREAD) or fused back there by `fusion` (SPRINT). Returns the B x C x H x W prediction."""
    from diffusers.models.transformers.transformer_prx import get_image_ids, img2seq, seq2img

    txt = model.txt_in(encoder_hidden_states)
    img = model.img_in(img2seq(hidden_states, model.patch_size))
    bs, _, h, w = hidden_states.shape
    pe = model.pe_embedder(get_image_ids(bs, h, w, patch_size=model.patch_size, device=hidden_states.device))
    vec = model._compute_timestep_embedding(timestep, dtype=img.dtype)  # the model's own embedding code
    if model.resolution_embedder is not None:
        size = torch.full((bs,), h, device=hidden_states.device, dtype=torch.float32)
        width = torch.full((bs,), w, device=hidden_states.device, dtype=torch.float32)
        vec = vec + model.resolution_embedder(size, width, dtype=vec.dtype)
    dense, pe_now = img, pe
    last = min(route.end, len(model.blocks) - 1)
    for i, block in enumerate(model.blocks):
        if i == route.start:
            dense = img
            if route.keep is not None:
                img, pe_now = gather_tokens(img, route.keep), gather_rotary(pe, route.keep)
        img = _block(model, block, img, txt, vec, pe_now, attention_mask)
        if i == last:
            img, pe_now = _rejoin(img, dense, route, fusion), pe
    img = model.final_layer(img, vec)
    return seq2img(img, model.patch_size, hidden_states.shape)


def _rejoin(img: torch.Tensor, dense: torch.Tensor, route: Route, fusion: SprintFusion | None) -> torch.Tensor:
    if fusion is not None:
        return fusion(img, dense, route.keep)
    if route.keep is None:
        return img
    return scatter_tokens(dense, route.keep, img)


def check_blocks(routing: str, start: int, end: int, depth: int) -> None:
    """Block indices must lie inside the model (PRX: 0 <= route_start < route_end < depth)."""
    if routing == "none":
        return
    if not 0 <= start < end < depth:
        raise ValueError(f"--route-start {start} / --route-end {end} are outside the model's {depth} blocks: "
                         f"need 0 <= route_start < route_end <= {depth - 1} (routed blocks route_start .. route_end)")

