"""`make demo`: run what exists end to end on real photos, and print where the outputs are.

Each step is a function taking the demo folder and returning a short line for the final listing;
STEPS runs in order. Later issues append their stage here.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def write_photos(folder: str) -> str:
    """scikit-image's and scikit-learn's bundled photos, with written captions, as a folder of JPEGs."""
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    captions = {
        "astronaut": "Astronaut Eileen Collins in her flight suit in front of an American flag.",
        "coffee": "A cup of coffee on a saucer with a spoon, seen from above.",
        "chelsea": "Chelsea the tabby cat looking up.",
        "rocket": "A rocket on the launch pad before lift-off.",
        "china": "A Chinese temple with a red roof among trees.",
        "flower": "A close-up of a pink flower.",
    }
    os.makedirs(folder, exist_ok=True)
    arrays = {n: getattr(skimage.data, n)() for n in captions if hasattr(skimage.data, n)}
    arrays.update(zip(["china", "flower"], load_sample_images().images))
    for name, arr in arrays.items():
        if arr.ndim != 3:
            continue
        Image.fromarray(arr).save(os.path.join(folder, f"{name}.jpg"), quality=92)
        with open(os.path.join(folder, f"{name}.txt"), "w") as fh:
            fh.write(captions[name])
    return f"photos:  {folder}"


def serve_photos(folder: str, url_list: str):
    """Serve the photos from a loopback HTTP server and write their URL list (url, caption) as parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.download.serve import ImageServer

    server = ImageServer().start()
    urls = server.serve_folder(folder)
    names = sorted(n for n in urls if n.endswith(".jpg"))
    captions = []
    for n in names:
        with open(os.path.join(folder, n[:-4] + ".txt"), encoding="utf-8") as fh:
            captions.append(fh.read())
    pq.write_table(pa.table({"url": [urls[n] for n in names], "caption": captions}), url_list)
    return server, f"URL list: {url_list} (served from {server.url('/')})"


def write_recaption_demo_config(base: str) -> str:
    """Relaxed checks and short budgets for the tiny random Qwen2-VL (the real defaults are in the README)."""
    path = os.path.join(base, "recaption-tiny.yaml")
    with open(path, "w") as fh:
        fh.write("relax_checks: [truncation, template, refusal, repetition, length, language]\n"
                 "max_new_tokens: [long=24, short=8]\n"
                 "vlm_max_pixels: 50176  # 64 vision tokens\n")
    return path


