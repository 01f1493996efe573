"""Ingest throughput: samples/s for `--executor local` and `--executor dask` on the same generated images.

    .venv/bin/python bench/ingest.py --n 4000 --size 256 --shard-size 250 --workers 2

Images are crops of scikit-image photos with noise (distinct bytes, real JPEG decode cost). Each executor
writes its own output folder; the two outputs are checked to be byte-identical.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import platform
import shutil
import tempfile
import time

import numpy as np
from PIL import Image


def make_images(folder: str, n: int, size: int, seed: int = 0) -> None:
    import skimage.data

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    for i in range(n):
        base = bases[i % len(bases)]
        y = rng.integers(0, base.shape[0] - size // 2)
        x = rng.integers(0, base.shape[1] - size // 2)
        crop = Image.fromarray(base[y:y + size // 2, x:x + size // 2]).resize((size, size))
        arr = np.asarray(crop).astype(np.int16) + rng.integers(-3, 4, (size, size, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
        with open(os.path.join(folder, f"{i:06d}.txt"), "w") as fh:
            fh.write(f"crop {i} of a photo")


def run(src: str, out: str, executor: str, shard_size: int, workers: int) -> float:
    from pipeline.cli import main as prx_data

    args = ["ingest", "--in", src, "--out", out, "--executor", executor, "--shard-size", str(shard_size),
            "--no-progress", "--workers", str(workers), "--source", "bench"]
    start = time.perf_counter()
    assert prx_data(args) == 0
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="prx-bench-ingest-")
    try:
        src = os.path.join(tmp, "images")
        make_images(src, a.n, a.size)
        t_local = run(src, os.path.join(tmp, "local"), "local", a.shard_size, a.workers)
        t_dask = run(src, os.path.join(tmp, "dask"), "dask", a.shard_size, a.workers)
        tars = sorted(f for f in os.listdir(os.path.join(tmp, "local")) if f.endswith(".tar"))
        same = all(filecmp.cmp(os.path.join(tmp, "local", f), os.path.join(tmp, "dask", f), shallow=False)
                   for f in tars)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {a.n} JPEGs {a.size}x{a.size}, "
              f"shard size {a.shard_size}")
        print(f"local : {a.n / t_local:8.1f} samples/s ({t_local:.1f} s)")
        print(f"dask  : {a.n / t_dask:8.1f} samples/s ({t_dask:.1f} s, {a.workers} worker processes, "
              f"cluster start included)")
        print(f"dask/local speed ratio: {t_local / t_dask:.2f}; outputs byte-identical: {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
