"""Image checks: min side, max aspect ratio, min/max pixels, file size, near-blank.

Each check is a small function returning a `Judgement`; `ImageChecks.run` applies the configured ones.
Sizes are after EXIF orientation (the decoder's). Near-blank is judged on a 64 px grayscale thumbnail: the
standard deviation of its pixel values (0..255); a flat image (a blank page, a solid placeholder, a
one-colour error GIF) has a spread close to 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from filters.base import Judgement, failed, passed

REASONS = {
    "image_too_small": "shorter image side below --min-side (detail: side vs minimum)",
    "aspect_ratio_too_large": "long side / short side above --max-aspect-ratio",
    "too_few_pixels": "width x height below --min-pixels",
    "too_many_pixels": "width x height above --max-pixels (decoded; --max-image-pixels refuses before decoding)",
    "file_too_small": "image member smaller than --min-file-bytes",
    "file_too_large": "image member larger than --max-file-bytes",
    "near_blank": "pixel standard deviation of a grayscale thumbnail below --min-pixel-std (blank or flat image)",
}


def min_side(width: int, height: int, minimum: int) -> Judgement:
    side = min(width, height)
    if side < minimum:
        return failed("min_side", side, "image_too_small", f"shorter side {side} < {minimum}")
    return passed("min_side", side)


def aspect_ratio(width: int, height: int, maximum: float) -> Judgement:
    ratio = max(width, height) / max(min(width, height), 1)
    if ratio > maximum:
        return failed("aspect_ratio", ratio, "aspect_ratio_too_large", f"aspect ratio {ratio:.3g} > {maximum:g}")
    return passed("aspect_ratio", ratio)


def pixels(width: int, height: int, minimum: int | None, maximum: int | None) -> Judgement:
    n = width * height
    if minimum is not None and n < minimum:
        return failed("pixels", n, "too_few_pixels", f"{width}x{height} = {n} pixels < {minimum}")
    if maximum is not None and n > maximum:
        return failed("pixels", n, "too_many_pixels", f"{width}x{height} = {n} pixels > {maximum}")
    return passed("pixels", n)


def file_size(nbytes: int, minimum: int | None, maximum: int | None) -> Judgement:
    if minimum is not None and nbytes < minimum:
        return failed("file_size", nbytes, "file_too_small", f"{nbytes} bytes < {minimum}")
    if maximum is not None and nbytes > maximum:
        return failed("file_size", nbytes, "file_too_large", f"{nbytes} bytes > {maximum}")
    return passed("file_size", nbytes)


def pixel_std(image) -> float:
    """Std of a 64x64 grayscale thumbnail (PIL image in, 0..255 scale out)."""
    thumb = image.convert("L").resize((64, 64))
    return float(np.asarray(thumb, dtype=np.float32).std())


def near_blank(image, min_std: float) -> Judgement:
    std = pixel_std(image)
    if std < min_std:
        return failed("near_blank", std, "near_blank", f"pixel std {std:.2f} < {min_std:g}")
    return passed("near_blank", std)


@dataclass
class ImageChecks:
    """The configured image checks; a threshold of None (or 0 for min_side) turns a check off."""

    min_side: int = 0
    max_aspect_ratio: float | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    min_file_bytes: int | None = None
    max_file_bytes: int | None = None
    min_pixel_std: float | None = None

    @property
    def needs_pixels(self) -> bool:
        return self.min_pixel_std is not None

    @property
    def active(self) -> bool:
        return bool(self.min_side or self.max_aspect_ratio or self.min_pixels is not None
                    or self.max_pixels is not None or self.min_file_bytes is not None
                    or self.max_file_bytes is not None or self.min_pixel_std is not None)

    def run(self, width: int, height: int, nbytes: int, image=None) -> list[Judgement]:
        out = []
        if self.min_side:
            out.append(min_side(width, height, self.min_side))
        if self.max_aspect_ratio:
            out.append(aspect_ratio(width, height, self.max_aspect_ratio))
        if self.min_pixels is not None or self.max_pixels is not None:
            out.append(pixels(width, height, self.min_pixels, self.max_pixels))
        if self.min_file_bytes is not None or self.max_file_bytes is not None:
            out.append(file_size(nbytes, self.min_file_bytes, self.max_file_bytes))
        if self.min_pixel_std is not None:
            if image is None:
                raise ValueError("near-blank check needs the decoded image")
            out.append(near_blank(image, self.min_pixel_std))
        return out
