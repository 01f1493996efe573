"""`prx-data recaption` (transformers backend) vs the bare `generate` loop on the same batches.

    .venv/bin/python bench/recaption.py --images 16 --batch-sizes 4,16 --pixel-budgets 64,256 --new-tokens 32

Model: the tiny Qwen2-VL (`python -m testing.tiny_models`, built here) unless --model names another folder/alias.
Images: scikit-image / scikit-learn photos, cycled to --images samples in one raw shard (ingest).
Every generation runs to exactly --new-tokens tokens (EOS ignored), so both sides do the same work.

- stage: the whole recaption stage in-process (--executor local): tar read, decode/resize threads, processor,
  generate, checks (content checks relaxed: random weights write gibberish), resume-cache writes, tar write.
  One variant (`short`), so one request per image.
- bare: a loop over the same batches (same images, same order, same batch size, same pixel budget and
  sampling) calling processor + `model.generate`, images decoded and resized before the clock starts.
Reports images/s and output tokens/s for each, and the ratio stage/bare (1.0 = no pipeline overhead).
Model load is excluded from both (the stage's backend is built before the clock starts).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_raw(folder: str, n: int) -> str:
    from PIL import Image

    from pipeline.cli import main as prx_data
    from demo.main import write_photos

    photos = os.path.join(folder, "photos-src")
    write_photos(photos)
    srcs = sorted(f for f in os.listdir(photos) if f.endswith(".jpg"))
    inp = os.path.join(folder, "photos")
    os.makedirs(inp, exist_ok=True)
    for i in range(n):
        img = Image.open(os.path.join(photos, srcs[i % len(srcs)])).convert("RGB")
        img.save(os.path.join(inp, f"{i:05d}.jpg"), quality=92, comment=f"bench {i}".encode())  # distinct keys
    raw = os.path.join(folder, "raw")
    assert prx_data(["ingest", "--in", inp, "--out", raw, "--executor", "local", "--no-progress",
                     "--shard-size", str(n)]) == 0
    return raw


def bare_loop(backend, images, batch_size: int, new_tokens: int, prompt: str) -> tuple[float, int]:
    import torch

    from captioners.base import Request

    gc = backend.generation_config(new_tokens)
    tokens = 0
    start = time.perf_counter()
    for s in range(0, len(images), batch_size):
        reqs = [Request(im, prompt, new_tokens, seed=s + j) for j, im in enumerate(images[s:s + batch_size])]
        inputs = backend.encode(reqs).to(backend.device)
        torch.manual_seed(s)
        with torch.inference_mode():
            res = backend.model.generate(**inputs, generation_config=gc)
        tokens += int(res.sequences[:, inputs["input_ids"].shape[1]:].numel())
    return time.perf_counter() - start, tokens


def stage_run(raw: str, out: str, backend_name: str, model: str, batch_size: int, pixels: int,
              new_tokens: int) -> tuple[float, int, int]:
    from contract.config import build_config
    from pipeline.runner import run_stage
    from contract.shards import Sample, list_shards, read_shard
    from pipeline.stages.recaption import RecaptionConfig, RecaptionStage

    cfg = build_config(RecaptionConfig, {
        "input": raw, "out": out, "executor": "local", "progress": False, "overwrite": True, "backend": backend_name,
        "model": model, "variants": ["short"], "max_new_tokens": [f"short={new_tokens}"], "vlm_max_pixels": pixels,
        "batch_size": batch_size, "model_batch_size": batch_size, "relax_checks":
            ["truncation", "template", "refusal", "repetition", "length", "language"], "retries": 0})
    start = time.perf_counter()
    summary = run_stage(RecaptionStage(cfg))
    seconds = time.perf_counter() - start
    tokens = 0
    for p in list_shards(out):
        for s in read_shard(p):
            if isinstance(s, Sample):
                tokens += s.meta()["captions"]["short"]["output_tokens"]
    return seconds, summary["kept"], tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder/alias (default: the tiny Qwen2-VL, built here)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-sizes", default="4,16")
    ap.add_argument("--pixel-budgets", default="64,256", help="vision tokens per image (x 28*28 pixels)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each side")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    import torch

    import captioners
    from captioners.hf import TransformersBackend
    from captioners.prompts import load as load_prompt
    from contract.shards import Sample, list_shards, read_shard
    from testing.tiny_models import build

    work = args.workdir or tempfile.mkdtemp(prefix="bench-recaption-")
    os.makedirs(work, exist_ok=True)
    model = args.model or build(os.path.join(work, "tiny-models"), ["tiny-qwen2-vl"])["tiny-qwen2-vl"]
    raw = make_raw(work, args.images)
    prompt = load_prompt("short").text
    samples = [s for p in list_shards(raw) for s in read_shard(p) if isinstance(s, Sample)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# recaption bench: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, device {device}, model {model}, "
          f"{args.images} images, {args.new_tokens} new tokens each (EOS ignored)\n")
    print("| backend | batch | pixel budget (tokens) | stage img/s | stage out tok/s | bare img/s | "
          "bare out tok/s | stage/bare |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for budget in [int(b) for b in args.pixel_budgets.split(",")]:
        pixels = budget * 28 * 28
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            backend = TransformersBackend(model, max_pixels=pixels, batch_size=bs, ignore_eos=True, device=device)
            name = f"bench-{budget}-{bs}"
            captioners.register_backend(name, lambda **kw: backend)
            images = []
            for s in samples:  # decoded and resized exactly as the stage does, before the clock starts
                from pipeline.stages.recaption import RecaptionConfig, RecaptionStage

                st = RecaptionStage(RecaptionConfig(vlm_max_pixels=pixels))
                images.append(st.prepare(s))
            bare_loop(backend, images[:bs], bs, 2, prompt)  # warm-up, untimed
            stage_best, bare_best = None, None
            for r in range(args.repeats):
                out = os.path.join(work, f"out-{budget}-{bs}")
                shutil.rmtree(out, ignore_errors=True)
                sec, kept, toks = stage_run(raw, out, name, model, bs, pixels, args.new_tokens)
                assert kept == len(samples) and toks == kept * args.new_tokens, (kept, toks)
                stage_best = min(stage_best or sec, sec)
                bsec, btoks = bare_loop(backend, images, bs, args.new_tokens, prompt)
                assert btoks == len(images) * args.new_tokens
                bare_best = min(bare_best or bsec, bsec)
            n, t = len(samples), len(samples) * args.new_tokens
            row = {"backend": "transformers", "batch": bs, "vision_tokens": budget, "stage_img_s": n / stage_best,
                   "stage_tok_s": t / stage_best, "bare_img_s": n / bare_best, "bare_tok_s": t / bare_best,
                   "ratio": bare_best / stage_best}
            rows.append(row)
            print(f"| transformers | {bs} | {pixels:,} ({budget}) | {row['stage_img_s']:.2f} | {row['stage_tok_s']:.0f} | "
                  f"{row['bare_img_s']:.2f} | {row['bare_tok_s']:.0f} | {row['ratio']:.2f} |", flush=True)
            captioners.unregister_backend(name)
    with open(os.path.join(work, "recaption-bench.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
