"""Resolution-aware conditioning (PRX's `ResolutionAware`): the latent's (H, W) given to the denoiser, for
multi-resolution (aspect-ratio bucket) training. H and W are the latent grid before patches; each is embedded
with PRX's sinusoid `timestep_embedding(x, 128, max_period 1e4, time_factor=1)` (cos first). Two modes:

- `vec`: vec = time_in(t) + MLP(concat[emb(H), emb(W)]), so every block's modulation knows the resolution. The
  embedder is diffusers' `PRXResolutionEmbedder` (`PRXTransformer2DModel(resolution_embeds=True)`, documented as
  PRX-7B's `vec` mode), so it lives inside `transformer/` and an export loads in PRXPipeline as it is. `build`
  adds it to the model (seeded by seed + 3, after the model's own init, so every other weight starts as the
  baseline's) and records `resolution_embeds: true` in the model's config.
- `token` (PRX's flux1-vae-benchmark and JIT-benchmark resolution_aware.yaml): two tokens, MLP_h(emb(H)) and
  MLP_w(emb(W)), put before the text tokens (after `txt_in`, mask 1), so the image attends to them. The two
  MLPs (`ResolutionTokens`) are an auxiliary module (`aux.safetensors`) read by an explicit forward hook on
  `txt_in` (`Denoiser.add_resolution_tokens`); diffusers' model has no such tokens, so prx-sample and prx-eval
  run the run through the Denoiser (`inference_modules`) and prx-export refuses it.

Neither is zero-initialised (PRX's MLPEmbedders are not): they change the output from step 0, through their own
modules only.
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.algorithms.base import Algorithm, log

MAX_PERIOD = 10000  # PRX's max_period in both configs (the embedding's slowest frequency)


def sinusoid(x: torch.Tensor, max_period: int = MAX_PERIOD) -> torch.Tensor:
    """B -> B x 128: PRX's timestep_embedding(x, 128, max_period, time_factor=1.0), cos then sin."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(x, 128, flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=1.0,
                                  max_period=max_period)


class ResolutionTokens(nn.Module):
    """PRX's `ResolutionEmbedder` in `token` mode: (H, W) -> B x 2 x hidden tokens."""

    def __init__(self, hidden: int, seed: int = 0):
        from diffusers.models.transformers.transformer_prx import MLPEmbedder

        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.h_embedder = MLPEmbedder(in_dim=128, hidden_dim=hidden)
            self.w_embedder = MLPEmbedder(in_dim=128, hidden_dim=hidden)

    def forward(self, batch: int, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        device = self.h_embedder.in_layer.weight.device
        h = sinusoid(torch.full((batch,), float(height), device=device)).to(dtype)
        w = sinusoid(torch.full((batch,), float(width), device=device)).to(dtype)
        return torch.stack([self.h_embedder(h), self.w_embedder(w)], dim=1)


class ResolutionAware(Algorithm):
    """`--resolution-aware vec|token`: the latent's (H, W) in the timestep vector or as two text-side tokens."""
    name, keys = "resolution_aware", ("resolution_aware",)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.resolution_aware != "none"

    @classmethod
    def inference_modules(cls, cfg) -> bool:
        return cfg.resolution_aware == "token"

    def build(self, denoiser, spec) -> None:
        if self.cfg.resolution_aware == "token":
            self.build_inference(denoiser)
        else:
            self._add_vec_embedder(denoiser.transformer)

    def build_inference(self, denoiser) -> None:
        denoiser.add_resolution_tokens(ResolutionTokens(denoiser.config.hidden_size, seed=self.cfg.seed + 3))

    def _add_vec_embedder(self, model) -> None:
        from diffusers.models.transformers.transformer_prx import PRXResolutionEmbedder

        if model.resolution_embedder is not None:  # a --model folder trained with it
            return
        p = next(model.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 3)
            embedder = PRXResolutionEmbedder(model.hidden_size, max_period=model.config.time_max_period)
        model.resolution_embedder = embedder.to(device=p.device, dtype=p.dtype)
        model.register_to_config(resolution_embeds=True)
        log.info("resolution-aware (vec): %d parameters in transformer.resolution_embedder",
                 sum(q.numel() for q in embedder.parameters()))
