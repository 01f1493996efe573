"""`prx-train` throughput: training samples/s (and MFU on a GPU), and the loader alone vs plain webdataset.

    .venv/bin/python bench/train.py --n 256 --steps 20                 # CPU: reduced model, tiny encoders
    .venv/bin/python bench/train.py --n 1024 --gpu --batch-size 32     # GPU: prx-small, BF16, compile off/on

Data: N distinct JPEGs (random crops of scikit-image photos, made by bench/encode.py's `make_inputs`)
ingested and encoded by the real stages (`prx-data ingest`, `prx-data encode --resolution 256`, square
crops) with the seeded tiny VAE (16 latent channels, /8: the same 16 x 32 x 32 latents as FLUX.1's VAE at
256 px) and the tiny T5Gemma (32-wide embeddings; the real one is 2304 wide, so real shards carry more
bytes per sample than these).

Measured, in one process:
- loader: `trainer.data.MixtureLoader` (the trainer's loader, no prefetch thread) -> samples/s, batches of B;
- webdataset raw: `webdataset.WebDataset(shards)` iterating the same tars, bytes only (the I/O floor);
- webdataset + same decode: webdataset plus the same per-sample work (safetensors load of the latent and
  one caption embedding, pad to 256 with a mask, posterior sample, batch of B) -> the fair comparison;
- training: `prx-train`'s step (loader + objective + backward + AdamW) on a reduced PRX model on the CPU
  (hidden 256, depth 4, 4 heads, mlp 3.5, patch 2; `--model` picks another preset), samples/s after warm-up;
  with `--gpu`, `prx-small` with BF16 autocast, torch.compile off and on, batch B per GPU, MFU.
Prints a markdown table and writes bench-out/train.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def make_inputs(folder: str, n: int) -> None:
    spec = importlib.util.spec_from_file_location("bench_encode", os.path.join(HERE, "encode.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.make_inputs(folder, n)


def build_shards(work: str, n: int, shard_size: int) -> tuple[str, dict]:
    from pipeline.cli import main as prx_data
    from pipeline.tiny_models import build

    enc = os.path.join(work, "enc")
    models = build(os.path.join(work, "tiny"), ["tiny-flux-vae", "tiny-t5gemma"])
    if os.path.exists(os.path.join(enc, "_stage.json")):
        return enc, models
    make_inputs(os.path.join(work, "photos"), n)
    common = ["--executor", "local", "--no-progress"]
    assert prx_data(["ingest", "--in", os.path.join(work, "photos"), "--out", os.path.join(work, "raw"),
                     "--shard-size", str(shard_size), *common]) == 0
    assert prx_data(["encode", "--in", os.path.join(work, "raw"), "--out", enc, "--resolution", "256",
                     "--vae", models["tiny-flux-vae"], "--text-encoder", models["tiny-t5gemma"],
                     "--variants", "original", *common]) == 0
    return enc, models


def loader_rate(enc: str, batch: int, samples: int) -> float:
    from trainer.config import Mixture, Source
    from trainer.data import MixtureLoader, open_sources

    loader = MixtureLoader(open_sources(Mixture([Source("bench", enc, 1.0)], {})), batch)
    loader.next_batch()  # warm-up (first shard open)
    t = time.perf_counter()
    got = 0
    while got < samples:
        got += len(loader.next_batch())
    return got / (time.perf_counter() - t)


def webdataset_rates(enc: str, batch: int, samples: int) -> tuple[float, float]:
    import webdataset as wds
    from safetensors.torch import load

    from pipeline.encoded import sample_posterior, scale_latent
    from pipeline.shards import list_shards
    from trainer.data import pad_embedding

    shards = list_shards(enc)
    vae = json.load(open(os.path.join(enc, "_stage.json")))["provenance"]["encoded"]["vae"]

    def stream():
        while True:
            yield from wds.WebDataset(shards, shardshuffle=False, empty_check=False)

    it = stream()
    next(it)
    t = time.perf_counter()
    nbytes = 0
    for _ in range(samples):
        s = next(it)
        nbytes += sum(len(v) for k, v in s.items() if isinstance(v, bytes))
    raw = samples / (time.perf_counter() - t)

    it = stream()
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    got = 0
    while got < samples:
        means, logvars, embs, masks = [], [], [], []
        while len(means) < batch:
            s = next(it)
            lat = load(s["latent.safetensors"])
            emb, mask, _ = pad_embedding(load(s["emb_original.safetensors"])["hidden"], 256)
            means.append(lat["mean"])
            logvars.append(lat["logvar"])
            embs.append(emb)
            masks.append(mask)
        x0 = scale_latent(sample_posterior(torch.stack(means), torch.stack(logvars), g), vae)
        torch.stack(embs), torch.stack(masks), x0
        got += batch
    return raw, got / (time.perf_counter() - t)


def train_rate(enc: str, models: dict, work: str, model: str, batch: int, steps: int, device: str,
               compile_: bool = False) -> dict:
    from trainer import train as train_mod
    from trainer.config import TrainConfig
    from trainer.model import PRESETS

    if model == "reduced":
        PRESETS["reduced"] = dict(hidden_size=256, depth=4, num_heads=4, mlp_ratio=3.5, patch_size=2,
                                  axes_dim=[32, 32])
    out = os.path.join(work, f"run-{model}-{device}-{int(compile_)}")
    shutil.rmtree(out, ignore_errors=True)
    times: list[float] = []

    def on_step(step, _):
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    cfg = TrainConfig(shards=[enc], model=model, steps=steps, batch_size=batch, out=out, log_every=10**9,
                      checkpoint_every=10**9, tensorboard=False, device=device, vae=models["tiny-flux-vae"],
                      text_encoder=models["tiny-t5gemma"], compile=compile_, caption={"original": 1.0})
    res = train_mod.run(cfg, on_step=on_step)
    warm = max(2, steps // 4)
    secs = times[-1] - times[warm - 1]
    n = (len(times) - warm) * batch
    from trainer.model import train_flops_per_sample

    flops = train_flops_per_sample(dict(res["model"].config), 32, 32, 256) * n / secs
    from trainer.metrics import device_peak_flops

    peak = device_peak_flops(torch.device(device))
    return {"model": model, "params_M": round(sum(p.numel() for p in res["model"].parameters()) / 1e6, 1),
            "device": device if device == "cpu" else torch.cuda.get_device_name(0), "batch": batch,
            "compile": compile_, "samples_per_s": n / secs, "model_tflops_per_s": flops / 1e12,
            "mfu": (flops / peak) if peak else None, "timed_steps": len(times) - warm}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="distinct photos encoded")
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--loader-samples", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--model", default="reduced", help="CPU model: reduced (hidden 256, depth 4) or tiny")
    ap.add_argument("--gpu", action="store_true", help="also prx-small with BF16 autocast, compile off and on")
    ap.add_argument("--work", default="bench-out/train")
    ap.add_argument("--loader-threads", type=int, default=1,
                    help="torch intra-op threads while timing the readers (both get the same)")
    args = ap.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)

    enc, models = build_shards(args.work, args.n, args.shard_size)
    threads = torch.get_num_threads()
    rows = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                       f"readers timed with {args.loader_threads} torch thread(s), training with {threads}"}
    torch.set_num_threads(args.loader_threads)
    loader = loader_rate(enc, args.batch_size, args.loader_samples)
    wds_raw, wds_dec = webdataset_rates(enc, args.batch_size, args.loader_samples)
    torch.set_num_threads(threads)
    rows["loader"] = {"trainer_loader_samples_per_s": loader, "webdataset_raw_samples_per_s": wds_raw,
                      "webdataset_same_decode_samples_per_s": wds_dec,
                      "ratio_vs_webdataset_same_decode": loader / wds_dec, "ratio_vs_webdataset_raw": loader / wds_raw}
    rows["train"] = [train_rate(enc, models, args.work, args.model, args.batch_size, args.steps, "cpu")]
    if args.gpu and torch.cuda.is_available():
        for c in (False, True):
            rows["train"].append(train_rate(enc, models, args.work, "prx-small", args.batch_size, args.steps,
                                            "cuda", compile_=c))
    with open(os.path.join(os.path.dirname(args.work.rstrip("/")) or ".", "train.json"), "w") as fh:
        json.dump(rows, fh, indent=2)

    print(f"machine: {rows['machine']}")
    lo = rows["loader"]
    print("\n| reader (batch %d) | samples/s |\n|---|---|" % args.batch_size)
    print(f"| trainer loader (MixtureLoader) | {lo['trainer_loader_samples_per_s']:.0f} |")
    print(f"| webdataset + same decode | {lo['webdataset_same_decode_samples_per_s']:.0f} |")
    print(f"| webdataset raw bytes | {lo['webdataset_raw_samples_per_s']:.0f} |")
    print(f"| ratio loader / webdataset+decode | {lo['ratio_vs_webdataset_same_decode']:.2f} |")
    print("\n| model | params | device | batch | compile | samples/s | model TFLOP/s | MFU |\n|---|---|---|---|---|---|---|---|")
    for r in rows["train"]:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| {r['model']} | {r['params_M']}M | {r['device']} | {r['batch']} | {r['compile']} | "
              f"{r['samples_per_s']:.1f} | {r['model_tflops_per_s']:.4f} | {mfu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
