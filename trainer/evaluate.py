"""`prx-eval`: FID, CMMD, DINO-MMD and CLIP score of a run's checkpoint against a real shard folder;
`prx-eval compare`: runs side by side.

    prx-eval --run RUN --real DIR [--caption long] [--n 10000] [--metrics fid,cmmd,dino_mmd,clip_score]
             [--cfg 3.5[,5]] [--steps 50] [--seed 42] [--checkpoint STEP|last] [--real-cache DIR]
             [--inception-weights FILE] [--clip-model ALIAS|DIR] [--dino-model ALIAS|DIR] [--fid-prx]
             [--keep-features]
    prx-eval compare RUN [RUN ...] [--baseline RUN] [--out DIR]

The real set is the first n samples by key of any shard folder with images and captions (read with the
project's shard reader and image decoder), each cropped as the encode stage cropped it (the sample's
`json.encoders.latent` crop box and size; else the centred square at the run's resolution). Sample i is
generated at its caption and size from seed + i. Real features are cached per (real-set hash, extractor,
preprocessing). Results go to RUN/eval/step-NNNNNNNN/metrics.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract.config import ConfigError, add_arguments, build_config, check_bounds, option
from contract.errors import PrxError
from trainer import scores
from trainer.sample import MAX_SEED, MAX_STEPS, check_cfg

METRICS = ("fid", "cmmd", "dino_mmd", "clip_score")
EVAL_CAPTION = "short"  # PRX's eval_unsplash.yaml prompts with caption_llm_s, its short LLM caption
# What makes two evaluations comparable (besides the guidance scale, which pairs rows): metrics.json never merges,
# and `prx-eval compare` never subtracts, evaluations that differ in any of these.
PROTOCOL = ("n", "seeds", "steps", "caption", "real_set_hash", "weights")
EXTRACTOR_OF = {"fid": "inception", "fid_prx": "inception", "cmmd": "clip", "clip_score": "clip", "dino_mmd": "dino"}
EXTRACTOR_OF = {"fid": "inception", "cmmd": "clip", "clip_score": "clip", "dino_mmd": "dino"}


@dataclass
class EvalConfig:
    run: str | None = option(None, help="run folder (prx-train --out)")
    real: str | None = option(None, help="shard folder with images and captions (the reference set)")
    caption: str = option(EVAL_CAPTION, help="caption variant the images are generated at: PRX evaluates at its "
                                             "short LLM caption (eval_unsplash.yaml: caption_llm_s), so every arm is "
                                             "prompted alike; long, or original = the alt-text txt")
    n: int = option(10000, minimum=1, help="samples: the first n of --real by key")
    metrics: list[str] = option(default_factory=lambda: list(METRICS), help="comma-separated: " + ",".join(METRICS))
    cfg: list[float] = option(default_factory=lambda: [3.5], help="guidance scale(s), comma-separated (>= 1)")
    steps: int = option(50, minimum=1, maximum=MAX_STEPS, help="Euler steps")
    seed: int = option(42, minimum=0, maximum=MAX_SEED, help="sample i starts from noise seeded seed + i")
    checkpoint: str = option("last", help="step number or 'last'")
    weights: str | None = option(None, choices=["ema", "raw"], help="default: ema when the run has it, else raw")
    real_cache: str | None = option(None, runtime=True, help="real-feature cache (default ~/.cache/prx/eval-real)")
    inception_weights: str | None = option(None, help="torch-fidelity Inception-v3 weights (.pth or .safetensors), "
                                                      "needed for fid")
    clip_model: str = option("clip-vit-l-14-336", help="open_clip model for cmmd and clip_score (alias or folder)")
    dino_model: str = option("dinov2", help="DINOv2 model for dino_mmd (alias, hub id or folder)")
    fid_prx: bool = option(False, help="also report fid_prx: FID as PRX's published code computes it (generated "
                                       "images truncated to uint8, then wrapped by FrechetInceptionDistance(normalize=True))")
    keep_features: bool = option(False, runtime=True, help="keep the Inception features of fid (real and generated) "
                                                           "next to metrics.json, one safetensors file per cfg")
    batch_size: int = option(16, runtime=True, minimum=1, help="images per sampler batch (x2 with guidance)")
    device: str = option("auto", runtime=True, help="auto (cuda if available), cpu, cuda")
    progress: bool = option(True, runtime=True, help="progress bar with images/s")
    config: str | None = option(None, runtime=True, help="YAML file with any of these options; flags win")


def check_config(cfg: EvalConfig) -> None:
    if not cfg.run or not cfg.real:
        raise PrxError("--run RUN and --real DIR are required")
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown or not cfg.metrics:
        raise PrxError(f"--metrics {','.join(cfg.metrics)}: unknown {unknown}; use some of {','.join(METRICS)}")
    if not cfg.cfg:
        raise PrxError("--cfg: give at least one guidance scale (PRX evaluates at 3.5)")
    for scale in cfg.cfg:
        check_cfg(scale)
    check_bounds(cfg)
    if "fid" in cfg.metrics and not cfg.inception_weights:
        raise PrxError("fid needs Inception-v3 weights: pass --inception-weights FILE (torch-fidelity's "
                         "weights-inception-2015-12-05-6726825d.pth), or leave fid out of --metrics")


# ------------------------------------------------------------------------------------------- real set
@dataclass
class RealSample:
    key: str
    caption: str
    image: Any               # uint8 3 x H x W tensor at `size`
    size: tuple[int, int]    # (height, width)


def _crop_of(sample, img, resolution: int):
    from contract.encoders import buckets as bk

    lat = ((sample.meta().get("encoders") or {}).get("latent") or {})
    if lat.get("size") and lat.get("crop_box"):
        return bk.Crop(str(lat.get("bucket", "")), tuple(lat["size"]), tuple(lat["crop_box"]), img.size)
    return bk.plan_crop(img.width, img.height, resolution)


def load_real(folder: str, caption: str, n: int, resolution: int) -> tuple[list[RealSample], str]:
    """The first n samples by key with an image and the caption variant; and the set's hash."""
    import torch

    from contract.encoded import caption_member
    from contract.encoders import buckets as bk
    from contract.shards import Sample, list_shards, read_shard

    shards = list_shards(folder)
    if not shards:
        raise PrxError(f"--real {folder}: no NNNNNN.tar shards there")
    samples = sorted((s for sh in shards for s in read_shard(sh) if isinstance(s, Sample)), key=lambda s: s.key)
    member = caption_member(caption)
    with_images = [s for s in samples if s.image_member]
    if samples and not with_images:
        raise PrxError(f"--real {folder}: its samples have no images (encoded with --drop-images?); point --real "
                         "at a folder that keeps them, e.g. the encode stage's input")
    usable = [s for s in with_images if member in s.members]
    if with_images and not usable:
        found = sorted({m for s in with_images[:50] for m in s.members if m == "txt" or m.startswith("caption_")})
        variants = ["original" if m == "txt" else m[len("caption_"):-len(".txt")] for m in found]
        hint = f"pass --caption {' or '.join(variants)}" if variants else "recaption it (prx-data recaption)"
        raise PrxError(f"--caption {caption}: no sample of {folder} has {member} (caption members there: "
                         f"{', '.join(found) or 'none'}); {hint}")
    if n > len(usable):
        raise PrxError(f"--n {n}: {folder} has only {len(usable)} samples with an image and the {caption} "
                         f"caption; pass --n {len(usable)} or less")
    out, h = [], hashlib.sha256()
    for s in usable[:n]:
        img, _ = s.image()
        crop = _crop_of(s, img, resolution)
        arr = bk.crop_resize(img, crop)
        text = s.text(member).strip()
        out.append(RealSample(s.key, text, torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous(), tuple(crop.size)))
        h.update(s.key.encode() + hashlib.sha256(s.members[s.image_member]).digest() + text.encode()
                 + str(crop.size).encode())
    return out, h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- features
