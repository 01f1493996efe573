"""Pixel space (`--vae none`): the bucket-resized RGB crop itself, stored losslessly, instead of latents.

PRX's pixel-space baseline (configs/yamls/vae/identity.yaml, `IdentityVAE`) trains on the image itself: 3
channels, spatial compression 1, scaling 1 and shift 0, values in [-1, 1]. The crop is stored as lossless
WebP, fastest method (`PIXELS_MEMBER`): the storage chosen by bench/pixel_storage.py (BENCHMARKS.md,
"Pixel-space storage"): 0.45 (256 px) to 0.27 (1024 px) of raw uint8's bytes, written faster than PNG level 1
and read no slower than PNG; WebP's slower methods save a further 15-20 % at 20-70x the write time.
Reading it back gives the exact uint8 values, mapped to [-1, 1] by x / 127.5 - 1 (diffusers'
`VaeImageProcessor.normalize`), whose inverse `to_uint8` in contract/encoders/vae.py rounds back to the same
bytes.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PIXEL_SPACE = "none"  # the --vae name of pixel space
PIXELS_MEMBER = "pixels.webp"
WEBP_OPTIONS = {"lossless": True, "quality": 0, "method": 0}  # lossless; quality 0 / method 0: least effort


def is_pixel_space(vae: str | None) -> bool:
    return (vae or "").strip().lower() == PIXEL_SPACE


def pixel_info() -> dict[str, Any]:
    """The latent-space record of pixel space (the keys `vae_info` in contract/encoders/vae.py records for a
    VAE: class, channels, downsample, normalisation)."""
    return {"name": PIXEL_SPACE, "id": None, "revision": None, "class": PIXEL_SPACE,
            "scaling_factor": 1.0, "shift_factor": 0.0, "latent_channels": 3, "downsample": 1,
            "normalisation": "scale_shift", "pixels": "uint8 / 127.5 - 1", "storage": "webp-lossless",
            "dtype": "uint8"}  # scale 1, shift 0: the denoiser trains on the [-1, 1] crop as stored


@dataclass
class PixelSpace:
    """Pixel space where the encode stage and the sampler hold a VAE: nothing to load; the crop itself is
    stored, and the sampler's output is the image (PRXPixelPipeline: no decoder)."""
    info: dict[str, Any] = field(default_factory=pixel_info)
    bf16: bool = False

    @staticmethod
    def decode(x):
        """The sampler's output is the image: float32 B x 3 x H x W, clamped to [-1, 1], on the CPU."""
        return x.float().clamp(-1.0, 1.0).cpu()


def encode_image(rgb: np.ndarray) -> bytes:
    """uint8 H x W x 3 -> lossless WebP bytes."""
    from PIL import Image

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"pixel space stores uint8 H x W x 3 RGB, got {rgb.dtype} {rgb.shape}")
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="WEBP", **WEBP_OPTIONS)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Stored image bytes -> uint8 H x W x 3."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def to_unit_range(rgb: np.ndarray):
    """uint8 H x W x 3 -> float32 3 x H x W tensor in [-1, 1] (0 -> -1, 255 -> 1)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float() / 127.5 - 1.0


def read_pixels(data: bytes):
    """A stored `PIXELS_MEMBER` -> float32 3 x H x W in [-1, 1], what the trainer trains on."""
    return to_unit_range(decode_image(data))
