"""`prx-sample` and the `prx-eval` extractors: images/s (CPU, tiny models).

    .venv/bin/python bench/sample_eval.py --n 16 --steps 50 --cfg 3.5

Data: the bundled scikit-image / scikit-learn photos ingested and encoded at 64 px by the real stages with
the seeded tiny VAE and tiny T5Gemma; a tiny PRXTransformer2DModel trained 2 steps (`prx-train --model tiny`).
Measured side by side in one process, after one warm-up call each:
- sampler: `trainer.sample.Sampler.generate` on N prompts, CFG batch-doubled over `--batch-size` prompts,
  `--steps` Euler steps, decode included -> images/s;
- PRXPipeline loop: diffusers' `PRXPipeline` built from the same modules, called once per prompt
  (guidance > 1 with several prompts raises in diffusers 0.42.1), same steps and guidance, decode included;
- extractors on N uint8 64 x 64 images: tiny open_clip (CMMD/CLIP score path), tiny DINOv2 (resize to 518),
  torch-fidelity's Inception-v3 at full size with random weights (resize to 299) -> images/s.
Prints a markdown table and writes bench-out/sample_eval.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def make_run(root: str) -> tuple[str, dict]:
    from PIL import Image

    from conftest import photo_arrays
    from pipeline.cli import main as prx_data
    from testing.tiny_models import build
    from trainer.config import TrainConfig
    from trainer.train import run

    models = build(os.path.join(root, "models"), ["tiny-flux-vae", "tiny-t5gemma", "tiny-clip", "tiny-dinov2",
                                                  "tiny-inception"])
    photos = os.path.join(root, "photos")
    os.makedirs(photos)
    for name, arr in photo_arrays().items():
        Image.fromarray(arr).save(os.path.join(photos, f"{name}.jpg"), quality=90)
        with open(os.path.join(photos, f"{name}.txt"), "w") as fh:
            fh.write(f"a photo of {name}")
    common = ["--executor", "local", "--no-progress"]
    assert prx_data(["ingest", "--in", photos, "--out", f"{root}/raw", *common]) == 0
    assert prx_data(["encode", "--in", f"{root}/raw", "--out", f"{root}/enc", "--resolution", "64", "--vae",
                     models["tiny-flux-vae"], "--text-encoder", models["tiny-t5gemma"], *common]) == 0
    run(TrainConfig(shards=[f"{root}/enc"], model="tiny", steps=2, batch_size=4, out=f"{root}/run",
                    tensorboard=False, device="cpu", log_every=100))
    return f"{root}/run", models


def timed(fn, n: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=3.5)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline

    from trainer.extractors import ClipExtractor, DinoExtractor, InceptionExtractor
    from trainer.sample import Sampler, open_run

    root = tempfile.mkdtemp(prefix="bench-sample-")
    run_dir, models = make_run(root)
    sampler = Sampler(open_run(run_dir))
    prompts = [f"a photo number {i} of a cat" for i in range(args.n)]
    seeds = list(range(args.n))
    pipe = PRXPipeline(transformer=sampler.model, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                       text_encoder=sampler.text_encoder.model.encoder, tokenizer=sampler.text_encoder.tokenizer,
                       vae=sampler.vae.model, default_sample_size=64)
    pipe.set_progress_bar_config(disable=True)
    rows = {
        "prx-sample Sampler.generate": timed(lambda: sampler.generate(prompts, seeds, 64, 64, args.steps, args.cfg,
                                                                      batch_size=args.batch_size), args.n),
        "PRXPipeline, one prompt per call": timed(lambda: [pipe(p, guidance_scale=args.cfg, height=64, width=64,
                                                                num_inference_steps=args.steps,
                                                                use_resolution_binning=False) for p in prompts],
                                                  args.n),
    }
    images = torch.randint(0, 256, (args.n, 3, 64, 64), dtype=torch.uint8)
    for label, ex in [("extractor: tiny open_clip (CMMD)", ClipExtractor(models["tiny-clip"])),
                      ("extractor: tiny DINOv2 @518 (DINO-MMD)", DinoExtractor(models["tiny-dinov2"])),
                      ("extractor: Inception-v3 @299, random weights (FID)",
                       InceptionExtractor(os.path.join(models["tiny-inception"], "inception.pth")))]:
        rows[label] = timed(lambda: ex(images), args.n)
    print(f"\nCPU ({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}), "
          f"n={args.n}, 64x64, steps={args.steps}, cfg={args.cfg}, batch {args.batch_size}\n")
    print("| what | images/s |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} |")
    os.makedirs("bench-out", exist_ok=True)
    with open("bench-out/sample_eval.json", "w") as fh:
        json.dump({"args": vars(args), "images_per_s": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