def build_extractors(cfg: EvalConfig, device: str) -> dict[str, Any]:
    from trainer import extractors as ex

    need = {EXTRACTOR_OF[m] for m in cfg.metrics}
    out: dict[str, Any] = {}
    if "inception" in need:
        out["inception"] = ex.InceptionExtractor(cfg.inception_weights, device)
    if "clip" in need:
        out["clip"] = ex.ClipExtractor(cfg.clip_model, device)
    if "dino" in need:
        out["dino"] = ex.DinoExtractor(cfg.dino_model, device)
    return out


def stack_by_size(images: list) -> list:
    """Images of several sizes -> list of uint8 batches of one size each (extractors take N x 3 x H x W)."""
    import torch

    groups: dict[tuple, list] = {}
    for im in images:
        groups.setdefault(tuple(im.shape), []).append(im)
    return [torch.stack(g) for g in groups.values()]


def features(extractor, images: list, wrap: bool = False) -> np.ndarray:
    """Features of images in input order (batched per size)."""
    order: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        order.setdefault(tuple(im.shape), []).append(i)
    out = [None] * len(images)
    for idx in order.values():
        import torch

        batch = torch.stack([images[i] for i in idx])
        feats = extractor(scores.fid_prx_transform(batch) if wrap else batch)
        for i, f in zip(idx, feats):
            out[i] = f
    return np.stack(out)


