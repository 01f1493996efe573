"""`tiny-prx`: a seeded tiny PRXTransformer2DModel (the trainer's `tiny` preset) for `prx-data dev tiny-models`.

Its input widths match the other tiny models: 16 latent channels (tiny-flux-vae, like FLUX.1's VAE) and
32-wide text embeddings (tiny-t5gemma). `prx-train --model DIR` loads it through from_pretrained.
"""
from __future__ import annotations

from pipeline.tiny_models import register

TINY_LATENT_CHANNELS = 16
TINY_TEXT_DIM = 32


@register("tiny-prx")
def build_tiny_prx(folder: str, seed: int) -> None:
    from trainer.model import build_model

    build_model("tiny", TINY_LATENT_CHANNELS, TINY_TEXT_DIM, seed=seed).save_pretrained(folder,
                                                                                        safe_serialization=True)
