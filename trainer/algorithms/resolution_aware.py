"""Resolution-aware conditioning (PRX's `ResolutionAware`, `vec` mode): the latent's (H, W) embedded and added to
the timestep vector, so every block's modulation knows the generation resolution (multi-resolution training).

    vec = time_in(t) + MLP(concat[sin-cos(H, 128), sin-cos(W, 128)])     (H, W: the latent grid, before patches)

The embedder is diffusers' `PRXResolutionEmbedder` (`PRXTransformer2DModel(resolution_embeds=True)`, documented as
PRX-7B's `vec` mode; its sinusoid is PRX's `timestep_embedding(x, 128, max_period, time_factor=1)`, cos first), so
the module lives inside `transformer/` and an export loads in PRXPipeline as it is. `build` adds it to the model
(seeded by seed + 3, after the model's own init, so every other weight starts as the baseline's) and records
`resolution_embeds: true` in the model's config. Like PRX's MLPEmbedder it is not zero-initialised: it changes
the output from step 0, through itself only.

PRX's configs (flux1-vae-benchmark/ and JIT-benchmark/resolution_aware.yaml) run `token` mode: two tokens, the
embedded H and W, prepended to the text sequence. diffusers' model has no such tokens, so neither PRXPipeline
nor an export could use a model trained with them: `--resolution-aware token` is refused with that reason
(trainer/config.py).
"""
from __future__ import annotations

import torch

from trainer.algorithms.base import Algorithm, log


class ResolutionAware(Algorithm):
    """`--resolution-aware vec`: diffusers' resolution embedder added to the timestep vector."""
    name, keys = "resolution_aware", ("resolution_aware",)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.resolution_aware != "none"

    def build(self, denoiser, spec) -> None:
        from diffusers.models.transformers.transformer_prx import PRXResolutionEmbedder

        model = denoiser.transformer
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
