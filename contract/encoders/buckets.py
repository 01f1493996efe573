"""Crops and resolutions: a centre square crop, or diffusers' PRX aspect-ratio buckets.

`--buckets square` (default): the largest centred square, resized to resolution x resolution.
`--buckets ar`: the bucket of diffusers' PRX pipeline whose aspect ratio (height / width) is nearest the
image's (`ASPECT_RATIO_256_BIN`, `_512_`, `_1024_`, imported from diffusers so encode, train and sampling
agree), then the largest centred box of the bucket's aspect ratio, resized to the bucket.
Crop boxes are (left, top, right, bottom) in pixels of the decoded image (after EXIF orientation).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.LANCZOS
SQUARE, AR = "square", "ar"


def aspect_ratio_bins() -> dict[int, dict[str, list[int]]]:
    """diffusers' PRX bins: resolution -> {ratio (h/w) string: [height, width]}."""
    from diffusers.pipelines.prx.pipeline_prx import ASPECT_RATIO_BINS

    return ASPECT_RATIO_BINS


def check_resolution(resolution: int, buckets: str, multiple: int = 16) -> None:
    """Raise ValueError when the resolution cannot be used (latent grid must divide by the patch)."""
    if buckets == AR:
        if resolution not in aspect_ratio_bins():
            raise ValueError(f"--buckets ar needs --resolution in diffusers' PRX bins "
                             f"{sorted(aspect_ratio_bins())}, got {resolution}")
    elif buckets == SQUARE:
        if resolution < multiple or resolution % multiple:
            raise ValueError(f"--resolution must be a multiple of {multiple} (VAE downsampling x patch size), "
                             f"got {resolution}")
    else:
        raise ValueError(f"--buckets must be square or ar, got {buckets!r}")


@dataclass(frozen=True)
class Crop:
    bucket: str                            # "square" or the diffusers ratio key ("0.78")
    size: tuple[int, int]                  # (height, width) after resizing
    box: tuple[int, int, int, int]         # (left, top, right, bottom) in the decoded image
    original: tuple[int, int]              # (width, height) of the decoded image

    def meta(self) -> dict:
        return {"bucket": self.bucket, "size": list(self.size), "crop_box": list(self.box),
                "original_size": list(self.original)}


def centred_box(width: int, height: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """The largest centred box of aspect target_w / target_h inside width x height."""
    if width * target_h > height * target_w:      # image wider than target: full height
        h = height
        w = max(1, min(width, round(height * target_w / target_h)))
    else:                                         # taller (or equal): full width
        w = width
        h = max(1, min(height, round(width * target_h / target_w)))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def ar_bucket(width: int, height: int, resolution: int) -> tuple[str, tuple[int, int]]:
    """(ratio key, (height, width)) of the PRX bin nearest the image's aspect ratio (diffusers' rule)."""
    from diffusers.image_processor import PixArtImageProcessor

    bins = aspect_ratio_bins()[resolution]
    h, w = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins)
    key = next(k for k, v in bins.items() if (int(v[0]), int(v[1])) == (h, w))
    return key, (int(h), int(w))


def plan_crop(width: int, height: int, resolution: int, buckets: str = SQUARE) -> Crop:
    if buckets == AR:
        key, (bh, bw) = ar_bucket(width, height, resolution)
    else:
        key, (bh, bw) = SQUARE, (resolution, resolution)
    return Crop(key, (bh, bw), centred_box(width, height, bh, bw), (width, height))


def crop_resize(img: Image.Image, crop: Crop) -> np.ndarray:
    """RGB PIL image -> uint8 H x W x 3 array of the crop at its bucket size."""
    h, w = crop.size
    out = img.resize((w, h), resample=RESAMPLE, box=crop.box)
    return np.asarray(out, dtype=np.uint8)


def to_tensor(arrays: list[np.ndarray]):
    """uint8 H x W x 3 arrays or tensors (same size) -> float32 B x 3 x H x W in [-1, 1] (the VAE's input range),
    on the device of the tensors among them."""
    import torch

    if any(isinstance(a, torch.Tensor) for a in arrays):   # crops resized on a device (encode --decode gpu)
        device = next(a.device for a in arrays if isinstance(a, torch.Tensor))
        batch = torch.stack([torch.as_tensor(a).to(device) for a in arrays]).permute(0, 3, 1, 2)
    else:
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    out = torch.empty(batch.shape, dtype=torch.float32, device=batch.device)
    out.copy_(batch)          # one pass into a contiguous float32 batch, then in place: x / 127.5 - 1.0
    return out.div_(127.5).sub_(1.0)
