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
One worker (the local executor), the stages' default thread settings.

Printed per stage: samples/s; CPU-seconds per sample (the process's, all threads); of it, decode/resize
(the GIL-released part: the same images through the same decode and resize calls, timed alone in this
thread) and the rest (GIL held: tar parsing, json, ledgers, tokenisation, batching, writing); and the
implied one-worker ceiling with k cores: 1 / max(rest, decode / min(k, threads), CPU / k).
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
def filter_stage(cfg):
    from pipeline.stages.filter import FilterStage

    class NullClipFilter(FilterStage):
        def _model(self):
            return NULL["clip"]

    return NullClipFilter(cfg)


def recaption_stage(cfg):
    from pipeline.stages.recaption import RecaptionStage

    class NullVLMRecaption(RecaptionStage):
        def backend(self):
            return NULL["vlm"]

    return NullVLMRecaption(cfg)


def encode_stage(cfg):
    from pipeline.stages.encode import EncodeStage

    class NullEncode(EncodeStage):
        def models(self):
            return (*NULL["encode"], None)

        def record(self):
            """The real encoders' widths, which the null ones produce (the loader checks them)."""
            rec = super().record()
            rec["text_encoder"]["hidden_size"] = TEXT_DIM
            rec["vae"].update(latent_channels=LATENT_CHANNELS, downsample=8)
            return rec

    return NullEncode(cfg)


NULL: dict = {}


@dataclass
class Row:
    stage: str
    n: int
    wall: float
    cpu: float
    decode: float      # CPU-seconds per sample of decode/resize, measured alone
    threads: int

    def rest(self) -> float:
        return max(self.cpu / self.n - self.decode, 0.0)

    def ceiling(self, k: int) -> float:
        return 1.0 / max(self.rest(), self.decode / min(k, self.threads), self.cpu / self.n / k, 1e-9)


PROFILE: dict = {"stage": None, "top": 25}


def timed_run(fn, stage: str) -> tuple[float, float]:
    """Wall and process CPU seconds of fn(); under `--profile STAGE` that stage's cProfile top functions."""
    prof = None
    if PROFILE["stage"] == stage:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if prof is not None:
        import pstats

        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(PROFILE["top"])
    return wall, cpu


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
    from pipeline.runner import run_stage
    from pipeline.stages.encode import EncodeConfig
    from pipeline.stages.filter import FilterStage
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
    wall, cpu = timed_run(lambda: run_stage(filter_stage(fcfg)), "filter")

    def fprep(s):
        import imagehash

        img, _ = s.image(fcfg.max_image_pixels)
        imagehash.phash(img)
        NULL["clip"].image_tensor(img)

    rows.append(Row("filter", args.n, wall, cpu, decode_cost(raw, fprep), fcfg.decode_threads))

    rcfg = build_config(RecaptionConfig, {**common, "input": raw, "out": os.path.join(out, "captioned"),
                                          "relax_checks": ["language"], "text_encoder": models["tiny-t5gemma"]})
    NULL["vlm"] = null_vlm()
    wall, cpu = timed_run(lambda: run_stage(recaption_stage(rcfg)), "recaption")
    probe = recaption_stage(rcfg)
    rows.append(Row("recaption", args.n, wall, cpu, decode_cost(raw, probe.prepare), rcfg.decode_threads))

    ecfg = build_config(EncodeConfig, {**common, "input": os.path.join(out, "captioned"),
                                       "out": os.path.join(out, "encoded"), "vae": models["tiny-flux-vae"],
                                       "text_encoder": models["tiny-t5gemma"], "resolution": 256})
    NULL["encode"] = null_encoders(models["tiny-flux-vae"], models["tiny-t5gemma"], ecfg.max_length, ecfg.cleaning)
    wall, cpu = timed_run(lambda: run_stage(encode_stage(ecfg)), "encode")

    def eprep(s):
        img, _ = s.image(ecfg.max_image_pixels)
        bk.crop_resize(img, bk.plan_crop(img.width, img.height, ecfg.resolution, ecfg.buckets))

    rows.append(Row("encode", args.n, wall, cpu, decode_cost(raw, eprep), ecfg.decode_threads))
    rows.append(loader_row(os.path.join(out, "encoded"), args))
    return rows


def loader_row(folder: str, args) -> Row:
    """The trainer's MixtureLoader over encode's output: long captions, batch 256, one process."""
    from trainer.config import Mixture, Source
    from trainer.data import MixtureLoader, open_sources

    loader = MixtureLoader(open_sources(Mixture([Source("a", folder, 1.0)], {"long": 1.0})), args.loader_batch)
    loader.next_batch()  # shards opened, buffer filled
    n = args.loader_batches * args.loader_batch
    wall, cpu = timed_run(lambda: [loader.next_batch() for _ in range(args.loader_batches)], "loader")
    return Row("loader", n, wall, cpu, 0.0, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="samples (a few thousand; fewer for a quick run)")
    p.add_argument("--quick", action="store_true", help="200 samples")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--cores", type=int, default=12, help="k: cores of the worker's machine for the ceiling")
    p.add_argument("--loader-batch", type=int, default=256)
    p.add_argument("--loader-batches", type=int, default=20)
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
    print(f"| stage | samples/s here | CPU ms/sample | decode/resize ms (GIL released) | rest ms (GIL held) | "
          f"ceiling at {args.cores} cores (samples/s) | GPU rate | ceiling / GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        model, rate = GPU_RATES[r.stage]
        c = r.ceiling(args.cores)
        print(f"| {r.stage} | {r.n / r.wall:.0f} | {1e3 * r.cpu / r.n:.2f} | {1e3 * r.decode:.2f} | "
              f"{1e3 * r.rest():.2f} | {c:.0f} | {model} ~{rate:,}/s | {c / rate:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
