"""`make demo` = `python -m demo demo-out`: photos -> URL list on loopback -> `prx-data run
manifests/pipelines/demo.yaml` -> `prx-train` a few steps -> `prx-sample` -> `prx-eval` -> `prx-export`, then a list of where everything is.

STEPS is a list of (name, function). Each function takes the Demo (its folder, the outputs found so far) and
returns an exit status; it adds the outputs it made with `demo.output(what, path, real_command)`. Then
`prx-sample`, `prx-eval` (tiny extractors) and `prx-export` on the checkpoint. Nothing leaves loopback; every model is a tiny random model of
the real class, so captions, images and scores are meaningless: the demo shows the plumbing.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every model is a local folder
os.environ.setdefault("WANDB_MODE", "disabled")
# transformers' "Loading weights" / "Writing model shards" bars (a flash per tiny model, torn across the stages'
# own progress lines): the hub's switch turns them off; prx's progress bars and results stay
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# diffusers' PRXPipeline derives from diffusers' own deprecated LoraLoaderMixin: nothing prx or its user can change
warnings.filterwarnings("ignore", message="`LoraLoaderMixin` is deprecated", category=FutureWarning)

MANIFEST = Path(__file__).resolve().parent.parent / "manifests" / "pipelines" / "demo.yaml"
TINY_MODELS = ["tiny-clip", "tiny-qwen2-vl", "tiny-flux-vae", "tiny-t5gemma", "tiny-dinov2", "tiny-inception"]
CAPTIONS = {
    "astronaut": "Astronaut Eileen Collins in her flight suit in front of an American flag.",
    "coffee": "A cup of coffee on a saucer with a spoon, seen from above.",
    "chelsea": "Chelsea the tabby cat looking up.",
    "rocket": "A rocket on the launch pad before lift-off.",
    "china": "A Chinese temple with a red roof among trees.",
    "flower": "A close-up of a pink flower.",
}


@dataclass
class Output:
    what: str
    path: str
    real: str = ""  # the command that makes it with real models


@dataclass
class Demo:
    base: str
    outputs: list[Output] = field(default_factory=list)
    server: object = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    def output(self, what: str, path: str, real: str = "") -> None:
        self.outputs.append(Output(what, path, real))


def _cores() -> int:
    """CPU cores this process may run on (what torch's DataLoader compares its workers with)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _show(prog: str, argv: list[str]) -> None:
    print(f"\n$ {prog} {' '.join(argv)}", flush=True)


# ------------------------------------------------------------------------------------ steps
def prepare(demo: Demo) -> int:
    """Bundled photos as JPEG + caption files, served on 127.0.0.1 with their URL list; the tiny models."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.download.serve import ImageServer
    from testing.tiny_models import build

    folder = demo.path("photos")
    names = write_photos(folder)
    demo.server = ImageServer().start()
    urls = demo.server.serve_folder(folder)
    pq.write_table(pa.table({"url": [urls[f"{n}.jpg"] for n in names], "caption": [CAPTIONS[n] for n in names]}),
                   demo.path("urls.parquet"))
    print(f"serving {len(names)} photos at {demo.server.url('/')}; URL list {demo.path('urls.parquet')}")
    _show("python", ["-m", "testing.tiny_models", demo.path("tiny-models"), "--only", ",".join(TINY_MODELS)])
    build(demo.path("tiny-models"), TINY_MODELS)
    demo.output("URL list", demo.path("urls.parquet"))
    return 0


def write_photos(folder: str) -> list[str]:
    """scikit-image's and scikit-learn's bundled photos, with written captions; returns their names."""
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    os.makedirs(folder, exist_ok=True)
    arrays = {n: getattr(skimage.data, n)() for n in CAPTIONS if hasattr(skimage.data, n)}
    arrays.update(zip(["china", "flower"], load_sample_images().images))
    names = sorted(n for n, a in arrays.items() if a.ndim == 3)
    for name in names:
        Image.fromarray(arrays[name]).save(os.path.join(folder, f"{name}.jpg"), quality=92)
    return names


def pipeline(demo: Demo) -> int:
    """download -> filter -> recaption -> encode -> audit, one command (the local executor: 2 cores)."""
    from pipeline.cli import main as prx_data

    argv = ["run", str(MANIFEST), "--root", demo.base, "--executor", "local"]
    _show("prx-data", argv)
    try:
        rc = prx_data(argv)
    finally:
        demo.server.stop()
    stages = {"raw shards": "01-download", "filtered shards": "02-filter", "captioned shards": "03-recaption",
              "encoded shards": "04-encode"}
    real = "prx-data run manifests/pipelines/example-laion.yaml  (qwen2-vl, flux1, t5gemma-2b, dinov2)"
    for what, folder in stages.items():
        demo.output(what, demo.path(folder), real if folder == "04-encode" else "")
    demo.output("ledger of a shard", demo.path("04-encode", "000000.parquet"),
                "prx-data ledger DIR --key KEY  (a sample through every stage)")
    demo.output("rejected by the filter", demo.path("filter-rejected"))
    demo.output("audit report", demo.path("05-audit", "audit.html"))
    demo.output("run summary", demo.path("_run.json"))
    if rc == 0:
        _show("prx-data", ["inspect", demo.path("03-recaption"), "--html", demo.path("captioned.html")])
        rc = prx_data(["inspect", demo.path("03-recaption"), "--html", demo.path("captioned.html")])
        demo.output("captioned images grid", demo.path("captioned.html"))
    return rc


def train(demo: Demo) -> int:
    """A few steps of the tiny PRX denoiser on the encoded shards, long and short captions mixed."""
    from trainer.cli import main as prx_train
    from trainer.config import TrainConfig

    # no more loader workers than cores (torch warns about more, and they would only wait)
    workers = min(TrainConfig.loader_workers, _cores())
    argv = ["--shards", demo.path("04-encode"), "--model", "tiny", "--steps", "4", "--batch-size", "2",
            "--caption", "long=0.5,short=0.5", "--warmup-steps", "2", "--log-every", "1",
            "--checkpoint-every", "4", "--loader-workers", str(workers), "--out", demo.path("train-run")]
    _show("prx-train", argv)
    rc = prx_train(argv)
    demo.output("training run (logs, TensorBoard)", demo.path("train-run"),
                "prx-train --shards ROOT/04-encode --model prx-small --out runs/base  (GPU)")
    demo.output("checkpoint", demo.path("train-run", "checkpoints", "step-00000004"))
    return rc


def sample(demo: Demo) -> int:
    """Images from the trained checkpoint at two prompts (Euler on PRX's grid, CFG against the empty prompt)."""
    from trainer.sample import main as prx_sample

    prompts = demo.path("prompts.txt")
    with open(prompts, "w") as fh:
        fh.write(f"{CAPTIONS['chelsea']}\n{CAPTIONS['rocket']}\n")
    argv = ["--run", demo.path("train-run"), "--prompts", prompts, "--steps", "8", "--cfg", "3.5",
            "--out", demo.path("samples"), "--device", "cpu"]
    _show("prx-sample", argv)
    rc = prx_sample(argv)
    demo.output("sampled images (grid)", demo.path("samples", "grid.png"),
                "prx-sample --run runs/base --prompts prompts.txt --steps 50 --cfg 3.5 --out samples/")
    return rc


def evaluate(demo: Demo) -> int:
    """FID, CMMD, DINO-MMD and CLIP score of the checkpoint against the captioned photos (tiny extractors)."""
    from trainer.evaluate import main as prx_eval

    models = demo.path("tiny-models")
    argv = ["--run", demo.path("train-run"), "--real", demo.path("03-recaption"), "--caption", "long", "--n", "4",
            "--steps", "4", "--cfg", "3.5", "--metrics", "fid,cmmd,dino_mmd,clip_score",
            "--inception-weights", os.path.join(models, "tiny-inception", "inception.pth"),
            "--clip-model", os.path.join(models, "tiny-clip"), "--dino-model", os.path.join(models, "tiny-dinov2"),
            "--real-cache", demo.path("eval-cache"), "--device", "cpu", "--no-progress"]
    _show("prx-eval", argv)
    rc = prx_eval(argv)
    demo.output("metrics", demo.path("train-run", "eval", "step-00000004", "metrics.json"),
                "prx-eval --run runs/base --real REAL_SHARDS --caption long --n 10000  (GPU; real extractors)")
    return rc


def export(demo: Demo) -> int:
    """The checkpoint as a folder diffusers' PRXPipeline.from_pretrained loads with no other argument."""
    from trainer.export import main as prx_export

    argv = [demo.path("train-run"), "--out", demo.path("exported")]
    _show("prx-export", argv)
    rc = prx_export(argv)
    demo.output("exported diffusers pipeline", demo.path("exported", "model_index.json"),
                "prx-export runs/base --out prx-base-pipeline")
    return rc


# (name, step): run in order; a step that fails stops the demo.
STEPS: list[tuple[str, Callable[[Demo], int]]] = [
    ("prepare", prepare),
    ("pipeline", pipeline),
    ("train", train),
    ("sample", sample),
    ("eval", evaluate),
    ("export", export),
]


def report(demo: Demo) -> str:
    lines = ["", "Demo outputs (tiny random models: captions, images and scores are meaningless; "
                 "the plumbing is real):"]
    for o in demo.outputs:
        lines.append(f"  {o.what:<34} {o.path}")
        if o.real:
            lines.append(f"  {'':<34}   with real models: {o.real}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    demo = Demo(os.path.abspath(argv[0] if argv else "demo-out"))
    os.makedirs(demo.base, exist_ok=True)
    try:
        for name, step in STEPS:
            rc = step(demo)
            if rc != 0:
                print(f"demo step {name} failed with exit status {rc}", file=sys.stderr)
                return rc
    finally:
        if demo.server is not None:
            demo.server.stop()
    print(report(demo))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
