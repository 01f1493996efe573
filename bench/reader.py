"""The shard reader (`contract.shards.read_shard`) vs plain webdataset, and vs the old streaming reader.

    .venv/bin/python bench/reader.py --shards 3 --per-shard 150 --repeats 3

Data (real sizes, written once into --work by the project's ShardWriter): per sample `latent.safetensors`
(mean + logvar, 16 x 32 x 32 float32: 131 KB), three 2304-wide BF16 embeddings of 200, 40 and 20 tokens
(`emb_long/short/original.safetensors`: 922, 184, 92 KB), a ~30 KB JPEG (a crop of a scikit-image photo),
a small json and three captions (`txt`, `caption_long.txt`, `caption_short.txt`): ~1.36 MB per sample.
The page cache is warmed by one untimed pass of every reader first (all readers then read from memory).

Timed, in one process, 1 torch thread, interleaved (each repeat runs every reader once), best of --repeats:
- trainer read, ours: `read_shard` per shard; per sample the latent and one embedding (variant drawn by a
  seeded RNG, the same draws for every reader) parsed to tensors with `Sample.tensors`; batches of B
  (latents stacked, embeddings zero-padded to the batch's longest) -> samples/s;
- trainer read, webdataset: `webdataset.WebDataset(shards)` with no decoders (raw bytes of every member),
  then the same two members parsed with `safetensors.torch.load` and the same batching;
- text scan: per sample the three captions and `meta()`, ours vs the old reader (before issue 15, kept
  verbatim in tests/test_reader.py as the reference: `tarfile` streaming, every member read).
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"long": 200, "short": 40, "original": 20}
WIDTH = 2304


def _photo_jpegs(n: int) -> list[bytes]:
    """n distinct ~30 KB JPEGs: 256 px crops of the scikit-image / sklearn photos."""
    from PIL import Image

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import photo_arrays

    photos = list(photo_arrays().values())
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        arr = photos[i % len(photos)]
        y, x = rng.integers(0, arr.shape[0] - 256), rng.integers(0, arr.shape[1] - 256)
        buf = io.BytesIO()
        Image.fromarray(arr[y:y + 256, x:x + 256]).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def build(folder: str, shards: int, per_shard: int) -> list[str]:
    from safetensors.torch import save

    from contract.shards import ShardWriter, dumps_json, list_shards

    if len(list_shards(folder)) == shards:
        return list_shards(folder)
    jpegs = _photo_jpegs(shards * per_shard)
    g = torch.Generator().manual_seed(0)
    for s in range(shards):
        w = ShardWriter(folder, s, "bench")
        for i in range(per_shard):
            n = s * per_shard + i
            members = {"latent.safetensors": save({"mean": torch.randn(16, 32, 32, generator=g),
                                                   "logvar": torch.randn(16, 32, 32, generator=g)}),
                       "jpg": jpegs[n], "txt": f"alt text {n}".encode(),
                       "caption_long.txt": (f"a long caption of sample {n} " * 12).encode(),
                       "caption_short.txt": f"short caption {n}".encode(),
                       "json": dumps_json({"input_id": f"photo-{n}.jpg", "width": 256, "height": 256,
                                           "source": "bench", "scores": {"clip:tiny": 0.31}})}
            for v, tokens in VARIANTS.items():
                members[f"emb_{v}.safetensors"] = save(
                    {"hidden": torch.randn(tokens, WIDTH, generator=g).to(torch.bfloat16)})
            w.write(f"{n:032x}", members)
        w.close()
    return list_shards(folder)


def _old_reader():
    spec = importlib.util.spec_from_file_location("test_reader", os.path.join(ROOT, "tests", "test_reader.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.old_read_shard


def _batches(pairs, batch: int):
    """(latent, embedding) pairs -> batches: latents stacked, embeddings padded to the batch's longest."""
    out, n = [], 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        lat = torch.stack([p[0] for p in chunk])
        emb = torch.zeros(len(chunk), max(p[1].shape[0] for p in chunk), WIDTH, dtype=torch.bfloat16)
        for j, p in enumerate(chunk):
            emb[j, :p[1].shape[0]] = p[1]
        out.append((lat, emb))
        n += len(chunk)
    return n


