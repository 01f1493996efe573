"""The seeded tiny open_clip model (`prx-data dev tiny-models DIR --only tiny-clip`).

A real `open_clip.CLIP` (ViT image tower, transformer text tower with the stock BPE tokenizer) with a few
thousand-wide layers cut to 32, saved the way open_clip's `local-dir:` schema reads a folder:
`open_clip_config.json` ({model_cfg, preprocess_cfg}) + `open_clip_model.safetensors`. The filter stage loads
it through exactly the path a downloaded checkpoint folder takes (`filters.clip.load_clip`).
"""
from __future__ import annotations

import json
import os

from pipeline.tiny_models import register

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_PREPROCESS = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest"}


def save_open_clip_folder(model, model_cfg: dict, preprocess_cfg: dict, folder: str) -> None:
    """Write an open_clip model as a `local-dir:` folder (config JSON + safetensors weights)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as fh:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, fh, indent=2, sort_keys=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, "open_clip_model.safetensors"))


@register("tiny-clip")
def build_tiny_clip(folder: str, seed: int) -> None:
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    save_open_clip_folder(model, TINY_CLIP_CFG, TINY_PREPROCESS, folder)
