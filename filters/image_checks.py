"""Image checks: min side, max aspect ratio, min/max pixels, file size, near-blank; one `Check` each.

Each check is a small function returning a `Judgement`, and a filter class declaring its options and reason.
Sizes are after EXIF orientation (the decoder's). Near-blank is judged on a 64 px grayscale thumbnail: the
standard deviation of its pixel values (0..255); a flat image (a blank page, a solid placeholder, a
one-colour error GIF) has a spread close to 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from contract.config import option
from contract.ledger import REJECTED
from filters.base import Check, Judgement, View, failed, passed


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
class MinSide(Check):
    name = "min_side"
    needs = "size"
    reasons = {"image_too_small": (REJECTED, "shorter image side below --min-side (detail: side vs minimum)")}
    min_side: int = option(0, help="reject images whose shorter side is below this (0: off)", minimum=0)

    def active(self) -> bool:
        return bool(self.min_side)

    def judge(self, view: View) -> Judgement:
        return min_side(view.width, view.height, self.min_side)


@dataclass
class AspectRatio(Check):
    name = "aspect_ratio"
    needs = "size"
    reasons = {"aspect_ratio_too_large": (REJECTED, "long side / short side above --max-aspect-ratio")}
    max_aspect_ratio: float | None = option(None, help="reject long/short side ratios above this")

    def active(self) -> bool:
        return bool(self.max_aspect_ratio)

    def judge(self, view: View) -> Judgement:
        return aspect_ratio(view.width, view.height, self.max_aspect_ratio)


@dataclass
class Pixels(Check):
    name = "pixels"
    needs = "size"
    reasons = {"too_few_pixels": (REJECTED, "width x height below --min-pixels"),
               "too_many_pixels": (REJECTED, "width x height above --max-pixels (decoded; --max-image-pixels "
                                             "refuses before decoding)")}
    min_pixels: int | None = option(None, help="reject width x height below this", minimum=0)
    max_pixels: int | None = option(None, help="reject width x height above this", minimum=0)

    def active(self) -> bool:
        return self.min_pixels is not None or self.max_pixels is not None

    def judge(self, view: View) -> Judgement:
        return pixels(view.width, view.height, self.min_pixels, self.max_pixels)


@dataclass
class FileSize(Check):
    name = "file_size"
    needs = "size"
    reasons = {"file_too_small": (REJECTED, "image member smaller than --min-file-bytes"),
               "file_too_large": (REJECTED, "image member larger than --max-file-bytes")}
    min_file_bytes: int | None = option(None, help="reject image members smaller than this", minimum=0)
    max_file_bytes: int | None = option(None, help="reject image members larger than this", minimum=0)

    def active(self) -> bool:
        return self.min_file_bytes is not None or self.max_file_bytes is not None

    def judge(self, view: View) -> Judgement:
        return file_size(view.nbytes, self.min_file_bytes, self.max_file_bytes)


@dataclass
class NearBlank(Check):
    name = "near_blank"
    needs = "pixels"
    reasons = {"near_blank": (REJECTED, "pixel standard deviation of a grayscale thumbnail below --min-pixel-std "
                                        "(blank or flat image)")}
    min_pixel_std: float | None = option(None, help="near-blank: reject if a grayscale thumbnail's pixel std "
                                                    "(0-255) is below this (e.g. 4)")

    def active(self) -> bool:
        return self.min_pixel_std is not None

    def judge(self, view: View) -> Judgement:
        return near_blank(view.image, self.min_pixel_std)
