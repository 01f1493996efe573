"""Benchmark: images/s of `prx-data filter` (CLIP scoring) vs the bare open_clip model on the same batches.

    python bench/filter.py --n 256 --model vit-b-32 --batch-size 64

Input: N distinct JPEGs (random crops of scikit-image/scikit-learn photos, captions), ingested into one shard.
Model: `vit-b-32` is open_clip's ViT-B-32 architecture with random weights (same compute as the
laion2b checkpoint, nothing downloaded), saved as an open_clip local folder; `tiny` is the tiny test model.
Measured, side by side in one process:
  stage        : `prx-data filter --clip-model DIR --executor local` wall time (scan + reduce + apply)
  bare         : the same batches through open_clip directly: decode + preprocess + encode_image + encode_text
  bare_forward : encode_image + encode_text only, on preprocessed tensors
ratio = stage images/s / bare images/s (1.0 = no overhead over the bare model loop).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def make_images(folder: str, n: int, seed: int = 0) -> None:
    import numpy as np
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, k)() for k in ("astronaut", "coffee", "chelsea", "rocket")]
    photos += list(load_sample_images().images)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        arr = photos[i % len(photos)]
        h, w = arr.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 0.9)), int(w * rng.uniform(0.5, 0.9))
        y, x = rng.integers(0, h - ch), rng.integers(0, w - cw)
        img = Image.fromarray(arr[y:y + ch, x:x + cw]).resize((512, int(512 * ch / cw)))
        img.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
        with open(os.path.join(folder, f"{i:06d}.txt"), "w") as fh:
            fh.write(f"photo number {i}, a random crop of a bundled test photo")


def make_model(folder: str, name: str) -> str:
    if name == "tiny":
        from testing.tiny_models import build

        return build(folder, ["tiny-clip"])["tiny-clip"]
    import open_clip
    import torch

    from testing.tiny_models import save_open_clip_folder

    path = os.path.join(folder, "vit-b-32-random")
    if not os.path.exists(os.path.join(path, "open_clip_config.json")):
        torch.manual_seed(0)
        cfg = open_clip.get_model_config("ViT-B-32")
        model = open_clip.create_model("ViT-B-32")
        save_open_clip_folder(model, cfg, {"size": 224}, path)
    return path


def bare(model_dir: str, raw: str, batch_size: int, device: str) -> dict:
    import torch

    from filters.clip import load_clip, resolve_clip
    from contract.shards import list_shards, read_shard

    samples = [s for p in list_shards(raw) for s in read_shard(p)]
    t0 = time.perf_counter()
    model = load_clip(resolve_clip(model_dir), device)
    load_s = time.perf_counter() - t0
    t_total = t_fwd = 0.0
    for s in range(0, len(samples), batch_size):
        batch = samples[s:s + batch_size]
        t0 = time.perf_counter()
        from PIL import Image

        tensors = [model.image_tensor(Image.open(io.BytesIO(x.members["jpg"])).convert("RGB")) for x in batch]
        t1 = time.perf_counter()
        img = model.encode_images(tensors)
        txt = model.encode_texts([x.text("txt") for x in batch])
        (img * txt).sum(1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        t_total += t2 - t0
        t_fwd += t2 - t1
    n = len(samples)
    return {"images": n, "load_s": round(load_s, 2), "bare_s": round(t_total, 3),
            "bare_images_per_s": round(n / t_total, 1), "bare_forward_images_per_s": round(n / t_fwd, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--model", choices=["vit-b-32", "tiny"], default="vit-b-32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="bench-out/filter")
    args = ap.parse_args(argv)

    import torch

    from pipeline.cli import main as prx_data
    from pipeline.runner import worker_device

    device = worker_device()
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    make_images(os.path.join(out, "images"), args.n)
    raw = os.path.join(out, "raw")
    prx_data(["ingest", "--in", os.path.join(out, "images"), "--out", raw, "--shard-size", str(args.n),
              "--executor", "local", "--no-progress"])
    model_dir = make_model(os.path.join(out, "models"), args.model)

    # bare first (also warms the page cache); the stage loads its own model (counted in its time)
    b = bare(model_dir, raw, args.batch_size, device)
    t0 = time.perf_counter()
    rc = prx_data(["filter", "--in", raw, "--out", os.path.join(out, "filtered"), "--clip-model", model_dir,
                   "--batch-size", str(args.batch_size), "--executor", "local", "--no-progress"])
    stage_s = time.perf_counter() - t0
    if rc != 0:
        return rc
    stage_ips = args.n / stage_s
    stage_wo_load = args.n / max(stage_s - b["load_s"], 1e-9)
    result = {
        "model": args.model, "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, **b,
        "stage_s": round(stage_s, 3), "stage_images_per_s": round(stage_ips, 1),
        "stage_images_per_s_excl_model_load": round(stage_wo_load, 1),
        "ratio_stage_vs_bare": round(stage_ips / b["bare_images_per_s"], 3),
        "ratio_excl_model_load": round(stage_wo_load / b["bare_images_per_s"], 3),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
