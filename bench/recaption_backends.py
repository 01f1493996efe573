"""`prx-data recaption` with the transformers and the vLLM backend, side by side on the same images.

    make test-vllm   # builds .venv-vllm (vLLM's CPU build), which has both backends
    .venv-vllm/bin/python bench/recaption_backends.py --images 64 --repeats 2

Model: the tiny Qwen2-VL built for vLLM (`tiny-qwen2-vl-vllm`, built here) unless --model names another.
Images: --images different crops of the bundled photos in one raw shard (vLLM caches repeated images and
prompt prefixes: identical images would flatter it).
Each backend is built once (its start is timed apart: model load, and for vLLM the engine's start with its
warm-up and compilation), then the whole stage runs in-process (--executor local, the default --batch-size
64: one request list of 128 per batch), long + short captions, every generation to exactly its token budget
(EOS ignored), content checks relaxed (random weights), no retries. Each backend keeps its own sampling
defaults and its CPU settings (transformers: torch's threads, --model-batch-size 16; vLLM: cpu_engine_settings).
Reports samples/s and output tokens/s, best of --repeats.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

RELAXED = ["truncation", "template", "refusal", "repetition", "length", "language"]


def make_raw(folder: str, n: int) -> str:
    """n distinct 256x192 crops of the bundled photos, ingested into one shard."""
    from PIL import Image

    from demo.main import write_photos
    from pipeline.cli import main as prx_data

    src = os.path.join(folder, "photos-src")
    write_photos(src)
    names = sorted(f for f in os.listdir(src) if f.endswith(".jpg"))
    inp = os.path.join(folder, "photos")
    os.makedirs(inp, exist_ok=True)
    for i in range(n):
        img = Image.open(os.path.join(src, names[i % len(names)])).convert("RGB")
        k, (w, h) = i // len(names), img.size
        img.crop((7 * k, 5 * k, w - 3 * k, h - 4 * k)).resize((256, 192)).save(os.path.join(inp, f"{i:05d}.jpg"))
    raw = os.path.join(folder, "raw")
    assert prx_data(["ingest", "--in", inp, "--out", raw, "--executor", "local", "--no-progress",
                     "--shard-size", str(n)]) == 0
    return raw


def build_backend(name: str, model: str):
    """(backend, seconds to build it)."""
    start = time.perf_counter()
    if name == "vllm":
        from captioners.vllm_backend import VLLMBackend

        backend = VLLMBackend(model, ignore_eos=True)
    else:
        from captioners.hf import TransformersBackend

        backend = TransformersBackend(model, device="cpu", ignore_eos=True)
    return backend, time.perf_counter() - start


def stage_run(raw: str, out: str, injected: str, model: str, budgets: dict[str, int]) -> tuple[float, int, int]:
    """(seconds, samples kept, output tokens) of one whole recaption run."""
    from contract.config import build_config
    from pipeline.runner import run_stage
    from contract.shards import Sample, list_shards, read_shard
    from pipeline.stages.recaption import RecaptionConfig, RecaptionStage

    shutil.rmtree(out, ignore_errors=True)
    cfg = build_config(RecaptionConfig, {
        "input": raw, "out": out, "executor": "local", "progress": False, "backend": injected, "model": model,
        "max_new_tokens": [f"{v}={n}" for v, n in budgets.items()], "relax_checks": RELAXED, "retries": 0})
    start = time.perf_counter()
    summary = run_stage(RecaptionStage(cfg))
    seconds = time.perf_counter() - start
    tokens = sum(s.meta()["captions"][v]["output_tokens"] for p in list_shards(out) for s in read_shard(p)
                 if isinstance(s, Sample) for v in budgets)
    return seconds, summary["kept"], tokens


def measure(name: str, model: str, raw: str, work: str, n: int, budgets: dict[str, int], repeats: int) -> dict:
    import captioners

    backend, start_s = build_backend(name, model)
    injected = f"bench-{name}"
    captioners.register_backend(injected, lambda **kw: backend)
    best = None
    try:
        for _ in range(repeats):
            sec, kept, tokens = stage_run(raw, os.path.join(work, f"out-{name}"), injected, model, budgets)
            assert kept == n and tokens == n * sum(budgets.values()), (kept, tokens)
            best = min(best or sec, sec)
    finally:
        captioners.unregister_backend(injected)
        backend.close()
    return {"backend": name, "start_s": start_s, "samples_s": n / best, "tokens_s": tokens / best, "seconds": best}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder/alias (default: tiny-qwen2-vl-vllm, built here)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--long-tokens", type=int, default=64)
    ap.add_argument("--short-tokens", type=int, default=16)
    ap.add_argument("--backends", default="transformers,vllm")
    ap.add_argument("--repeats", type=int, default=2, help="best of N stage runs per backend")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    import torch

    from testing.tiny_models import build

    work = args.workdir or tempfile.mkdtemp(prefix="bench-recaption-backends-")
    os.makedirs(work, exist_ok=True)
    model = args.model or build(os.path.join(work, "tiny-models"), ["tiny-qwen2-vl-vllm"])["tiny-qwen2-vl-vllm"]
    raw = make_raw(work, args.images)
    budgets = {"long": args.long_tokens, "short": args.short_tokens}
    print(f"# recaption backends: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), model {model}, {args.images} images x "
          f"(long {args.long_tokens} + short {args.short_tokens} tokens, EOS ignored), best of {args.repeats}\n")
    print("| backend | start (s) | samples/s | output tokens/s | stage (s) |")
    print("|---|---|---|---|---|")
    for name in args.backends.split(","):
        r = measure(name, model, raw, work, args.images, budgets, args.repeats)
        print(f"| {r['backend']} | {r['start_s']:.1f} | {r['samples_s']:.2f} | {r['tokens_s']:.0f} | "
              f"{r['seconds']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
