"""`prx-train`'s data path: loader samples/s per process with 0-4 workers at real sizes, batch mixing, and
the training step with and without the device-side changes.

    .venv/bin/python bench/train.py                       # CPU: everything below, defaults
    .venv/bin/python bench/train.py --workers 0,1,2,4 --batches 40 --shuffle-buffer 256

Data (testing/synthetic.py: the encode stage's layout, seeded random tensors, real sizes): per sample latent
moments 16 x 32 x 32 float32 (FLUX.1's VAE at 256 px) and three caption variants of 200, 40 and 20 tokens,
2304 wide, BF16 (T5Gemma-2B): 1.33 MB a sample.

1. loader: `trainer.batches.LoaderFeed` (the trainer's feed: plan, collate in W worker processes, in-order
   hand-back), batches of B, samples/s in the training process after warm-up, for each W.
2. mixing: 4 sources x 8 shards x 64 samples whose content is sorted by shard; the fraction of within-batch
   pairs from the same shard, and the fraction of a batch's samples whose shard also fed the batch before,
   for the trainer's defaults, for one shard at a time (the old loader's behaviour), and for a uniform draw
   (simulated: every sample independently from all 32 shards, by source weight).
3. step: a reduced PRX model (hidden 256, depth 4, 4 heads, real 2304-wide context) on the CPU, the same
   batches, two ways: the old host path (pad and caption dropout on the host in the training thread, three
   host reads per step: loss, per-bin losses, grad norm) and the new one (padding and dropout where the
   model runs, values kept there and read every --log-every steps). Interleaved, median step time.
Prints markdown and writes bench-out/train.json. GPU figures (prx-small samples/s and MFU with the loader
against in-memory batches) need a GPU: not measured by this script's CPU run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def real_data(work: str, shards: int, per_shard: int) -> str:
    from testing.synthetic import write_encoded_folder

    folder = os.path.join(work, f"real-{shards}x{per_shard}")
    if not os.path.exists(os.path.join(folder, "_stage.json")):
        write_encoded_folder(folder, shards, per_shard, source="bench")
    return folder


def spec_of(folders: dict[str, str], captions=None):
    from trainer.config import Mixture, Source
    from trainer.data import open_sources

    return open_sources(Mixture([Source(n, f, 1.0) for n, f in folders.items()], captions or {}))


# ------------------------------------------------------------------------------------------- 1. loader
def loader_rate(spec, batch: int, batches: int, workers: int, shuffle_buffer: int) -> float:
    from trainer.batches import LoaderFeed, LoaderSettings

    feed = LoaderFeed(spec, LoaderSettings(batch, shuffle_buffer=shuffle_buffer), workers=workers, prefetch=2)
    for _ in range(max(2, workers)):  # warm-up: workers started, first blocks read
        feed.next()
    t = time.perf_counter()
    got = sum(len(feed.next()) for _ in range(batches))
    rate = got / (time.perf_counter() - t)
    feed.close()
    return rate


# ------------------------------------------------------------------------------------------- 2. mixing
def mixing(work: str, batches: int, batch: int) -> dict:
    import random

    from trainer.data import MixtureLoader, consecutive_overlap, same_shard_rate
    from testing.synthetic import write_encoded_folder

    small = dict(latent_shape=(4, 4, 4), text_dim=8, tokens={"long": 4})
    folders = {}
    for i in range(4):
        f = os.path.join(work, f"sorted-{i}")
        if not os.path.exists(os.path.join(f, "_stage.json")):
            write_encoded_folder(f, 8, 64, source=f"s{i}", seed=i, **small)
        folders[f"s{i}"] = f
    spec = spec_of(folders)

    def measure(bs):
        return {"same_shard_pairs": same_shard_rate(bs), "overlap_with_previous_batch": consecutive_overlap(bs)}

    out = {}
    for name, kw in (("trainer defaults (8 open shards, buffer 2048)", dict(open_shards=8, shuffle_buffer=2048)),
                     ("one shard at a time, shuffled within it (old)", dict(open_shards=1, shuffle_buffer=4 * 64))):
        loader = MixtureLoader(spec, batch, **kw)
        out[name] = measure([loader.next_batch() for _ in range(batches)])

    class Fake:  # a uniform draw: same statistics code, samples drawn independently from all shards
        def __init__(self, rng):
            self.sources = [f"s{rng.randrange(4)}" for _ in range(batch)]
            self.shards = [f"{rng.randrange(8):06d}.tar" for _ in range(batch)]

        def __len__(self):
            return batch

    rng = random.Random(0)
    out["uniform draw (reference)"] = measure([Fake(rng) for _ in range(batches)])
    return out


# ------------------------------------------------------------------------------------------- 3. step
def step_times(spec, batch: int, steps: int, log_every: int) -> dict:
    from diffusers import PRXTransformer2DModel

    from trainer.batches import LoaderFeed, LoaderSettings, StepStats, device_inputs
    from trainer.data import pad_embedding
    from trainer.metrics import bin_losses
    from trainer.objective import ObjectiveConfig, caption_dropout, draw_noise, per_sample_loss
    from trainer.optim import clip_grad

    torch.manual_seed(0)
    model = PRXTransformer2DModel(hidden_size=256, depth=4, num_heads=4, mlp_ratio=3.5, patch_size=2,
                                  axes_dim=[32, 32], in_channels=16, context_in_dim=spec.text_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    oc = ObjectiveConfig()
    feed = LoaderFeed(spec, LoaderSettings(batch, shuffle_buffer=256), workers=0)
    data = [feed.next() for _ in range(steps)]
    device = torch.device("cpu")
    e_emb, e_mask, _ = pad_embedding(spec.empty_prompt, 256)

    def old_step(b, g):
        embs, masks = [], []
        for i in range(len(b)):  # the old loader padded each sample on the host
            emb = b.tokens[(b.index >= i * 256) & (b.index < (i + 1) * 256)]
            e, m, _ = pad_embedding(emb, 256)
            embs.append(e)
            masks.append(m)
        eps, t = draw_noise(b.x0.shape, oc, g)
        emb, mask, _ = caption_dropout(torch.stack(embs), torch.stack(masks), e_emb, e_mask, oc.caption_dropout, g)
        per = per_sample_loss(model, b.x0.to(device), eps.to(device), t.to(device), emb.to(device), mask.to(device),
                              oc, None)
        per.mean().backward()
        float(per.mean().detach())
        bin_losses(per, t)
        float(clip_grad(model, 0.2))
        opt.step()
        opt.zero_grad(set_to_none=True)

    stats = StepStats(device)

    def new_step(b, g, k):
        eps, t = draw_noise(b.x0.shape, oc, g)
        x0, emb, mask = device_inputs(b, device, e_emb, e_mask, oc.caption_dropout, g)
        per = per_sample_loss(model, x0, eps, t, emb, mask, oc, None)
        per.mean().backward()
        stats.add_micro(per, t, 1)
        stats.end_step(clip_grad(model, 0.2, as_tensor=True))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (k + 1) % log_every == 0:
            stats.drain(k)

    g = torch.Generator().manual_seed(0)
    old, new = [], []
    old_step(data[0], g)  # warm-up
    new_step(data[0], g, 0)
    for k, b in enumerate(data):  # interleaved, so machine load hits both alike
        t0 = time.perf_counter()
        old_step(b, g)
        t1 = time.perf_counter()
        new_step(b, g, k)
        t2 = time.perf_counter()
        old.append(t1 - t0)
        new.append(t2 - t1)
    return {"old_host_path_s": statistics.median(old), "new_device_path_s": statistics.median(new),
            "steps": len(data), "batch": batch}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="bench-out/train")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per worker count")
    ap.add_argument("--workers", default="0,1,2,4")
    ap.add_argument("--shuffle-buffer", type=int, default=256,
                    help="per process (a buffered sample holds its open shard and member offsets, not its bytes: "
                         "the reader reads members when the collate asks)")
    ap.add_argument("--mix-batches", type=int, default=100)
    ap.add_argument("--step-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in this process (on a loaded 2-core "
                                                           "machine more threads mostly wait for each other)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} torch threads"}
    real = real_data(args.work, args.shards, args.per_shard)
    spec = spec_of({"bench": real})
    out["loader"] = {w: loader_rate(spec, args.batch_size, args.batches, w, args.shuffle_buffer)
                     for w in [int(x) for x in args.workers.split(",")]}
    out["mixing"] = mixing(args.work, args.mix_batches, args.batch_size)
    out["step"] = step_times(spec, args.step_batch, args.steps, args.log_every)
    with open(os.path.join(os.path.dirname(args.work.rstrip("/")) or ".", "train.json"), "w") as fh:
        json.dump(out, fh, indent=2)

    print(f"machine: {out['machine']}\n\n| loader workers | samples/s (batch {args.batch_size}) | MB/s |\n|---|---|---|")
    for w, r in out["loader"].items():
        print(f"| {w} | {r:.0f} | {r * 1.33:.0f} |")
    print("\n| order | same-shard pairs in a batch | batch samples whose shard fed the previous batch |\n|---|---|---|")
    for name, m in out["mixing"].items():
        print(f"| {name} | {m['same_shard_pairs']:.4f} | {m['overlap_with_previous_batch']:.3f} |")
    s = out["step"]
    print(f"\n| step path (reduced PRX, CPU, batch {s['batch']}) | median s/step |\n|---|---|\n"
          f"| old: host padding + dropout, 3 host reads/step | {s['old_host_path_s']:.3f} |\n"
          f"| new: padding + dropout where the model runs, reads every {args.log_every} steps | "
          f"{s['new_device_path_s']:.3f} |\n| ratio old / new | {s['old_host_path_s'] / s['new_device_path_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