def cached_real_features(cache: str, real_hash: str, extractor, images: list, wrap: bool = False) -> tuple[np.ndarray, bool]:
    """(features, whether they came from the cache); cached per (real set, extractor key, preprocessing)."""
    from safetensors.numpy import load_file, save_file

    pre = getattr(extractor, "preprocessing", "") + (" + fid_prx uint8 wrap" if wrap else "")
    name = hashlib.sha256(f"{real_hash}|{extractor.key}|{pre}".encode()).hexdigest()[:24]
    path = os.path.join(cache, f"{name}.safetensors")
    if os.path.isfile(path):
        return load_file(path)["features"], True
    feats = features(extractor, images, wrap).astype(np.float32)
    os.makedirs(cache, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({"features": feats}, tmp, metadata={"real": real_hash, "extractor": extractor.key, "pre": pre})
    os.replace(tmp, path)
    return feats, False


# ------------------------------------------------------------------------------------------- evaluate
def generate(sampler, real: list[RealSample], cfg_scale: float, cfg: EvalConfig) -> tuple[list, list | None]:
    """One image per real sample, at its caption and size, from seed + i; progress bar with images/s.

    Returns the uint8 images rounded (diffusers' postprocess: fid, cmmd, dino_mmd, clip_score) and, with
    --fid-prx, the same images truncated to uint8 as PRX's callback does (else None)."""
    from tqdm import tqdm

    from contract.encoders.vae import to_uint8, to_uint8_truncated

    by_size: dict[tuple, list[int]] = {}
    for i, r in enumerate(real):
        by_size.setdefault(r.size, []).append(i)
    out, trunc = [None] * len(real), [None] * len(real)
    bar = tqdm(total=len(real), desc=f"sampling cfg {cfg_scale}", unit="img", disable=not cfg.progress)
    for (h, w), idx in by_size.items():
        for j in range(0, len(idx), cfg.batch_size):
            chunk = idx[j:j + cfg.batch_size]
            pixels = sampler.generate_pixels([real[i].caption for i in chunk], [cfg.seed + i for i in chunk], h, w,
                                             cfg.steps, cfg_scale, batch_size=cfg.batch_size)
            for i, im, tr in zip(chunk, to_uint8(pixels), to_uint8_truncated(pixels)):
                out[i], trunc[i] = im, tr
            bar.update(len(chunk))
    bar.close()
    return out, (trunc if cfg.fid_prx else None)


def score(cfg: EvalConfig, extractors: dict, real_feats: dict, gen: list, captions: list[str],
          gen_truncated: list | None = None, kept: dict | None = None) -> dict[str, float]:
    """The metric values; with `kept`, the generated Inception features go in kept["inception"]."""
    values: dict[str, float] = {}
    if "fid" in cfg.metrics:
        gen_inception = features(extractors["inception"], gen)
        values["fid"] = scores.fid_from_features(real_feats["inception"], gen_inception)
        if kept is not None:
            kept["inception"] = gen_inception
        if cfg.fid_prx:
            values["fid_prx"] = scores.fid_from_features(real_feats["inception_prx"],
                                                         features(extractors["inception"], gen_truncated, wrap=True))
    clip_gen = features(extractors["clip"], gen) if "clip" in extractors else None
    if "cmmd" in cfg.metrics:
        values["cmmd"] = scores.mmd(real_feats["clip"], clip_gen)
    if "clip_score" in cfg.metrics:
        values["clip_score"] = scores.clip_score(clip_gen, extractors["clip"].text(captions))
    if "dino_mmd" in cfg.metrics:
        values["dino_mmd"] = scores.mmd(real_feats["dino"], features(extractors["dino"], gen))
    return values


def clip_text_note(cfg: EvalConfig, extractors: dict, captions: list[str]) -> dict[str, Any]:
    """The CLIP score reads at most the CLIP tokenizer's context (77 tokens for OpenAI's CLIP): open_clip truncates
    longer captions, so a ~160-word caption is scored on its first ~60 words. Stated in metrics.json."""
    if "clip_score" not in cfg.metrics:
        return {}
    clip = extractors["clip"]
    return {"clip_score_text": {"context_tokens": clip.context_length,
                                "captions_truncated": clip.count_truncated(captions),
                                "note": f"open_clip truncates captions at {clip.context_length} tokens"}}


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation; returns (and writes) the metrics.json document."""
    from trainer.sample import Sampler, open_run, pick_device, report_truncated

    check_config(cfg)
    info = open_run(cfg.run, None, cfg.weights, cfg.checkpoint)
    real, real_hash = load_real(cfg.real, cfg.caption, cfg.n, info.resolution())
    device = pick_device(cfg.device)
    extractors = build_extractors(cfg, device)
    cache = cfg.real_cache or os.path.join(os.path.expanduser("~"), ".cache", "prx", "eval-real")
    images = [r.image for r in real]
    real_feats, cached = {}, {}
    for name, ex in extractors.items():
        real_feats[name], cached[name] = cached_real_features(cache, real_hash, ex, images)
    if cfg.fid_prx and "inception" in extractors:
        real_feats["inception_prx"], cached["inception_prx"] = cached_real_features(
            cache, real_hash, extractors["inception"], images, wrap=True)
    sampler = Sampler(info, device)
    truncated = sum(report_truncated(sampler, [r.caption for r in real]))
    results = []
    for g in cfg.cfg:
        start = time.perf_counter()
        gen, gen_truncated = generate(sampler, real, g, cfg)
        seconds = time.perf_counter() - start
        kept: dict = {}
        values = score(cfg, extractors, real_feats, gen, [r.caption for r in real], gen_truncated, kept)
        results.append({"cfg": g, "metrics": values, "sampling_images_per_s": len(gen) / max(seconds, 1e-9),
                        "_gen_inception": kept.get("inception")})
    doc = {"run": os.path.abspath(info.run_dir), "step": info.step, "checkpoint": info.ckpt, "weights": info.weights,
           "n": cfg.n, "seeds": [cfg.seed, cfg.seed + cfg.n - 1], "steps": cfg.steps, "caption": cfg.caption,
           "real": os.path.abspath(cfg.real), "real_set_hash": real_hash, "real_features_cached": cached,
           "captions_truncated": truncated, **clip_text_note(cfg, extractors, [r.caption for r in real]),
           "shift": sampler.shift, "prediction": sampler.prediction, "results": results,
           "models": {k: v.info() for k, v in extractors.items()},
           "denoiser": {"text_encoder": info.data.get("text_encoder", {}).get("id"),
                        "vae": info.data.get("vae", {}).get("id")}}
    keep_features(cfg, info.run_dir, info.step, doc, real_feats.get("inception"))
    write_metrics(info.run_dir, info.step, doc)
    return doc


def keep_features(cfg: EvalConfig, run_dir: str, step: int, doc: dict, real_inception) -> None:
    """With --keep-features and fid: RUN/eval/step-N/inception-<protocol hash>-cfg<g>.safetensors holding float32
    `real` (n x 2048) and `generated` (n x 2048) pool3 features, named in the result's `features`; the protocol
    hash keeps files of different protocols apart. Drops the results' in-memory features either way."""
    from safetensors.numpy import save_file

    folder = os.path.join(run_dir, "eval", f"step-{step:08d}")
    digest = hashlib.sha256(json.dumps(protocol(doc), sort_keys=True).encode()).hexdigest()[:12]
    for r in doc["results"]:
        gen = r.pop("_gen_inception", None)
        if not cfg.keep_features or gen is None:
            continue
        os.makedirs(folder, exist_ok=True)
        name = f"inception-{digest}-cfg{r['cfg']:g}.safetensors"
        save_file({"real": np.ascontiguousarray(real_inception, dtype=np.float32),
                   "generated": np.ascontiguousarray(gen, dtype=np.float32)}, os.path.join(folder, name),
                  metadata={"protocol": digest, "cfg": f"{r['cfg']:g}", "extractor": "inception"})
        r["features"] = name


def protocol(doc: dict) -> dict[str, Any]:
    """The evaluation protocol of a metrics.json document: PROTOCOL's fields and each extractor's key."""
    return {**{k: doc.get(k) for k in PROTOCOL},
            "extractors": {k: v.get("key") for k, v in sorted(doc.get("models", {}).items())}}


def protocol_differences(a: dict, b: dict) -> list[str]:
    """What makes two evaluations incomparable: PROTOCOL fields, and extractors both used with different keys."""
    pa, pb = protocol(a), protocol(b)
    ea, eb = pa["extractors"], pb["extractors"]
    return [k for k in PROTOCOL if pa[k] != pb[k]] + [f"{n} extractor" for n in sorted(set(ea) & set(eb))
                                                      if ea[n] != eb[n]]


def write_metrics(run_dir: str, step: int, doc: dict) -> str:
    """RUN/eval/step-NNNNNNNN/metrics.json. Results at other guidance scales of the same protocol are kept in it;
    a file of another protocol (n, seeds, sampler steps, caption, real set, weights, extractors) is never merged:
    it is kept beside, as metrics-<its protocol hash>.json, and the new evaluation becomes metrics.json."""
    folder = os.path.join(run_dir, "eval", f"step-{step:08d}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "metrics.json")
    doc["protocol"] = protocol(doc)
    if os.path.isfile(path):
        with open(path) as fh:
            old = json.load(fh)
        if not protocol_differences(old, doc):
            doc["models"] = {**old.get("models", {}), **doc["models"]}
            doc["protocol"] = protocol(doc)
            new_cfgs = {r["cfg"] for r in doc["results"]}
            doc["results"] = [r for r in old.get("results", []) if r["cfg"] not in new_cfgs] + doc["results"]
            doc["results"].sort(key=lambda r: r["cfg"])
        else:
            digest = hashlib.sha256(json.dumps(protocol(old), sort_keys=True).encode()).hexdigest()[:12]
            os.replace(path, os.path.join(folder, f"metrics-{digest}.json"))
    with open(path + ".tmp", "w") as fh:
        json.dump(doc, fh, indent=2)
    os.replace(path + ".tmp", path)
    return path


# ------------------------------------------------------------------------------------------- training hook
def during_training(run_dir: str, step: int, real: str, n: int, tb=None, **overrides) -> dict[str, float]:
    """Evaluate the checkpoint just saved at `step` (EMA weights when present) and log `eval/<metric>`.

    Metrics: cmmd, dino_mmd and clip_score with the default models (FID needs --inception-weights: run
    prx-eval on the checkpoint). `overrides` set any other EvalConfig field (tests pass tiny models)."""
    values = {"run": run_dir, "real": real, "n": n, "checkpoint": str(step), "progress": False,
              "metrics": ["cmmd", "dino_mmd", "clip_score"], **overrides}
    doc = evaluate(EvalConfig(**values))
    flat = {}
    for r in doc["results"]:
        suffix = "" if len(doc["results"]) == 1 else f"@cfg{r['cfg']}"
        flat.update({f"{k}{suffix}": v for k, v in r["metrics"].items()})
    if tb is not None:
        for k, v in flat.items():
            tb.add_scalar(f"eval/{k}", v, step)
    return flat


# ------------------------------------------------------------------------------------------- compare
def run_evaluations(run_dir: str) -> list[dict]:
    root = os.path.join(run_dir, "eval")
    docs = []
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name, "metrics.json")
            if re.fullmatch(r"step-\d{8}", name) and os.path.isfile(path):
                with open(path) as fh:
                    docs.append(json.load(fh))
    return sorted(docs, key=lambda d: d["step"])


def training_facts(run_dir: str, step: int) -> dict[str, Any]:
    """Samples seen (step x batch x accumulation x processes) and the last logged training samples/s."""
    import yaml

    cfg = {}
    if os.path.isfile(os.path.join(run_dir, "config.yaml")):
        with open(os.path.join(run_dir, "config.yaml")) as fh:
            cfg = yaml.safe_load(fh) or {}
    world = 1
    state = os.path.join(run_dir, "checkpoints", f"step-{step:08d}", "state.json")
    if os.path.isfile(state):
        with open(state) as fh:
            world = int(json.load(fh).get("world_size", 1))
    rate = None
    log = os.path.join(run_dir, "train.log")
    if os.path.isfile(log):
        with open(log) as fh:
            found = re.findall(r"samples/s=([0-9.]+)", fh.read())
        rate = float(found[-1]) if found else None
    seen = step * int(cfg.get("batch_size", 0) or 0) * int(cfg.get("grad_accum", 1) or 1) * world
    return {"samples_seen": seen, "train_samples_per_s": rate}


def compare(runs: list[str], baseline: str | None = None) -> dict[str, Any]:
    """Rows (one per run and cfg, latest evaluation), deltas to the baseline, and each run's history.

    Only evaluations of one protocol (PROTOCOL: n, seeds, sampler steps, caption, real set, weights, extractors)
    are compared: a row whose protocol differs from the reference (the baseline, else the first run) gets no
    deltas and is marked `differs: <fields>` in the `protocol` column."""
    runs = list(runs) + ([baseline] if baseline and baseline not in runs else [])
    rows, history, docs_by_run = [], {}, {}
    for run in runs:
        docs = run_evaluations(run)
        if not docs:
            raise PrxError(f"{run}: no evaluation in {run}/eval; run prx-eval --run {run} --real DIR first")
        name = os.path.basename(os.path.abspath(run))
        last = docs_by_run[name] = docs[-1]
        history[name] = [{"step": d["step"], "cfg": r["cfg"], **r["metrics"]} for d in docs
                         if not protocol_differences(d, last) for r in d["results"]]
        for r in last["results"]:
            rows.append({"run": name, "path": os.path.abspath(run), "step": last["step"], "cfg": r["cfg"],
                         "n": last["n"], "weights": last.get("weights"), "caption": last.get("caption"),
                         **{m: r["metrics"].get(m) for m in ("fid", "fid_prx", *METRICS[1:])},
                         **training_facts(run, last["step"])})
    ref_name = os.path.basename(os.path.abspath(baseline or runs[0]))
    for r in rows:
        differs = protocol_differences(docs_by_run[ref_name], docs_by_run[r["run"]])
        r["protocol"] = f"differs: {', '.join(differs)}" if differs else "same"
    if baseline:
        base = {r["cfg"]: r for r in rows if r["run"] == ref_name}
        for r in rows:
            b = base.get(r["cfg"])
            for m in METRICS:
                if b is not None and r["protocol"] == "same" and r.get(m) is not None and b.get(m) is not None:
                    r[f"d_{m}"] = r[m] - b[m]
    return {"baseline": baseline, "reference_protocol": protocol(docs_by_run[ref_name]), "rows": rows,
            "history": history}


COLUMNS = [("run", "run"), ("step", "step"), ("cfg", "cfg"), ("n", "n"), ("weights", "weights"),
           ("protocol", "protocol"), ("fid", "FID"), ("d_fid", "dFID"), ("cmmd", "CMMD"),
           ("d_cmmd", "dCMMD"), ("dino_mmd", "DINO-MMD"), ("d_dino_mmd", "dDINO"), ("clip_score", "CLIP"),
           ("d_clip_score", "dCLIP"), ("samples_seen", "samples seen"), ("train_samples_per_s", "train samples/s")]


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(doc: dict, markdown: bool = False) -> str:
    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in doc["rows"])]
    cells = [[h for _, h in cols]] + [[_cell(r.get(k)) for k, _ in cols] for r in doc["rows"]]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" for _ in cols) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_history(doc: dict, out: str) -> list[str]:
    """One PNG per metric with several evaluations: value over training steps, a line per run and cfg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for m in METRICS:
        lines = {}
        for run, points in doc["history"].items():
            for p in points:
                if p.get(m) is not None:
                    lines.setdefault(f"{run} cfg {p['cfg']}", []).append((p["step"], p[m]))
        if not any(len(v) > 1 for v in lines.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(m)
        ax.legend(fontsize=7)
        path = os.path.join(out, f"{m}.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prx-eval compare", description="Runs' latest evaluations side by side.")
    parser.add_argument("runs", nargs="+", help="run folders with RUN/eval/step-*/metrics.json")
    parser.add_argument("--baseline", help="run the deltas are taken against (same cfg)")
    parser.add_argument("--out", help="folder for compare.md, compare.json and the metric-over-steps plots")
    return parser


def compare_main(argv: list[str]) -> int:
    args = compare_parser().parse_args(argv)
    try:
        doc = compare(args.runs, args.baseline)
    except PrxError as exc:
        print(f"prx-eval compare: error: {exc}", file=sys.stderr)
        return 2
    print(table(doc))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        doc["plots"] = plot_history(doc, args.out)
        with open(os.path.join(args.out, "compare.md"), "w") as fh:
            fh.write(table(doc, markdown=True) + "\n")
        with open(os.path.join(args.out, "compare.json"), "w") as fh:
            json.dump(doc, fh, indent=2)
    return 0


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prx-eval", description=__doc__.split("\n\n")[0],
                                     epilog="`prx-eval compare RUN ... [--baseline RUN] [--out DIR]` compares runs.")
    add_arguments(parser, EvalConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        doc = evaluate(build_config(EvalConfig, vars(args)))
    except (ConfigError, PrxError, FileNotFoundError, ValueError) as exc:
        print(f"prx-eval: error: {exc}", file=sys.stderr)
        return 2
    print(f"n {doc['n']}, {doc['weights']} weights, prompts: the {doc['caption']} caption, seeds "
          f"{doc['seeds'][0]}..{doc['seeds'][1]}, {doc['steps']} steps")
    if "clip_score_text" in doc:
        note = doc["clip_score_text"]
        print(f"clip_score: {note['note']} ({note['captions_truncated']} of {doc['n']} captions truncated)")
    for r in doc["results"]:
        print(f"step {doc['step']} cfg {r['cfg']}: " + " ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