def run(argv: list[str]) -> int:
    from pipeline.cli import main as prx_data

    base = os.path.abspath(argv[0] if argv else "demo-out")
    os.makedirs(base, exist_ok=True)
    lines = [write_photos(os.path.join(base, "photos"))]
    common = ["--executor", "local", "--overwrite"]
    steps = [
        ("download", ["download", "--urls", os.path.join(base, "urls.parquet"), "--out", os.path.join(base, "raw"),
                      "--source", "demo-photos", "--allow-private-network", *common]),
        ("inspect", ["inspect", os.path.join(base, "raw"), "--html", os.path.join(base, "raw.html")]),
        # filter: tiny random open_clip model (scores are meaningless but real: named, stored, in the ledger);
        # image and caption checks and exact + perceptual dedup across shards; rejected samples kept aside.
        # A real run: --clip-model ViT-B-32:laion2b_s34b_b79k --keep-top 0.3 --dedup exact,perceptual,semantic
        ("tiny-models", ["dev", "tiny-models", os.path.join(base, "tiny-models"), "--only", "tiny-clip"]),
        ("filter", ["filter", "--in", os.path.join(base, "raw"), "--out", os.path.join(base, "filtered"),
                    "--clip-model", os.path.join(base, "tiny-models", "tiny-clip"), "--min-side", "64",
                    "--max-aspect-ratio", "4", "--min-pixel-std", "2", "--reject-empty-caption",
                    "--dedup", "exact,perceptual", "--write-rejected", os.path.join(base, "filter-rejected"),
                    *common]),
        # recaption: the tiny random Qwen2-VL through the real transformers path (captions are gibberish,
        # so content checks are relaxed in the demo's config; a real run uses --model qwen2-vl and all checks)
        ("tiny-models", ["dev", "tiny-models", os.path.join(base, "tiny-models"), "--only", "tiny-qwen2-vl"]),
        ("recaption", ["recaption", "--in", os.path.join(base, "filtered"), "--out", os.path.join(base, "captioned"),
                       "--backend", "transformers", "--model", os.path.join(base, "tiny-models", "tiny-qwen2-vl"),
                       "--config", write_recaption_demo_config(base), *common]),
        ("inspect", ["inspect", os.path.join(base, "captioned"), "--html", os.path.join(base, "captioned.html")]),
        # encode: tiny random FLUX.1-like VAE, T5Gemma encoder and DINOv2 (real classes, random weights);
        # a real run uses the defaults --vae flux1 --text-encoder t5gemma-2b (gated) and --repa dinov2
        ("tiny-models", ["dev", "tiny-models", os.path.join(base, "tiny-models"),
                         "--only", "tiny-flux-vae,tiny-t5gemma,tiny-dinov2"]),
        ("encode", ["encode", "--in", os.path.join(base, "captioned"), "--out", os.path.join(base, "encoded"),
                    "--vae", os.path.join(base, "tiny-models", "tiny-flux-vae"),
                    "--text-encoder", os.path.join(base, "tiny-models", "tiny-t5gemma"),
                    "--repa", os.path.join(base, "tiny-models", "tiny-dinov2"),
                    "--variants", "original,long,short", *common]),
        ("inspect", ["inspect", os.path.join(base, "encoded")]),
        # audit: caption statistics of the alt-texts (raw) and the captioned folder side by side, tokens in the
        # encoder's tokenizer, one HTML report + JSON; --fail-on shows a gate (a real one: "long.words.median < 100")
        ("audit", ["audit", os.path.join(base, "raw"), os.path.join(base, "captioned"),
                   "--text-encoder", os.path.join(base, "tiny-models", "tiny-t5gemma"),
                   "--html", os.path.join(base, "audit.html"), "--json", os.path.join(base, "audit.json"),
                   "--fail-on", "empty.rate > 0.5", "--executor", "local"]),
    ]
    # train: a few steps of the tiny PRX denoiser on the encoded shards, long and short captions mixed
    # (a real run: prx-train --shards encoded/ --model prx-small, on a GPU, with torchrun for several)
    train = ["--shards", os.path.join(base, "encoded"), "--model", "tiny", "--steps", "4", "--batch-size", "2",
             "--caption", "long=0.5,short=0.5", "--warmup-steps", "2", "--log-every", "1", "--checkpoint-every", "4",
             "--out", os.path.join(base, "train-run")]
    server, listed = serve_photos(os.path.join(base, "photos"), os.path.join(base, "urls.parquet"))
    lines.append(listed)
    try:
        for name, args in steps:
            print(f"\n$ prx-data {' '.join(args)}", flush=True)
            rc = prx_data(args)
            if rc != 0:
                print(f"demo step {name} failed with exit code {rc}", file=sys.stderr)
                return rc
    finally:
        server.stop()
    from trainer.cli import main as prx_train

    print(f"\n$ prx-train {' '.join(train)}", flush=True)
    rc = prx_train(train)
    if rc:
        print(f"demo step train failed with exit code {rc}", file=sys.stderr)
        return rc
    lines += [f"raw shards: {os.path.join(base, 'raw')}", f"raw grid:   {os.path.join(base, 'raw.html')}"]
    lines += [f"filtered:   {os.path.join(base, 'filtered')} (rejected ones in {os.path.join(base, 'filter-rejected')})"]
    lines += [f"captioned:  {os.path.join(base, 'captioned')} (tiny random VLM: gibberish captions, real provenance)",
              f"captioned grid: {os.path.join(base, 'captioned.html')}"]
    lines += [f"encoded:    {os.path.join(base, 'encoded')} (latents, caption embeddings, REPA features; tiny models)"]
    lines += [f"audit:      {os.path.join(base, 'audit.html')} (+ audit.json): caption statistics, raw vs captioned"]
    lines += [f"train run:  {os.path.join(base, 'train-run')} (tiny PRX denoiser, 4 steps: checkpoints, logs)"]
    print("\nDemo outputs:\n  " + "\n  ".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
