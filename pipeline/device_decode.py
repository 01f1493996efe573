"""`--decode gpu`: JPEG decode on a torch device (nvJPEG through `torchvision.io.decode_jpeg`) and, on a GPU, the
encode stage's crop-and-resize there too, falling back per image to the CPU decoder (`contract.images`).

The device path takes only what it decodes exactly as the CPU path would: a single-frame baseline or progressive
JPEG in RGB or grayscale, without an EXIF rotation, within --max-image-pixels, that ends with its EOI marker.
Anything else (another format, CMYK, a rotation, a truncated file, a decode error on the device) goes through
`Sample.image`, which accepts or rejects it with the same ledger reasons as a run without `--decode gpu`.

`resize_box` is Pillow's LANCZOS resampling of a box (`Image.resize(size, LANCZOS, box)`) computed on the device:
the same filter coefficients (double), rounded to Pillow's 22-bit fixed point, the same two passes (horizontal over
the rows the vertical pass needs, then vertical) with the same rounding and clipping to uint8 in between. The
products and sums are integers below 2^53, so float64 matrix products compute them exactly in any order: the result
is byte for byte Pillow's two-pass result (a horizontal `resize` then a vertical one). Pillow 13's single `resize`
call orders the passes its own way for some boxes, so on the CPU device the stage resizes the decoded pixels with
Pillow itself (`crop_resize`) and its output is the default run's, byte for byte; on a GPU the crop is resized
there. nvJPEG's IDCT and chroma upsampling may also differ from libjpeg's by a level here and there, so a folder
decoded on a GPU is recorded as such (the stage's provenance names the decoder).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from contract.images import ImageInfo, ImageRejected, probe_image

DECODERS = ("cpu", "gpu")
PRECISION_BITS = 32 - 8 - 2          # Pillow's fixed point for 8-bit resampling (libImaging/Resample.c)
LANCZOS_SUPPORT = 3.0
EOI = b"\xff\xd9"


def on_device(data: bytes, max_pixels: int | None, device: str):
    """(uint8 3 x H x W tensor on `device`, ImageInfo) of a JPEG the device path takes, or None: then the caller
    decodes with the CPU path (which also rejects what must be rejected, with its reasons)."""
    try:
        info = probe_image(data)
    except ImageRejected:
        return None
    if not takes(data, info, max_pixels):
        return None
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                          device=device)
    except (RuntimeError, ValueError):
        return None
    if tuple(img.shape) != (3, info.height, info.width):
        return None
    return img, info


def takes(data: bytes, info: ImageInfo, max_pixels: int | None) -> bool:
    """Whether the device path decodes this image (see the module docstring)."""
    return (info.format == "JPEG" and info.mode in ("RGB", "L") and info.orientation == 1 and info.frames == 1
            and info.width > 0 and info.height > 0 and not (max_pixels and info.width * info.height > max_pixels)
            and data.endswith(EOI))


# ------------------------------------------------------------------------------------------- Pillow's LANCZOS
def _lanczos(x: np.ndarray) -> np.ndarray:
    def sinc(v):
        with np.errstate(invalid="ignore", divide="ignore"):
            pv = v * math.pi
            return np.where(v == 0.0, 1.0, np.sin(pv) / pv)

    return np.where((x >= -LANCZOS_SUPPORT) & (x < LANCZOS_SUPPORT), sinc(x) * sinc(x / 3), 0.0)


@lru_cache(maxsize=256)
def coefficients(in_size: int, in0: float, in1: float, out_size: int) -> tuple[np.ndarray, int, int]:
    """(out_size x (last - first) fixed-point weights as float64, first, last): Pillow's precompute_coeffs and
    normalize_coeffs_8bpc, as a dense matrix over the input pixels [first, last) that any output uses."""
    scale = float(np.float32(in1) - np.float32(in0)) / out_size
    filterscale = max(scale, 1.0)
    support = LANCZOS_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centre = in0 + (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size) - xmin
    x = np.arange(ksize)
    w = _lanczos(((x[None, :] + xmin[:, None]) - centre[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(x[None, :] < xmax[:, None], w, 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]                       # summed in order, as the C loop does
    k = np.divide(w, total, out=w.copy(), where=total != 0.0)
    fixed = np.where(k < 0, np.trunc(-0.5 + k * (1 << PRECISION_BITS)), np.trunc(0.5 + k * (1 << PRECISION_BITS)))
    first, last = int(xmin.min()), int((xmin + xmax).max())
    dense = np.zeros((out_size, last - first))
    rows, cols = np.nonzero(x[None, :] < xmax[:, None])
    dense[rows, xmin[rows] + cols - first] = fixed[rows, cols]
    return dense, first, last


def _round(acc):
    """Pillow's clip8 of an accumulator that started at 1 << (PRECISION_BITS - 1)."""
    import torch

    return torch.floor((acc + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS)).clamp_(0, 255)


def resize_box(img, box: tuple[int, int, int, int], size: tuple[int, int]):
    """uint8 3 x H x W tensor -> uint8 h x w x 3 tensor (size = (h, w)) on its device: Pillow's
    `Image.resize((w, h), LANCZOS, box=box)` of the same pixels, exactly."""
    import torch

    _, height, width = img.shape
    h, w = size
    left, top, right, bottom = box
    if (w, h) == (width, height) and box == (0, 0, width, height):
        return img.permute(1, 2, 0).contiguous()
    kv, y0, y1 = coefficients(height, top, bottom, h)
    x = img.to(torch.float64)
    if w != width or left or right != w:                       # Pillow's need_horizontal
        kh, x0, x1 = coefficients(width, left, right, w)
        x = _round(x[:, y0:y1, x0:x1] @ torch.from_numpy(kh.T).to(x.device))
    else:
        kv, y0, y1 = np.pad(kv, ((0, 0), (y0, 0))), 0, y1       # no horizontal pass: the vertical reads every row
        x = x[:, :y1]
    if h != height or top or bottom != h:                      # Pillow's need_vertical
        x = _round(torch.from_numpy(kv).to(x.device) @ x)
    return x.to(torch.uint8).permute(1, 2, 0).contiguous()


def crop_on_device(img, crop):
    """The encode stage's crop (`contract.encoders.buckets.Crop`) of a decoded 3 x H x W uint8 tensor, as uint8
    h x w x 3: resized on a GPU there (`resize_box`); on the CPU by Pillow, so it is `crop_resize`'s exactly."""
    if img.device.type == "cpu":
        from PIL import Image

        from contract.encoders import buckets as bk

        return bk.crop_resize(Image.fromarray(img.permute(1, 2, 0).numpy()), crop)
    return resize_box(img, crop.box, crop.size)


def to_pil(img):
    """A decoded 3 x H x W uint8 tensor (any device) -> an RGB PIL image on the host."""
    from PIL import Image

    return Image.fromarray(img.permute(1, 2, 0).cpu().numpy(), "RGB")


def provenance(decode: str) -> dict:
    """What `_stage.json` records about the decoder: nothing for the default (the CPU, Pillow), so the config
    hash of every run without `--decode gpu` is unchanged."""
    if decode != "gpu":
        return {}
    import torchvision

    return {"decode": {"decoder": "torchvision.io.decode_jpeg (nvJPEG on a GPU), else contract.images",
                       "torchvision": torchvision.__version__}}
