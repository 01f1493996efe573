"""Pixel-space storage (`prx-data encode --vae none`): bytes per image and read speed of lossless formats.

    .venv/bin/python bench/pixel_storage.py --sizes 256 1024 --repeats 3

Inputs: the four scikit-image colour photos (astronaut, coffee, chelsea, rocket) centre-cropped square and
resized (bicubic) to each size: at 1024 px they are upscaled, so smoother than a native 1024 px photo and the
compressed sizes there are a lower bound. Formats: raw uint8 `.npy`, PNG (zlib level 1 and 6), WebP lossless.
Each is checked lossless (decoded bytes equal the input). Read = decode to the float32 3 x H x W tensor in
[-1, 1] the trainer trains on; best of --repeats, one thread. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def photos(size: int) -> list[np.ndarray]:
    import skimage.data
    from PIL import Image

    out = []
    for img in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()):
        h, w = img.shape[:2]
        s = min(h, w)
        crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        out.append(np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC)))
    return out


def pil_codec(fmt: str, **kw):
    from PIL import Image

    def enc(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt, **kw)
        return buf.getvalue()

    def dec(b):
        with Image.open(io.BytesIO(b)) as im:
            return np.asarray(im.convert("RGB"))
    return enc, dec


def npy_codec():
    def enc(a):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()
    return enc, lambda b: np.load(io.BytesIO(b), allow_pickle=False)


FORMATS = {
    "uint8 npy": npy_codec,
    "PNG level 1": lambda: pil_codec("PNG", compress_level=1),
    "PNG level 6": lambda: pil_codec("PNG", compress_level=6),
    "WebP lossless, method 0": lambda: pil_codec("WEBP", lossless=True, quality=0, method=0),
    "WebP lossless, method 4": lambda: pil_codec("WEBP", lossless=True, quality=100, method=4),
}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(name: str, imgs: list[np.ndarray], repeats: int) -> dict:
    from contract.encoders.pixels import to_unit_range

    enc, dec = FORMATS[name]()
    blobs = [enc(a) for a in imgs]
    for a, b in zip(imgs, blobs):
        assert np.array_equal(dec(b), a), f"{name} is not lossless"
    t_enc = best(lambda: [enc(a) for a in imgs], repeats) / len(imgs)
    t_read = best(lambda: [to_unit_range(dec(b)) for b in blobs], repeats) / len(imgs)
    raw = sum(a.nbytes for a in imgs)
    return {"kb": sum(map(len, blobs)) / len(imgs) / 1024, "ratio": sum(map(len, blobs)) / raw,
            "enc_ms": t_enc * 1e3, "read_ms": t_read * 1e3}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, python {platform.python_version()}")
    print("| size | format | KiB / image | of raw | write ms / image | read ms / image (to [-1, 1] tensor) |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        imgs = photos(size)
        for name in FORMATS:
            r = measure(name, imgs, args.repeats)
            print(f"| {size} | {name} | {r['kb']:.0f} | {r['ratio']:.2f} | {r['enc_ms']:.1f} | {r['read_ms']:.1f} |")


if __name__ == "__main__":
    main()
