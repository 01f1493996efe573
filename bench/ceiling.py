"""Host-path ceilings of the model stages: `prx-data filter`, `recaption`, `encode` and the trainer's loader
with null models, so that what is measured is everything one worker does besides its GPU's forward.

    .venv/bin/python bench/ceiling.py --n 2000          # a few thousand samples
    .venv/bin/python bench/ceiling.py --quick           # a quick run (200 samples)
    .venv/bin/python bench/ceiling.py --quick --profile encode   # where a stage's host time goes

Inputs: N distinct JPEGs of 512-1024 px a side (random crops and rescales of scikit-image photos), half with
a ~70-word and half with a ~160-word caption, ingested by the ingest stage; `recaption` reads them and adds
`caption_long.txt` / `caption_short.txt`; `encode` reads recaption's output (three caption variants); the
loader reads encode's output.

Null models, of the real output shapes, injected through the stages' own seams (no library patched):
- filter: a "CLIP ViT-L/14" whose preprocess is open_clip's real 224-px transform and whose tokenizer is
  open_clip's real one, returning a fixed unit vector (768) per text and a seeded random one per image
  (distinct, so semantic dedup keeps what is not a duplicate) (`FilterStage._model`);
- recaption: a "VLM" backend returning a fixed 160-word long and a 16-word short caption
  (`RecaptionStage.backend`);
- encode: a "FLUX.1 VAE" returning zeros (16 x h/8 x w/8) and a "T5Gemma-2B" that tokenises for real
  (the tiny test tokenizer) and returns zeros (tokens x 2304, bfloat16) (`EncodeStage.models`).
One worker (the local executor), the stages' default thread settings; recaption and encode also with
`--prepare-processes 4` (their per-sample work in 4 processes), the loader in this process and as the
trainer runs it (`LoaderFeed`, 4 worker processes, `--loader-workers`'s default).

Printed per stage: samples/s; CPU-seconds per sample of the worker process (all its threads), split into its
main thread (the model loop), its writer thread and the others (prepare threads, torch's intra-op threads,
the process pool's queue threads), and of its children (prepare processes, loader workers); with threads, decode/resize
(the GIL-released part: the same images through the same decode and resize calls, timed alone in this
thread) and the rest, worker CPU - decode/resize, a bound on the GIL-held time (tar parsing, json, ledgers,
batching, writing; it also holds GIL-released C work); with processes the bound is the worker's whole CPU;
and the implied one-worker ceiling with k cores: 1 / max(GIL-held bound, parallel work / min(k, threads or
processes), all CPU / k).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from bench.encode import WORDS  # noqa: E402

GPU_RATES = {"filter": ("CLIP ViT-L/14", 2000), "recaption": ("Qwen2-VL-2B", 100),
             "encode": ("FLUX.1 VAE at 256 px", 2000), "loader": ("prx-small", 300)}
GIL_TARGETS = {"filter": 0.4, "recaption": 5, "encode": 0.4, "loader": 1}   # ms per sample (issue 25)
LATENT_CHANNELS, TEXT_DIM = 16, 2304   # FLUX.1's VAE, T5Gemma-2B's encoder
SHORT = "A photograph of a wooden table under warm light with trees and a clear blue sky."


# ------------------------------------------------------------------------------------------ inputs
def make_inputs(folder: str, n: int, seed: int = 0) -> None:
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    bases = [Image.fromarray(f()) for f in (skimage.data.astronaut, skimage.data.coffee, skimage.data.chelsea,
                                            skimage.data.rocket, skimage.data.hubble_deep_field)]
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        base = bases[i % len(bases)]
        cw, ch = int(rng.integers(base.width // 2, base.width + 1)), int(rng.integers(base.height // 2,
                                                                                      base.height + 1))
        x, y = int(rng.integers(0, base.width - cw + 1)), int(rng.integers(0, base.height - ch + 1))
        side = int(rng.integers(512, 1025))
        scale = side / max(cw, ch)
        img = base.crop((x, y, x + cw, y + ch)).resize((max(512, int(cw * scale)), max(512, int(ch * scale))))
        img.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
        words = rng.choice(WORDS, size=70 if i % 2 else 160)
        with open(os.path.join(folder, f"{i:06d}.txt"), "w") as fh:
            fh.write(f"Image {i}: " + " ".join(words) + ".")


# ------------------------------------------------------------------------------------------ null models
class NullClip:
    """open_clip ViT-L/14's real preprocess and tokenizer; fixed unit embeddings of its width (768)."""

    dim = 768

    def __init__(self):
        import open_clip

        from filters.clip import resolve_clip

        self.spec = resolve_clip("ViT-L-14:openai")
        self.preprocess = open_clip.image_transform(224, is_train=False)
        self.tokenizer = open_clip.get_tokenizer("ViT-L-14")
        v = np.ones(self.dim, np.float32)
        self.vec = v / np.linalg.norm(v)
        self.rng = np.random.default_rng(0)

    def image_tensor(self, image):
        return self.preprocess(image)

    def encode_images(self, tensors) -> np.ndarray:
        """Unit vectors, distinct per image (a fixed one would make semantic dedup drop all but one)."""
        v = self.rng.standard_normal((len(tensors), self.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.tokenizer(texts)
        return np.tile(self.vec, (len(texts), 1))


def long_caption(words: int = 160) -> str:
    """~160 words of the fake backend's sentences: a caption that passes the stage's checks."""
    from captioners.fake import _LONG

    out: list[str] = []
    for sentence in _LONG * 2:
        if len(out) >= words:
            break
        out += sentence.format(subject="a photographed scene", tone="warm", colour="amber", mood="calm").split()
    return " ".join(out)


def null_vlm():
    from captioners.base import Backend, Generation

    long = long_caption()

    class NullVLM(Backend):
        name = "null"

        def model_info(self):
            return {"name": "null-vlm", "id": "null", "revision": "1"}

        def sampling(self):
            return {"temperature": 0.7}

        def generate(self, requests):
            texts = [SHORT if r.variant == "short" else long for r in requests]
            return [Generation(text=t, num_tokens=len(t.split()) + 1, finish_reason="stop", seed=r.seed)
                    for t, r in zip(texts, requests)]

    return NullVLM()


def null_encoders(vae_folder: str, te_folder: str, max_length: int, cleaning: str):
    import torch

    from contract.encoders.text import TextEncoder, load_text_encoder, split_rows
    from contract.encoders.vae import VAE, load_vae

    class NullVAE(VAE):
        def encode(self, pixels):
            z = torch.zeros(pixels.shape[0], LATENT_CHANNELS, pixels.shape[2] // 8, pixels.shape[3] // 8)
            return z, z.clone()

    class NullText(TextEncoder):
        def encode_tokens(self, tok):
            """As TextEncoder.encode_tokens after the forward: the batch's hidden states on the CPU, split into
            each caption's real tokens."""
            hidden = torch.zeros(*tok["input_ids"].shape, TEXT_DIM, dtype=torch.bfloat16)
            return split_rows(hidden, tok["attention_mask"].sum(dim=1).tolist(), self.tokenizer.padding_side == "left")

    vae, text = load_vae(vae_folder), load_text_encoder(te_folder, max_length, cleaning)
    return (NullVAE(vae.model, vae.spec, vae.info, vae.device, vae.bf16),
            NullText(text.model, text.tokenizer, text.spec, text.info, text.device, text.bf16, text.clean))


# ------------------------------------------------------------------------------------------ stages
# (module level: a --prepare-processes child builds the same class from the config, by reference)
from pipeline.stages.encode import EncodeStage  # noqa: E402
from pipeline.stages.filter import FilterStage  # noqa: E402
from pipeline.stages.recaption import RecaptionStage  # noqa: E402


class NullClipFilter(FilterStage):
    def _model(self):
        return NULL["clip"]


class NullVLMRecaption(RecaptionStage):
    def backend(self):
        return NULL["vlm"]


class NullEncode(EncodeStage):
    def models(self):
        return (*NULL["encode"], None)

    def record(self):
        """The real encoders' widths, which the null ones produce (the loader checks them)."""
        rec = super().record()
        rec["text_encoder"]["hidden_size"] = TEXT_DIM
        rec["vae"].update(latent_channels=LATENT_CHANNELS, downsample=8)
        return rec


NULL: dict = {}


@dataclass
class Row:
    """One run of a stage: wall and CPU seconds of the worker process (all its threads) and of its main thread,
    and of its children (prepare processes, loader workers)."""
    stage: str
    n: int
    wall: float
    cpu: float
    main: float        # the worker's main thread (the model loop)
    writer: float      # the worker's writer threads (`write_behind`: tar members and ledger rows)
    side: float        # children: --prepare-processes or the loader's worker processes
    decode: float      # CPU-seconds per sample of decode/resize, measured alone (threads rows)
    threads: int       # prepare threads, or processes when side > 0

    def rest(self) -> float | None:
        """GIL-held bound per sample: with threads, the worker's CPU less the decode/resize measured alone (None
        when that alone took as long: the split does not resolve it); with processes, all of the worker
        process's CPU (it decodes nothing)."""
        if self.side:
            return self.cpu / self.n
        rest = self.cpu / self.n - self.decode
        return rest if rest > 0 else None

    def ceiling(self, k: int) -> float:
        parallel = (self.side / self.n) if self.side else self.decode
        return 1.0 / max(self.rest() or 0.0, parallel / min(k, self.threads), (self.cpu + self.side) / self.n / k,
                         1e-9)


PROFILE: dict = {"stage": None, "top": 25}


def children_cpu() -> float:
    """CPU seconds of this process's live children (prepare processes, loader workers)."""
    import psutil

    total = 0.0
    for c in psutil.Process().children(recursive=True):
        try:
            t = c.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class WriterThreads:
    """CPU seconds of this process's writer threads (named `*-write_*`), sampled every 0.2 s while they live
    (a thread's last fraction of a second before it ends is missed)."""

    def __init__(self):
        import threading

        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _run(self):
        import threading

        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            writers = {t.native_id for t in threading.enumerate() if "-write" in t.name}
            for t in me.threads():
                if t.id in writers:
                    self.cpu[t.id] = t.user_time + t.system_time
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def total(self) -> float:
        return sum(self.cpu.values())


def timed_run(fn, stage: str) -> tuple[float, float, float, float, float]:
    """Wall, process CPU, main-thread CPU, writer-thread CPU and children's CPU seconds of fn(); under
    `--profile STAGE` that stage's cProfile top functions."""
    prof = None
    if PROFILE["stage"] == stage:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0, c0, m0, k0 = time.perf_counter(), time.process_time(), time.thread_time(), children_cpu()
    with WriterThreads() as writers:
        fn()
    wall, cpu, main = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - m0
    side = children_cpu() - k0
    if prof is not None:
        import pstats

        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(PROFILE["top"])
    return wall, cpu, main, writers.total, side


def decode_cost(folder: str, prep) -> float:
    """CPU-seconds per sample of `prep(sample)` (decode and resize) over the folder's samples, in this thread."""
    from contract.shards import Problem, read_shard
    from contract.shards.layout import list_shards

    samples = [s for p in list_shards(folder) for s in read_shard(p) if not isinstance(s, Problem)]
    c0 = time.thread_time()
    for s in samples:
        prep(s)
    return (time.thread_time() - c0) / max(len(samples), 1)


def run_all(args) -> list[Row]:
    from contract.config import build_config
    from contract.encoders import buckets as bk
    from pipeline.cli import main as prx_data
    from pipeline.stages.encode import EncodeConfig
    from pipeline.stages.recaption import RecaptionConfig
    from testing.tiny_models import build

    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    models = build(os.path.join(out, "tiny-models"), ["tiny-flux-vae", "tiny-t5gemma"])
    make_inputs(os.path.join(out, "photos"), args.n)
    raw = os.path.join(out, "raw")
    assert prx_data(["ingest", "--in", os.path.join(out, "photos"), "--out", raw, "--executor", "local",
                     "--no-progress", "--shard-size", str(args.shard_size)]) == 0
    NULL["clip"] = NullClip()
    common = {"executor": "local", "progress": False}
    rows = []

    fcfg = build_config(FilterStage.config_cls, {**common, "input": raw, "out": os.path.join(out, "filtered"),
                                                 "clip_model": "ViT-L-14:openai", "min_side": 256, "keep_top": 0.3,
                                                 "dedup": ["exact", "perceptual", "semantic"]})

    def fprep(s):
        import imagehash

        img, _ = s.image(fcfg.max_image_pixels)
        imagehash.phash(img)
        NULL["clip"].image_tensor(img)

    rows.append(stage_row("filter", NullClipFilter(fcfg), args.n, decode_cost(raw, fprep)))

    NULL["vlm"] = null_vlm()
    for procs in (0, args.processes):
        rcfg = build_config(RecaptionConfig, {**common, "input": raw, "out": os.path.join(out, f"captioned-{procs}"),
                                              "relax_checks": ["language"], "text_encoder": models["tiny-t5gemma"],
                                              "prepare_processes": procs})
        stage = NullVLMRecaption(rcfg)
        rows.append(stage_row("recaption", stage, args.n, 0.0 if procs else decode_cost(raw, stage.prepare), raw))

    NULL["encode"] = None
    for procs in (0, args.processes):
        ecfg = build_config(EncodeConfig, {**common, "input": os.path.join(out, "captioned-0"),
                                           "out": os.path.join(out, f"encoded-{procs}"), "vae": models["tiny-flux-vae"],
                                           "text_encoder": models["tiny-t5gemma"], "resolution": 256,
                                           "prepare_processes": procs})
        if NULL["encode"] is None:
            NULL["encode"] = null_encoders(models["tiny-flux-vae"], models["tiny-t5gemma"], ecfg.max_length,
                                           ecfg.cleaning)

        def eprep(s):
            img, _ = s.image(ecfg.max_image_pixels)
            bk.crop_resize(img, bk.plan_crop(img.width, img.height, ecfg.resolution, ecfg.buckets))

        rows.append(stage_row("encode", NullEncode(ecfg), args.n, 0.0 if procs else decode_cost(raw, eprep),
                              os.path.join(out, "captioned-0")))
    rows.append(loader_row(os.path.join(out, "encoded-0"), args, 0))
    rows.append(loader_row(os.path.join(out, "encoded-0"), args, args.loader_workers))
    return rows


def stage_row(name: str, stage, n: int, decode: float, warm_from: str | None = None) -> Row:
    """One stage run through the runner; with --prepare-processes its processes are started (and their stage
    and tokenizer loaded) before the clock starts, as on a worker that has run a shard already."""
    from pipeline.runner import run_stage

    procs = getattr(stage, "prepare_processes", 0)
    if procs:
        warm_pool(stage, warm_from)
    wall, cpu, main, writer, side = timed_run(lambda: run_stage(stage), name)
    label = f"{name}, --prepare-processes {procs}" if procs else name
    return Row(label, n, wall, cpu, main, writer, side, decode, procs or stage.cfg.decode_threads)


def warm_pool(stage, folder: str) -> None:
    from contract.shards import Problem, read_shard
    from contract.shards.layout import list_shards
    from pipeline.prepare_pool import process_pool

    pool = process_pool(type(stage), stage.cfg, stage.prepare_processes)
    samples = [s for s in read_shard(list_shards(folder)[0]) if not isinstance(s, Problem)]
    for f in pool.submit(stage, samples[:4 * stage.prepare_processes]):
        f.result()


def loader_row(folder: str, args, workers: int) -> Row:
    """The trainer's loader over encode's output: long captions, batch 256; in this process (workers 0) or
    as the trainer runs it (`LoaderFeed`, --loader-workers processes)."""
    from trainer.batches import LoaderFeed, LoaderSettings
    from trainer.config import Mixture, Source
    from trainer.data import open_sources

    spec = open_sources(Mixture([Source("a", folder, 1.0)], {"long": 1.0}))
    feed = LoaderFeed(spec, LoaderSettings(args.loader_batch), workers=workers)
    for _ in range(max(1, 2 * workers)):
        feed.next()  # shards opened, buffer filled; workers started, their prefetch full
    n = args.loader_batches * args.loader_batch
    wall, cpu, main, writer, side = timed_run(lambda: [feed.next() for _ in range(args.loader_batches)], "loader")
    feed.close()
    label = f"loader, --loader-workers {workers}" if workers else "loader, in-process"
    return Row(label, n, wall, cpu, main, writer, side, 0.0, max(workers, 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="samples (a few thousand; fewer for a quick run)")
    p.add_argument("--quick", action="store_true", help="200 samples")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--cores", type=int, default=12, help="k: cores of the worker's machine for the ceiling")
    p.add_argument("--loader-batch", type=int, default=256)
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--processes", type=int, default=4, help="--prepare-processes of the process rows")
    p.add_argument("--loader-workers", type=int, default=4, help="the loader row's worker processes (the "
                                                                  "trainer's default)")
    p.add_argument("--out", default="bench-out/ceiling")
    p.add_argument("--profile", choices=sorted(GPU_RATES), help="print this stage's cProfile (slows it: its figures "
                                                                 "are then not the stage's)")
    args = p.parse_args()
    PROFILE["stage"] = args.profile
    if args.quick:
        args.n, args.shard_size, args.loader_batches = 200, 100, 4
    import torch

    rows = run_all(args)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}; "
          f"{args.n} samples\n")
    print("| stage | samples/s here | worker CPU ms/sample | of it: main thread / writer / other threads | "
          f"children CPU ms | decode/resize alone ms | GIL-held bound ms | ceiling at {args.cores} cores | GPU rate | "
          "ceiling / GPU | GIL target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = r.stage.split(",")[0]
        model, rate = GPU_RATES[base]
        c, target = r.ceiling(args.cores), GIL_TARGETS[base]
        rest = r.rest()
        met = "unresolved" if rest is None else "met" if rest * 1e3 <= target else "not met"
        shown = "unresolved" if rest is None else f"{1e3 * rest:.2f}"
        ms = [1e3 * x / r.n for x in (r.cpu, r.main, r.writer, r.cpu - r.main - r.writer, r.side)]
        print(f"| {r.stage} | {r.n / r.wall:.0f} | {ms[0]:.2f} | {ms[1]:.2f} / {ms[2]:.2f} / {ms[3]:.2f} | "
              f"{ms[4]:.2f} | {1e3 * r.decode:.2f} | {shown} | {c:.0f} | {model} ~{rate:,}/s | {c / rate:.2f} | "
              f"{target} ms: {met} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