def _draw(rng) -> str:
    return list(VARIANTS)[int(rng.integers(len(VARIANTS)))]


def trainer_ours(shards: list[str], batch: int) -> int:
    from contract.shards import Sample, read_shard

    rng, n, pending = np.random.default_rng(1), 0, []
    for path in shards:
        for s in read_shard(path):
            if not isinstance(s, Sample):
                raise RuntimeError(s)
            lat = s.tensors("latent.safetensors", {"mean": (torch.float32, 3), "logvar": (torch.float32, 3)})
            emb = s.tensors(f"emb_{_draw(rng)}.safetensors", {"hidden": (torch.bfloat16, 2)})["hidden"]
            pending.append((torch.stack([lat["mean"], lat["logvar"]]), emb))
            if len(pending) == batch:
                n += _batches(pending, batch)
                pending = []
    return n + (_batches(pending, batch) if pending else 0)


def trainer_wds(shards: list[str], batch: int) -> int:
    import webdataset as wds
    from safetensors.torch import load

    rng, n, pending = np.random.default_rng(1), 0, []
    for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        lat = load(s["latent.safetensors"])
        emb = load(s[f"emb_{_draw(rng)}.safetensors"])["hidden"]
        pending.append((torch.stack([lat["mean"], lat["logvar"]]), emb))
        if len(pending) == batch:
            n += _batches(pending, batch)
            pending = []
    return n + (_batches(pending, batch) if pending else 0)


def text_scan(reader):
    def scan(shards: list[str], batch: int = 0) -> int:
        from contract.shards import Sample

        n = 0
        for path in shards:
            for s in reader(path):
                if isinstance(s, Sample):
                    captions = [s.text(m) for m in ("txt", "caption_long.txt", "caption_short.txt")]
                    n += bool(s.meta().get("input_id")) and all(captions)
        return n
    return scan


def timed(fn, shards, batch) -> tuple[float, int]:
    start = time.perf_counter()
    n = fn(shards, batch)
    return n / (time.perf_counter() - start), n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "bench-out", "reader"))
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--per-shard", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from contract.shards import read_shard

    shards = build(args.work, args.shards, args.per_shard)
    size = sum(os.path.getsize(p) for p in shards)
    old = _old_reader()
    runs = {("trainer", b, name): fn for b in (8, 32)
            for name, fn in (("ours", trainer_ours), ("webdataset", trainer_wds))}
    runs.update({("text", 0, "ours"): text_scan(read_shard), ("text", 0, "old reader"): text_scan(old)})
    expected = args.shards * args.per_shard
    for fn in runs.values():  # warm the page cache and every import
        fn(shards, 8)
    best: dict = {k: [] for k in runs}
    for r in range(args.repeats):
        for key, fn in runs.items():
            rate, n = timed(fn, shards, key[1] or 8)
            assert n == expected, (key, n)
            best[key].append(rate)
    print(f"{len(shards)} shards, {expected} samples, {size / 1e6:.0f} MB ({size / expected / 1e3:.0f} KB/sample); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread; "
          f"best of {args.repeats} interleaved repeats (all repeats in brackets)\n")
    print("| read | batch | ours, samples/s | reference, samples/s | ratio ours / reference |")
    print("|---|---|---|---|---|")
    for what, b, ref in (("trainer", 8, "webdataset"), ("trainer", 32, "webdataset"), ("text", 0, "old reader")):
        mine, theirs = best[(what, b, "ours")], best[(what, b, ref)]
        label = ("latent + one embedding, parsed (reference: plain webdataset + safetensors.torch.load)"
                 if what == "trainer" else "text scan: 3 captions + json (reference: the old reader)")
        per_run = ", ".join(f"{m / t:.2f}" for m, t in zip(mine, theirs))
        print(f"| {label} | {b or '-'} | {max(mine):.0f} [{', '.join(f'{x:.0f}' for x in mine)}] | "
              f"{max(theirs):.0f} [{', '.join(f'{x:.0f}' for x in theirs)}] | "
              f"**{max(mine) / max(theirs):.2f}** [{per_run}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
