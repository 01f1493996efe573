"""`prx-data encode` vs the bare models on the same batches: images/s (VAE), captions/s (text encoder).

    .venv/bin/python bench/encode.py --n 256 --batch-size 32 --resolution 256 --repeats 2

Inputs: N distinct JPEGs (random crops of scikit-image photos, 240..640 px a side, so decode and crop
cost is real) with captions of ~30-60 words, ingested by the ingest stage. Models: the seeded tiny
models (`python -m testing.tiny_models`), on the CPU.

Measured, in one process, warm (models loaded and one warm-up pass run before timing), interleaved, best of\n--repeats for each:
- bare VAE: `AutoencoderKL.encode` over the stage's own batches of already cropped pixels -> images/s;
- bare text encoder: the encoder forward over the stage's caption batches (already cleaned and tokenized,
  sorted by length as the stage does) -> captions/s;
- bare total: the two above, per sample (one image + one caption);
- the stage: `prx-data encode --executor local` end to end (read tar, decode, crop, clean, tokenize, both
  encoders, safetensors, write tar + ledger), samples/s; ratio = stage / bare total.
`--arch real` builds FLUX.1's VAE and T5Gemma-2B's encoder from bench/model-configs (architecture configs, no weights) with random weights
and synthetic token ids instead (for a GPU; slow on a CPU).
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("a photo of the scene with warm light soft shadows and a wooden table in the foreground while "
         "in the background there are trees mountains and a clear blue sky the subject looks at the camera "
         "colours are muted and the composition is centred").split()


def make_inputs(folder: str, n: int, seed: int = 0) -> None:
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    bases = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        base = bases[i % len(bases)]
        h = int(rng.integers(240, min(base.shape[0], 640) + 1))
        w = int(rng.integers(240, min(base.shape[1], 640) + 1))
        y, x = int(rng.integers(0, base.shape[0] - h + 1)), int(rng.integers(0, base.shape[1] - w + 1))
        Image.fromarray(base[y:y + h, x:x + w]).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
        words = rng.choice(WORDS, size=int(rng.integers(30, 61)))
        with open(os.path.join(folder, f"{i:06d}.txt"), "w") as fh:
            fh.write(f"Image {i}: " + " ".join(words) + ".")


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_tiny(args) -> list[tuple[str, str]]:
    import torch

    from pipeline.cli import main as prx_data
    from contract.encoders import buckets as bk
    from contract.encoders.text import load_text_encoder
    from contract.encoders.vae import load_vae
    from contract.shards import Problem, read_shard
    from testing.tiny_models import build

    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    models = build(os.path.join(out, "tiny-models"), ["tiny-flux-vae", "tiny-t5gemma"])
    make_inputs(os.path.join(out, "photos"), args.n)
    raw = os.path.join(out, "raw")
    assert prx_data(["ingest", "--in", os.path.join(out, "photos"), "--out", raw, "--executor", "local",
                     "--no-progress", "--shard-size", str(args.n)]) == 0

    vae = load_vae(models["tiny-flux-vae"])
    text = load_text_encoder(models["tiny-t5gemma"], 256, "prx")
    samples = [s for s in read_shard(os.path.join(raw, "000000.tar")) if not isinstance(s, Problem)]
    crops, captions = [], []
    for s in samples:
        img, _ = s.image()
        crops.append(bk.crop_resize(img, bk.plan_crop(img.width, img.height, args.resolution)))
        captions.append(text.clean(s.text("txt")))
    bs = args.batch_size
    pixel_batches = [bk.to_tensor(crops[i:i + bs]) for i in range(0, len(crops), bs)]
    order = sorted(captions, key=len, reverse=True)
    token_batches = [text.tokenize(order[i:i + bs]) for i in range(0, len(order), bs)]

    def run_vae():
        for b in pixel_batches:
            vae.encode(b)

    def run_text():
        with torch.inference_mode():
            for t in token_batches:
                text.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state

    def run_stage():
        enc = os.path.join(out, "encoded")
        shutil.rmtree(enc, ignore_errors=True)
        assert prx_data(["encode", "--in", raw, "--out", enc, "--executor", "local", "--no-progress",
                         "--vae", models["tiny-flux-vae"], "--text-encoder", models["tiny-t5gemma"],
                         "--variants", "original", "--resolution", str(args.resolution),
                         "--batch-size", str(bs), "--decode-threads", str(args.decode_threads)]) == 0

    vae.encode(pixel_batches[0])
    run_text()
    run_stage()  # warm: models cached in this process, as on a worker after its first shard
    n = len(samples)
    t_vae = t_text = t_stage = float("inf")
    for _ in range(args.repeats):  # interleaved, best of each: load from other processes hits all three alike
        t_vae = min(t_vae, timed(run_vae, 1))
        t_text = min(t_text, timed(run_text, 1))
        t_stage = min(t_stage, timed(run_stage, 1))
    bare = n / (t_vae + t_text)
    stage = n / t_stage
    sizes = json.load(open(os.path.join(out, "encoded", "_stage.json")))["counts"]["bytes_per_sample"]
    return [
        ("samples", f"{n} ({args.resolution}x{args.resolution} square crops, batch {bs})"),
        ("bare VAE encode", f"{n / t_vae:.1f} images/s"),
        ("bare text encoder", f"{n / t_text:.1f} captions/s"),
        ("bare VAE + text (per sample)", f"{bare:.1f} samples/s"),
        ("prx-data encode (local executor)", f"{stage:.1f} samples/s"),
        ("ratio stage / bare", f"{stage / bare:.2f}"),
        ("bytes per sample", ", ".join(f"{k} {v:,.0f}" for k, v in sizes.items())),
    ]


def bench_real(args) -> list[tuple[str, str]]:
    """FLUX.1 VAE and T5Gemma-2B encoder architectures, random weights, synthetic token ids."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import T5GemmaConfig, T5GemmaEncoderModel

    cfgs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model-configs")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(cfgs, "flux1-dev-vae.json")))
    vae = vae.to(device).eval().requires_grad_(False)
    full = T5GemmaConfig.from_dict(json.load(open(os.path.join(cfgs, "t5gemma-2b-2b-ul2.json"))))
    enc = T5GemmaEncoderModel(T5GemmaConfig(encoder=full.encoder.to_dict(), is_encoder_decoder=False,
                                            vocab_size=full.vocab_size)).to(device).eval().requires_grad_(False)
    bs, res, L = args.batch_size, args.resolution, 256
    x = torch.rand(bs, 3, res, res, device=device) * 2 - 1
    ids = torch.randint(3, full.vocab_size, (bs, L), device=device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run_vae():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            for _ in range(args.steps):
                vae.encode(x).latent_dist.mean
        sync()

    def run_text():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            for _ in range(args.steps):
                enc(input_ids=ids, attention_mask=mask).last_hidden_state
        sync()

    run_vae(), run_text()
    t_vae, t_text = timed(run_vae, args.repeats), timed(run_text, args.repeats)
    n = bs * args.steps
    return [("device", torch.cuda.get_device_name() if device == "cuda" else "cpu"),
            ("FLUX.1 VAE encode (BF16 autocast)", f"{n / t_vae:.1f} images/s at {res}x{res}, batch {bs}"),
            ("T5Gemma-2B encoder (BF16 autocast)", f"{n / t_text:.1f} captions/s at {L} tokens, batch {bs}")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--decode-threads", type=int, default=4)
    p.add_argument("--arch", choices=["tiny", "real"], default="tiny")
    p.add_argument("--steps", type=int, default=5, help="--arch real: batches per timing")
    p.add_argument("--out", default="bench-out/encode")
    args = p.parse_args()
    import torch

    rows = bench_tiny(args) if args.arch == "tiny" else bench_real(args)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}\n")
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
