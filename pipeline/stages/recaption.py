"""`prx-data recaption --model qwen2-vl --in raw/ --out shards/`: long and short VLM captions.

Per shard: samples are read in batches of `--batch-size`; their images are decoded and resized to the pixel
budget in a thread pool one batch ahead of the model; every (sample, variant) not already in the resume cache
becomes a request; the backend generates them in one large list; each caption runs the checks
(captioners.checks) and failures are retried under a new seed up to `--retries` times; the batch's outcomes
are appended to the shard's resume cache (`OUT/.cache/recaption/NNNNNN/BBBBBB.jsonl`, one file per batch,
keyed by image key + model id/revision + backend + prompt hash + sampling + budget + seed) before the samples
are handed to a writer thread. A crash loses at most the batch in flight; a rerun regenerates nothing the
cache holds.

Outputs: `caption_{variant}.txt` members and `json.captions.{variant}` provenance. A sample whose variants all
fail is rejected (`caption_all_variants_failed`); one whose variants partly fail is kept with what succeeded
and the ledger row's detail names the failed variants and why.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from captioners import checks as checks_mod
from captioners import factory_token, known_backend, make_backend, resolve_backend_name
from captioners import prompts as prompts_mod
from captioners import sampling as sampling_mod
from captioners import variants as variants_mod
from captioners.base import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, MAX_ASPECT_RATIO, Request
from filters import language as language_mod
from contract import fs, ledger
from contract.config import CommonConfig, option
from contract.images import DEFAULT_MAX_PIXELS as DEFAULT_MAX_IMAGE_PIXELS
from contract.images import ImageRejected
from pipeline.prepare_pool import prepare_processes_option
from pipeline.runner import cached, worker_device
from contract.shards import BadMember, Sample, ShardWriter
from pipeline.stage import MapStage, Result, PrxError, Task, keep, reject

ledger.register_reasons(checks_mod.REASONS)
VLM_ASPECT_RATIO = "vlm_aspect_ratio"
ledger.register_reasons({VLM_ASPECT_RATIO: (ledger.REJECTED, f"long/short side ratio above {MAX_ASPECT_RATIO}, "
                                                             "which the Qwen-VL image processors refuse")})

CACHE_DIR = ".cache/recaption"


@dataclass
class RecaptionConfig(CommonConfig):
    model: str = option("qwen2-vl", help="VLM: alias from manifests/models.yaml (qwen2-vl, qwen2-vl-2b, qwen2.5-vl, "
                                         "qwen3-vl), hub id or local folder")
    backend: str = option("auto", help="auto (vllm when importable and a GPU is present, else transformers), "
                                       "transformers, vllm, fake (no model: plumbing dry run), or module:Class")
    variants: list[str] = option(default_factory=lambda: ["long", "short"],
                                 help="caption variants, each a prompt file captioners/prompts/VARIANT.txt")
    prompt_dir: str | None = option(None, help="folder of VARIANT.txt prompts replacing the built-in ones")
    word_bands: list[str] = option(default_factory=list,
                                   help="VARIANT=MIN-MAX accepted word counts (defaults long=120-200, short=5-25)")
    max_new_tokens: list[str] = option(default_factory=list,
                                       help="VARIANT=N generation budget (defaults long=400, short=64)")
    vlm_max_pixels: int = option(DEFAULT_MAX_PIXELS, help="image pixel budget given to the VLM processor: 1024*28*28 "
                                                          "= at most ~1024 vision tokens per image", minimum=1)
    vlm_min_pixels: int = option(DEFAULT_MIN_PIXELS, help="smallest image size given to the VLM processor (pixels)",
                                 minimum=1)
    temperature: float | None = option(None, help="override the backend's sampling default (0.7)")
    top_p: float | None = option(None, help="override the backend's sampling default (0.8)")
    top_k: int | None = option(None, help="override the backend's sampling default (20)")
    presence_penalty: float | None = option(None, help="vllm only: override the default (1.5)")
    repetition_penalty: float | None = option(None, help="transformers only: override the default (1.05)")
    seed: int = option(0, help="base seed; each (sample, variant, try) derives its own")
    retries: int = option(2, help="retries under a new seed for a caption that fails a check", minimum=0)
    relax_checks: list[str] = option(default_factory=list,
                                     help="checks to skip: truncation, template, refusal, repetition, length, language "
                                          "(for random test models; an empty caption always fails)")
    language: str = option("en", help="expected caption language (ISO 639-1), judged by filters.language")
    language_detector: str = option("fasttext", help="language identification for the language check: fasttext "
                                                     "(lid.176, default) or lingua")
    text_encoder: str | None = option(None, help="count caption tokens with this model's tokenizer (alias, hub id "
                                                 "or folder), recorded in provenance")
    dtype: str = option("auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="model weights dtype (auto: bfloat16 on GPU, float32 on CPU)")
    max_image_pixels: int = option(DEFAULT_MAX_IMAGE_PIXELS, help="reject images whose header declares more pixels",
                                   minimum=1)
    batch_size: int = option(64, runtime=True, help="samples per batch: one request list to the backend, one cache "
                                                    "write (a crash loses at most one batch)", minimum=1)
    model_batch_size: int = option(16, runtime=True, help="transformers: sequences per generate() call", minimum=1)
    decode_threads: int = option(4, runtime=True, help="threads decoding/resizing images ahead of the model", minimum=1)
    prepare_processes: int = prepare_processes_option()
    max_model_len: int = option(8192, runtime=True, help="vllm: max_model_len", minimum=1)
    gpu_memory_utilization: float = option(0.9, runtime=True, help="vllm: gpu_memory_utilization")


def _parse_pairs(items: list[str], what: str, conv) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise PrxError(f"{what}: expected VARIANT=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = conv(v.strip())
        except ValueError as exc:
            raise PrxError(f"{what}: bad value in {item!r}: {exc}") from None
    return out


def _band(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep:
        raise ValueError("expected MIN-MAX")
    lo_i, hi_i = int(lo), int(hi)
    if lo_i > hi_i:
        raise ValueError("MIN > MAX")
    return lo_i, hi_i


def derive_seed(base: int, key: str, variant: str, attempt: int) -> int:
    h = hashlib.sha256(f"{base}:{key}:{variant}:{attempt}".encode()).digest()
    return int.from_bytes(h[:4], "big")


@dataclass
class VariantPlan:
    prompt: prompts_mod.Prompt
    max_new_tokens: int
    checks: checks_mod.CheckConfig


class _Shard(NamedTuple):
    """What every batch of one shard needs: set by `process`, read by `process_prepared`."""

    backend: Any
    plans: dict[str, VariantPlan]
    ckeys: dict[str, str]                     # variant -> resume cache key
    cache: CaptionCache
    done: dict[tuple[str, str, str], dict]   # the resume cache's records
    tokenizer: Any


@dataclass
class Job:
    index: int            # position in the batch
    key: str
    variant: str
    image: Any
    history: list[str] = field(default_factory=list)


class RecaptionStage(MapStage):
    name = "recaption"
    help = "long and short VLM captions (caption_{variant}.txt + json.captions provenance)"
    config_cls = RecaptionConfig
    owned = (".cache",)
    uses_model = True
    write_behind = True

    def __init__(self, cfg: RecaptionConfig, backend=None):
        super().__init__(cfg)
        self.batch_size = max(1, int(cfg.batch_size))
        self.prefetch_threads = max(1, int(cfg.decode_threads))
        self.prepare_processes = int(cfg.prepare_processes)
        self._backend = backend
        self._plans: dict[str, VariantPlan] | None = None

    # ------------------------------------------------------------------ config
    def variant_plans(self) -> dict[str, VariantPlan]:
        if self._plans is not None:
            return self._plans
        cfg = self.cfg
        if not cfg.variants:
            raise PrxError("--variants is empty")
        if len(set(cfg.variants)) != len(cfg.variants) or "original" in cfg.variants:
            raise PrxError("--variants must be distinct and cannot be 'original' (that is the source txt)")
        bands = _parse_pairs(cfg.word_bands, "--word-bands", _band)
        budgets = _parse_pairs(cfg.max_new_tokens, "--max-new-tokens", int)
        for name in list(bands) + list(budgets):
            if name not in cfg.variants:
                raise PrxError(f"{name!r} is not one of --variants {cfg.variants}")
        for name, n in budgets.items():
            if n < 1:
                raise PrxError(f"--max-new-tokens {name}={n}: must be at least 1")
        try:
            skip = frozenset(cfg.relax_checks)
            plans = {}
            for v in cfg.variants:
                spec = variants_mod.spec(v)
                lo, hi = bands.get(v, (spec.min_words, spec.max_words))
                check_cfg = checks_mod.CheckConfig(min_words=lo, max_words=hi, max_sentences=spec.max_sentences,
                                                   language=cfg.language, skip=skip,
                                                   language_detector=cfg.language_detector)
                plans[v] = VariantPlan(prompts_mod.load(v, cfg.prompt_dir), budgets.get(v, spec.max_new_tokens),
                                       check_cfg)
        except (FileNotFoundError, ValueError) as exc:
            raise PrxError(str(exc)) from None
        self._plans = plans
        return plans

    def backend_name(self) -> str:
        return resolve_backend_name(self.cfg.backend)

    def sampling_overrides(self) -> dict[str, Any]:
        c = self.cfg
        return {"temperature": c.temperature, "top_p": c.top_p, "top_k": c.top_k,
                "presence_penalty": c.presence_penalty, "repetition_penalty": c.repetition_penalty}

    def validate(self) -> None:
        cfg = self.cfg
        if not known_backend(cfg.backend):
            raise PrxError(f"unknown --backend {cfg.backend!r}: auto, transformers, vllm, fake or module:Class")
        if self.backend_name() == "vllm" and self._backend is None:
            from captioners.vllm_backend import vllm_available

            ok, why = vllm_available()
            if not ok:
                raise PrxError(f"--backend vllm cannot run here: {why}. Use --backend transformers.")
        if cfg.vlm_max_pixels < cfg.vlm_min_pixels:
            raise PrxError("--vlm-max-pixels must be >= --vlm-min-pixels")
        if "language" not in cfg.relax_checks:
            try:
                from filters.language import check_detector, language_available

                check_detector(cfg.language_detector)
            except Exception as exc:  # noqa: BLE001
                raise PrxError(f"the language check cannot run ({exc}); it is an error, not a pass") from exc
            if not language_available(cfg.language_detector):
                raise PrxError(f"the language check cannot run: the {cfg.language_detector} detector does not "
                                 "load (reinstall prx); it is an error, not a pass")
        if self.backend_name() in sampling_mod.DEFAULTS:
            try:
                sampling_mod.effective(self.backend_name(), self.sampling_overrides())
            except ValueError as exc:
                raise PrxError(str(exc)) from None
        self.variant_plans()

    def provenance(self) -> dict[str, Any]:
        from contract.models import resolve

        name = self.backend_name()
        try:
            model = resolve(self.cfg.model).provenance()
        except (FileNotFoundError, ValueError):
            model = {"name": self.cfg.model}
        sampling = (sampling_mod.effective(name, self.sampling_overrides()) if name in sampling_mod.DEFAULTS
                    else {k: v for k, v in self.sampling_overrides().items() if v is not None})
        out = {"model": model, "backend": name, "sampling": sampling,
               "prompts": {v: p.prompt.provenance() for v, p in self.variant_plans().items()}}
        if "language" not in self.cfg.relax_checks:
            from filters.language import detector_provenance

            out["language_detector"] = detector_provenance(self.cfg.language_detector)
        if self.cfg.text_encoder:
            try:
                out["text_encoder"] = resolve(self.cfg.text_encoder).provenance()
            except (FileNotFoundError, ValueError):
                out["text_encoder"] = {"name": self.cfg.text_encoder}
        return out

    # ------------------------------------------------------------------ models (once per worker)
    def backend(self):
        if self._backend is not None:
            return self._backend
        cfg = self.cfg
        name = self.backend_name()
        opts = {"sampling": self.sampling_overrides(), "max_pixels": cfg.vlm_max_pixels,
                "min_pixels": cfg.vlm_min_pixels, "seed": cfg.seed, "dtype": cfg.dtype,
                "batch_size": cfg.model_batch_size, "max_model_len": cfg.max_model_len,
                "gpu_memory_utilization": cfg.gpu_memory_utilization}
        if name == "transformers":
            opts["device"] = worker_device()
        key = ("recaption-backend", factory_token(name), cfg.model, json.dumps(opts, sort_keys=True, default=str))
        self._backend = cached(key, lambda: make_backend(name, cfg.model, **opts))
        return self._backend

    def text_tokenizer(self):
        if not self.cfg.text_encoder:
            return None

        def load():
            from contract.models import from_pretrained, resolve

            spec = resolve(self.cfg.text_encoder)
            return from_pretrained(spec, spec.extra.get("tokenizer", "transformers.AutoTokenizer"),
                                   flag="--text-encoder")

        return cached(("recaption-text-tokenizer", self.cfg.text_encoder), load)

    # ------------------------------------------------------------------ the shard
    def process(self, task: Task, writer: ShardWriter) -> None:
        """MapStage's batches (each written by a writer thread while the next one is captioned)."""
        backend = self.backend()
        plans = self.variant_plans()
        cache = CaptionCache(self.cfg.out, task.index)
        self._shard = _Shard(backend, plans, {v: self.cache_key(backend, v, p) for v, p in plans.items()},
                             cache, cache.load(), self.text_tokenizer())
        super().process(task, writer)

    def prepare(self, sample: Sample):
        """RGB image within the VLM pixel budget, or an ImageRejected; runs in a prefetch thread."""
        from PIL import Image

        try:
            img, _info = sample.image(max_pixels=self.cfg.max_image_pixels)
            w, h = img.size
            budget = self.cfg.vlm_max_pixels
            if w * h > budget:
                scale = math.sqrt(budget / (w * h))
                img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BICUBIC)
            w, h = img.size  # judged on what the backend gets: rounding can push a ratio past the limit
            if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
                raise ImageRejected(VLM_ASPECT_RATIO, f"{w}x{h} after the pixel budget")
            img.load()
            return img
        except ImageRejected as exc:
            return exc

    def cache_key(self, backend, variant: str, plan: VariantPlan) -> str:
        payload = {"model": backend.model_info(), "backend": backend.name, "prompt": plan.prompt.sha256,
                   "sampling": backend.sampling(), "max_new_tokens": plan.max_new_tokens,
                   "max_pixels": self.cfg.vlm_max_pixels, "min_pixels": self.cfg.vlm_min_pixels,
                   "seed": self.cfg.seed}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def process_prepared(self, samples: list[Sample], task: Task, images: list[Any]) -> list[Result]:
        backend, plans, ckeys, cache, done, tokenizer = self._shard
        outcome: dict[tuple[int, str], dict] = {}
        jobs: list[Job] = []
        for i, (item, img) in enumerate(zip(samples, images)):
            if isinstance(img, ImageRejected):
                continue
            for v in plans:
                rec = done.get((item.key, v, ckeys[v]))
                if rec is not None:
                    outcome[(i, v)] = rec
                else:
                    jobs.append(Job(i, item.key, v, img))
        new_records = []
        attempt = 0
        detector = self.cfg.language_detector
        detect = lambda text: language_mod.detect_language(text, detector=detector)  # noqa: E731
        while jobs:
            reqs = [Request(image=j.image, prompt=plans[j.variant].prompt.text,
                            max_new_tokens=plans[j.variant].max_new_tokens,
                            seed=derive_seed(self.cfg.seed, j.key, j.variant, attempt), variant=j.variant, key=j.key)
                for j in jobs]
            gens = backend.generate(reqs)
            if len(gens) != len(reqs):
                raise RuntimeError(f"backend {backend.name} returned {len(gens)} generations for {len(reqs)} requests")
            retry = []
            for job, req, gen in zip(jobs, reqs, gens):
                plan = plans[job.variant]
                text = checks_mod.clean(gen.text)
                failure = checks_mod.run_checks(text, gen.finish_reason, plan.checks, detect)
                job.history.append(failure.reason if failure else "ok")
                if failure is not None and attempt < self.cfg.retries:
                    retry.append(job)
                    continue
                rec = {"key": job.key, "variant": job.variant, "ckey": ckeys[job.variant], "ok": failure is None,
                       "tries": attempt + 1, "history": job.history}
                if failure is None:
                    rec.update(self._provenance(backend, plan, text, gen, req, attempt + 1, job.history, tokenizer))
                    rec["text"] = text
                else:
                    rec.update({"reason": failure.reason, "detail": failure.detail})
                outcome[(job.index, job.variant)] = rec
                new_records.append(rec)
            jobs = retry
            attempt += 1
        if new_records:
            cache.append(new_records)
            for rec in new_records:
                done[(rec["key"], rec["variant"], rec["ckey"])] = rec
        results = []
        for i, (item, img) in enumerate(zip(samples, images)):
            if isinstance(img, ImageRejected):
                results.append(reject(item, img.reason, img.detail))
                continue
            results.append(self._result(item, {v: outcome[(i, v)] for v in plans}, backend))
        return results

    def _provenance(self, backend, plan: VariantPlan, text: str, gen, req: Request, tries: int,
                    history: list[str], tokenizer) -> dict[str, Any]:
        prov: dict[str, Any] = {
            "model": backend.model_info(),
            "backend": backend.name,
            "prompt": plan.prompt.provenance(),
            "sampling": {**backend.sampling(), "max_new_tokens": plan.max_new_tokens,
                         "seed": gen.seed if gen.seed is not None else req.seed},
            "max_pixels": self.cfg.vlm_max_pixels,
            "min_pixels": self.cfg.vlm_min_pixels,
            "words": checks_mod.count_words(text),
            "output_tokens": gen.num_tokens,
            "finish_reason": gen.finish_reason,
            "tries": tries,
            "retry_reasons": [h for h in history if h != "ok"],
            "mean_logprob": gen.mean_logprob,  # None (null) when the backend does not return logprobs
            "checks": [c for c in checks_mod.ORDER if c not in plan.checks.skip],
            "word_band": [plan.checks.min_words, plan.checks.max_words],
        }
        if gen.mean_logprob is None:
            prov["mean_logprob_absent"] = f"the {backend.name} backend returned no logprobs"
        if tokenizer is not None:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            prov["text_encoder"] = {"name": self.cfg.text_encoder, "tokens": len(ids)}
        return {"prov": prov}

    def _result(self, sample: Sample, recs: dict[str, dict], backend) -> Result:
        try:
            meta = sample.meta()
        except BadMember as exc:
            return reject(sample, "bad_member", str(exc))
        ok = {v: r for v, r in recs.items() if r.get("ok")}
        failed = {v: r for v, r in recs.items() if not r.get("ok")}
        detail_failed = "; ".join(f"{v}: {r['reason']} after {r['tries']} tries ({r['detail']})"
                                  for v, r in failed.items())
        if not ok:
            return reject(sample, checks_mod.ALL_FAILED, detail_failed)
        captions = dict(meta.get("captions") or {})
        members: dict[str, bytes] = {}
        scores: dict[str, float] = {}
        model_id = backend.model_info().get("id", "")
        for v, r in ok.items():
            captions[v] = r["prov"]
            members[f"caption_{v}.txt"] = r["text"].encode("utf-8")
            scores[f"caption_words:{v}"] = float(r["prov"]["words"])
            scores[f"caption_tries:{v}"] = float(r["tries"])
            if r["prov"].get("mean_logprob") is not None:
                scores[f"caption_logprob:{model_id}:{v}"] = float(r["prov"]["mean_logprob"])
        for v in failed:
            captions.pop(v, None)  # a stale caption of a failed variant is not kept
        meta["captions"] = captions
        drop = tuple(f"caption_{v}.txt" for v in failed)
        detail = f"failed variants: {detail_failed}" if failed else ""
        return keep(sample, meta, members, scores=scores, detail=detail, drop=drop)


class CaptionCache:
    """Per-shard resume cache: one jsonl file per batch under OUT/.cache/recaption/NNNNNN/ (atomic writes)."""

    def __init__(self, out: str, index: int):
        self.folder = fs.join(out, CACHE_DIR, f"{index:06d}")
        self._n: int | None = None

    def load(self) -> dict[tuple[str, str, str], dict]:
        done: dict[tuple[str, str, str], dict] = {}
        paths = fs.glob(fs.join(self.folder, "*.jsonl")) if fs.exists(self.folder) else []
        for path in sorted(paths):
            for line in fs.read_bytes(path).decode("utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # never written half (atomic), but a hand-edited file should not stop a run
                done[(rec["key"], rec["variant"], rec["ckey"])] = rec
        self._n = len(paths)
        return done

    def append(self, records: list[dict]) -> None:
        if self._n is None:
            self.load()
        fs.makedirs(self.folder)
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")
        fs.write_bytes_atomic(fs.join(self.folder, f"{self._n:06d}.jsonl"), data)
        self._n += 1


STAGE = RecaptionStage
