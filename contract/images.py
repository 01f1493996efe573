"""The one image decoder of the project.

Every stage that looks at pixels goes through `decode_image`, so every stage agrees on what a valid image
is: the size is checked from the header before any pixel is decoded, animated images are refused, EXIF
orientation is applied and the mode is converted to RGB. Failures raise `ImageRejected` with a ledger
reason code.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# We do our own pixel-count check from the header (max_pixels), so PIL's global bomb guard is turned off
# here rather than raising inconsistently between formats.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own warning threshold (~9459 x 9459)

# PIL format name -> member extension (the format detected from the bytes, never the file name).
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff",
              "MPO": "jpg", "AVIF": "avif", "HEIF": "heic"}
IMAGE_EXTS = frozenset(FORMAT_EXT.values()) | {"jpeg", "tif"}


class ImageRejected(Exception):
    """An image that cannot be used; `reason` is a ledger reason code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ImageInfo:
    """What the header says, before decoding pixels."""

    format: str
    ext: str
    width: int  # after EXIF orientation
    height: int
    mode: str
    frames: int
    orientation: int


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ImageRejected("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", f"{len(data)} bytes; first bytes {data[:8]!r}") from None
    except Exception as exc:  # noqa: BLE001 - any header parser crash is a decode error
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}") from None


def probe_image(data: bytes) -> ImageInfo:
    """Read the header only: format, size after orientation, frame count."""
    img = _open(data)
    fmt = img.format or "unknown"
    if fmt not in FORMAT_EXT:
        raise ImageRejected("unsupported_format", fmt)
    w, h = img.size
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
        orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    frames = int(getattr(img, "n_frames", 1) or 1)
    return ImageInfo(fmt, FORMAT_EXT[fmt], w, h, img.mode, frames, orientation)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. High bit depth is scaled, not clipped; transparency goes on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def check_size(info: ImageInfo, max_pixels: int | None) -> None:
    if info.width <= 0 or info.height <= 0:
        raise ImageRejected("decode_error", f"header size {info.width}x{info.height}")
    if max_pixels and info.width * info.height > max_pixels:
        raise ImageRejected("image_too_large",
                            f"{info.width}x{info.height} = {info.width * info.height} pixels > {max_pixels}")


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, ImageInfo]:
    """Bytes -> (RGB PIL image with EXIF orientation applied, header info). Raises ImageRejected."""
    info = probe_image(data)
    check_size(info, max_pixels)
    if info.frames > 1:
        raise ImageRejected("animated_image", f"{info.format} with {info.frames} frames")
    img = _open(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except ImageRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}") from None
    return rgb, info
