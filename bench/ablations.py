"""The PRX ablations side by side: training samples/s relative to the baseline, and peak memory.

    .venv/bin/python bench/ablations.py --n 64 --steps 12 --batch-size 8
    .venv/bin/python bench/ablations.py --ablations baseline,muon,tread --steps 30

Data: N JPEGs (random crops of scikit-image photos, bench/encode.py's `make_inputs`) ingested, recaptioned
(fake backend: the baseline trains on long captions) and encoded by the real stages at 256 px with the
seeded tiny VAE (16 x 32 x 32 latents, 256 image tokens at patch 2), tiny T5Gemma and tiny DINOv2 REPA
features (`--repa-patch-size 2`).

Model (CPU): a reduced PRXTransformer2DModel (hidden 256, depth 8, 4 heads, mlp 3.5, patch 2), saved as a
folder and given to `--model`. Block indices are scaled from prx-small's 16 blocks to 8: routed blocks
2..5 (`--route-start 2 --route-end 5`: tokens rejoin after block route_end, as in PRX), REPA on block 3.

Each ablation is `prx-train --config manifests/ablations/NAME.yaml` (baseline: manifests/train/base.yaml) in
its own process, one after the other in one invocation; figures come from RUN/summary.json (mean samples/s
after the first step, checkpoints excluded; peak memory = the process's max RSS on CPU, max allocated on
CUDA). Prints a markdown table and writes bench-out/ablations.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = {"baseline": "manifests/train/base.yaml", "muon": "manifests/ablations/muon.yaml",
           "repa": "manifests/ablations/repa-dinov2.yaml", "tread": "manifests/ablations/tread.yaml",
           "sprint": "manifests/ablations/sprint.yaml", "ema": "manifests/ablations/ema.yaml"}
REDUCED = dict(hidden_size=256, depth=8, num_heads=4, mlp_ratio=3.5, patch_size=2, axes_dim=[32, 32],
               in_channels=16, context_in_dim=32)


def build_data(work: str, n: int) -> tuple[str, dict]:
    from pipeline.cli import main as prx_data
    from testing.tiny_models import build

    enc = os.path.join(work, "enc")
    models = build(os.path.join(work, "tiny"), ["tiny-flux-vae", "tiny-t5gemma", "tiny-dinov2"])
    if os.path.exists(os.path.join(enc, "_stage.json")):
        return enc, models
    spec = importlib.util.spec_from_file_location("bench_encode", os.path.join(ROOT, "bench", "encode.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.make_inputs(os.path.join(work, "photos"), n)
    common = ["--executor", "local", "--no-progress"]
    assert prx_data(["ingest", "--in", os.path.join(work, "photos"), "--out", os.path.join(work, "raw"),
                     "--shard-size", "16", *common]) == 0
    assert prx_data(["recaption", "--in", os.path.join(work, "raw"), "--out", os.path.join(work, "cap"),
                     "--backend", "fake", "--relax-checks", "language", *common]) == 0
    assert prx_data(["encode", "--in", os.path.join(work, "cap"), "--out", enc, "--resolution", "256",
                     "--vae", models["tiny-flux-vae"], "--text-encoder", models["tiny-t5gemma"],
                     "--repa", models["tiny-dinov2"], "--repa-patch-size", "2", *common]) == 0
    return enc, models


def reduced_model(work: str) -> str:
    import torch
    from diffusers import PRXTransformer2DModel

    folder = os.path.join(work, "reduced-prx")
    if not os.path.exists(os.path.join(folder, "config.json")):
        torch.manual_seed(0)
        PRXTransformer2DModel(**REDUCED).save_pretrained(folder)
    return folder


def run_one(name: str, enc: str, models: dict, model: str, work: str, steps: int, batch: int) -> dict:
    out = os.path.join(work, "runs", name)
    if os.path.exists(out):
        import shutil

        shutil.rmtree(out)
    argv = [sys.executable, "-m", "trainer.cli", "--config", CONFIGS[name], "--shards", enc, "--model", model,
            "--vae", models["tiny-flux-vae"], "--text-encoder", models["tiny-t5gemma"], "--steps", str(steps),
            "--batch-size", str(batch), "--warmup-steps", "0", "--out", out, "--log-every", str(steps),
            "--checkpoint-every", str(10 * steps), "--no-tensorboard", "--device", "cpu",
            "--route-start", "2", "--route-end", "5", "--repa-block", "3"]
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "summary.json")) as fh:
        return json.load(fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="images encoded")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per ablation (the first is not timed)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ablations", default="baseline,muon,repa,tread,sprint,ema")
    ap.add_argument("--work", default=os.path.join(ROOT, "bench-out", "ablations"))
    args = ap.parse_args()
    names = [a.strip() for a in args.ablations.split(",") if a.strip()]
    unknown = [a for a in names if a not in CONFIGS]
    if unknown:
        ap.error(f"unknown ablation(s) {unknown}: choose from {', '.join(CONFIGS)}")
    if "baseline" not in names:
        names.insert(0, "baseline")
    os.makedirs(args.work, exist_ok=True)
    enc, models = build_data(args.work, args.n)
    model = reduced_model(args.work)
    results = {name: run_one(name, enc, models, model, args.work, args.steps, args.batch_size) for name in names}
    base = results["baseline"]["samples_per_s"]
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; reduced PRX "
          f"(hidden 256, depth 8), 256 px (256 tokens), batch {args.batch_size}, {args.steps} steps")
    print("| ablation | samples/s | vs baseline | peak memory (RSS) |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / base:.2f}x | "
              f"{r['peak_memory_bytes'] / 2**20:.0f} MiB |")
    with open(os.path.join(ROOT, "bench-out", "ablations.json"), "w") as fh:
        json.dump({"args": vars(args), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
