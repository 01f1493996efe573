"""`prx-data filter`: CLIP score, image and caption checks, aesthetic/NSFW heads and dedup across shards.

A GlobalStage, because `--keep-top` and cross-shard dedup need every shard:
  scan   (per shard, `_map/NNNNNN.parquet`): decode, image and caption checks, pHash, CLIP image/text
         embeddings and scores (stored scores of the same model reused unless --rescore), head scores.
  reduce (once): score thresholds, dedup (exact -> perceptual -> semantic, connected components, documented
         keeper), then --keep-top over what is left; writes `_decisions/NNNNNN.parquet` (the rejected keys of
         each shard with reason and detail) and a small plan (thresholds, counts, decision digests).
  apply  (per shard): kept samples get `json.scores` and `json.filter {verdict, reasons, ...}`; every sample
         gets a ledger row with its scores; `--write-rejected DIR` keeps the rejected ones as shards.
The filters themselves live in `filters/` and know nothing of shards.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from filters import dedup as dd
from filters import image_checks as ic
from filters import laion_heads as lh
from filters import text_checks as tc
from filters.clip import ClipSpec, clip_scores, load_clip, resolve_clip
from contract import fs, ledger
from contract.config import CommonConfig, option
from contract.images import DEFAULT_MAX_PIXELS, ImageRejected
from pipeline.runner import cached, worker_device
from contract.shards import BadMember, Problem, Sample, ShardWriter, dumps_json, shard_name
from pipeline.stage import GlobalStage, Result, PrxError, Task, keep, reject

ledger.register_reasons({code: (ledger.REJECTED, text) for code, text in {
    **ic.REASONS, **tc.REASONS, **lh.REASONS, **dd.REASONS,
    "clip_below_threshold": "CLIP image-text cosine below --min-clip-score, or outside the --keep-top fraction "
                            "(detail: score vs threshold)",
}.items()})

DEDUP_KINDS = ("exact", "perceptual", "semantic")


@dataclass
class FilterConfig(CommonConfig):
    # CLIP
    clip_model: str | None = option(None, help="open_clip NAME:PRETRAINED, an alias from manifests/models.yaml, "
                                               "hf-hub:ORG/REPO or a local open_clip folder")
    min_clip_score: float | None = option(None, help="reject image-text cosine below this")
    keep_top: float | None = option(None, help="keep this fraction (0-1] of the samples left after every other "
                                               "check and dedup, by CLIP score: one global threshold")
    rescore: bool = option(False, help="recompute scores already stored in json.scores for the same model")
    batch_size: int = option(64, runtime=True, help="images per model batch", minimum=1)
    decode_threads: int = option(4, runtime=True, help="CPU threads decoding and preprocessing images", minimum=1)
    # image checks
    min_side: int = option(0, help="reject images whose shorter side is below this (0: off)", minimum=0)
    max_aspect_ratio: float | None = option(None, help="reject long/short side ratios above this")
    min_pixels: int | None = option(None, help="reject width x height below this", minimum=0)
    max_pixels: int | None = option(None, help="reject width x height above this", minimum=0)
    min_file_bytes: int | None = option(None, help="reject image members smaller than this", minimum=0)
    max_file_bytes: int | None = option(None, help="reject image members larger than this", minimum=0)
    min_pixel_std: float | None = option(None, help="near-blank: reject if a grayscale thumbnail's pixel std "
                                                    "(0-255) is below this (e.g. 4)")
    max_image_pixels: int = option(DEFAULT_MAX_PIXELS, help="refuse to decode images whose header declares more",
                                   minimum=1)
    # caption checks (the source caption, `txt`)
    reject_empty_caption: bool = option(False, help="reject empty or whitespace-only captions")
    min_caption_words: int = option(0, help="reject captions with fewer words", minimum=0)
    min_caption_chars: int = option(0, help="reject captions with fewer characters", minimum=0)
    languages: list[str] = option(default_factory=list, help="keep captions in these languages (comma-separated "
                                                             "ISO 639-1 codes, e.g. en,de; offline detector)")
    min_language_confidence: float = option(0.0, help="detector confidence the caption's language needs")
    language_detector: str = option("fasttext", help="language identification for --languages: fasttext "
                                                     "(lid.176, default) or lingua")
    # LAION heads
    aesthetic_weights: str | None = option(None, help="LAION aesthetic head: .safetensors/.pth or ORG/REPO/FILE")
    min_aesthetic: float | None = option(None, help="reject aesthetic scores below this (needs --aesthetic-weights)")
    nsfw_weights: str | None = option(None, help="NSFW head: .safetensors/.pth or ORG/REPO/FILE")
    max_nsfw: float | None = option(None, help="reject NSFW scores above this (needs --nsfw-weights)")
    # dedup
    dedup: list[str] = option(default_factory=list, help="comma-separated: exact (sha256), perceptual (pHash), "
                                                         "semantic (CLIP image embeddings); across all shards")
    phash_distance: int = option(6, help="perceptual: max Hamming distance between 64-bit pHashes", minimum=0)
    semantic_threshold: float = option(0.95, help="semantic: min cosine between CLIP image embeddings")
    semantic_probes: int = option(2, help="semantic: clusters each embedding is compared in", minimum=1)
    write_rejected: str | None = option(None, help="also write rejected samples as shards into this folder")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class FilterStage(GlobalStage):
    """Filter shards by CLIP score, image and caption checks, LAION heads and dedup; every rejection in the ledger."""

    name = "filter"
    help = "CLIP score, image/caption checks, aesthetic/NSFW heads, exact/perceptual/semantic dedup"
    config_cls = FilterConfig
    uses_model = True
    owned = ("_decisions",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self._clip_spec: ClipSpec | None = None
        self._heads: dict[str, lh.LinearHead] = {}
        self._partial: dict[str, dict] | None = None
        self._decisions: dict[str, tuple[str, str]] | None = None
        self._rejected_writer: ShardWriter | None = None
        self._rejected_json: dict[str, bytes] = {}

    # ------------------------------------------------------------------------------ config
    @property
    def image_checks(self) -> ic.ImageChecks:
        c = self.cfg
        return ic.ImageChecks(c.min_side, c.max_aspect_ratio, c.min_pixels, c.max_pixels, c.min_file_bytes,
                              c.max_file_bytes, c.min_pixel_std)

    @property
    def text_checks(self) -> tc.TextChecks:
        c = self.cfg
        return tc.TextChecks(c.reject_empty_caption, c.min_caption_words, c.min_caption_chars, list(c.languages),
                             c.min_language_confidence, c.language_detector)

    @property
    def clip_spec(self) -> ClipSpec | None:
        if self._clip_spec is None and self.cfg.clip_model:
            self._clip_spec = resolve_clip(self.cfg.clip_model)
        return self._clip_spec

    def head(self, kind: str) -> lh.LinearHead | None:
        weights = self.cfg.aesthetic_weights if kind == "aesthetic" else self.cfg.nsfw_weights
        if not weights:
            return None
        if kind not in self._heads:
            flag = f"--{kind}-weights"
            self._heads[kind] = cached(("laion-head", kind, weights), lambda: lh.LinearHead(weights, kind, flag))
        return self._heads[kind]

    @property
    def score_names(self) -> dict[str, str]:
        """role -> score name, for the scores this run produces."""
        out = {}
        if self.clip_spec:
            out["clip"] = self.clip_spec.score_name
        for kind in ("aesthetic", "nsfw"):
            h = self.head(kind)
            if h is not None:
                out[kind] = h.name
        return out

    def output_folders(self) -> list[str]:
        return super().output_folders() + ([self.cfg.write_rejected] if self.cfg.write_rejected else [])

    def validate(self) -> None:
        c = self.cfg
        bad = sorted(set(c.dedup) - set(DEDUP_KINDS))
        if bad:
            raise PrxError(f"--dedup: unknown kind(s) {bad}; use {','.join(DEDUP_KINDS)}")
        needs_clip = [flag for flag, on in (("--min-clip-score", c.min_clip_score is not None),
                                            ("--keep-top", c.keep_top is not None),
                                            ("--dedup semantic", "semantic" in c.dedup),
                                            ("--min-aesthetic", c.min_aesthetic is not None),
                                            ("--max-nsfw", c.max_nsfw is not None)) if on]
        if needs_clip and not c.clip_model:
            raise PrxError(f"{', '.join(needs_clip)} need(s) --clip-model (e.g. ViT-B-32:laion2b_s34b_b79k)")
        if c.keep_top is not None and not 0 < c.keep_top <= 1:
            raise PrxError("--keep-top is a fraction in (0, 1]")
        if not 0 <= c.phash_distance <= 32:
            raise PrxError("--phash-distance must be in 0..32 bits")
        if c.batch_size < 1 or c.decode_threads < 1:
            raise PrxError("--batch-size and --decode-threads must be at least 1")
        if c.semantic_probes < 1:  # 0 probes would compare nothing: semantic dedup silently off
            raise PrxError("--semantic-probes must be at least 1")
        try:
            if c.min_aesthetic is not None:
                lh.load_head(c.aesthetic_weights, "aesthetic", "--aesthetic-weights")
            if c.max_nsfw is not None:
                lh.load_head(c.nsfw_weights, "nsfw", "--nsfw-weights")
            spec = self.clip_spec
        except (lh.HeadError, ValueError, FileNotFoundError) as exc:
            raise PrxError(str(exc)) from exc
        if c.languages:
            from filters import language as lang

            try:
                lang.check_detector(c.language_detector)
            except lang.UnknownDetector as exc:
                raise PrxError(f"--language-detector: {exc}") from None
            if not lang.language_available(c.language_detector):
                raise PrxError(f"--languages: the {c.language_detector} detector cannot load (a dependency: "
                                 "reinstall prx)")
            known = lang.supported_languages(c.language_detector)
            unknown = [code for code in c.languages if code.lower() not in known]
            if unknown:  # else every caption would be rejected as caption_language
                raise PrxError(f"--languages: unknown language code(s) {unknown} for --language-detector "
                                 f"{c.language_detector}; use two-letter codes like en,de")
        if spec is not None and (self.head("aesthetic") or self.head("nsfw")):
            import open_clip

            try:
                dim = open_clip.get_model_config(spec.model_name) if not spec.model_name.startswith(
                    ("local-dir:", "hf-hub:")) else None
                dim = dim.get("embed_dim") if dim else None
                if spec.model_name.startswith("local-dir:"):
                    with open(spec.model_name[len("local-dir:"):] + "/open_clip_config.json") as fh:
                        dim = json.load(fh)["model_cfg"].get("embed_dim")
                for kind in ("aesthetic", "nsfw"):
                    h = self.head(kind)
                    if h is not None:
                        h.check_dim(dim)
            except lh.HeadError as exc:
                raise PrxError(str(exc)) from exc

    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.clip_spec:
            out["clip"] = self.clip_spec.provenance()
        for kind in ("aesthetic", "nsfw"):
            h = self.head(kind)
            if h is not None:
                out[kind] = {"weights": h.source, "score": h.name, "layers": [list(w.shape) for w, _ in h.layers],
                             "activation": h.activation, "output": h.output}
        if self.cfg.languages:
            from filters.language import detector_provenance

            out["language"] = detector_provenance(self.cfg.language_detector)
        if "perceptual" in self.cfg.dedup:
            from importlib import metadata

            out["phash"] = {"imagehash": metadata.version("ImageHash"), "bits": 64}
        return out

    # ------------------------------------------------------------------------------ scan
    def _model(self):
        spec = self.clip_spec
        device = worker_device()
        return cached(("open_clip", spec.model_name, spec.pretrained, device), lambda: load_clip(spec, device))

    def scan(self, task: Task) -> pa.Table:
        records: list[dict] = []
        batch: list[Sample] = []
        with ThreadPoolExecutor(self.cfg.decode_threads) as pool:
            for item in self.samples(task):
                if isinstance(item, Problem):
                    continue  # apply writes its ledger row
                batch.append(item)
                if len(batch) >= self.cfg.batch_size:
                    records += self._scan_batch(batch, task, pool)
                    batch = []
            if batch:
                records += self._scan_batch(batch, task, pool)
        return _records_table(records)

    def _scan_batch(self, samples: list[Sample], task: Task, pool) -> list[dict]:
        start = time.perf_counter()
        cfg, names = self.cfg, self.score_names
        checks, texts = self.image_checks, self.text_checks
        recs = []
        for s in samples:
            rec = {"key": s.key, "shard": task.index, "sha256": "", "width": 0, "height": 0, "nbytes": 0,
                   "reasons": [], "scores": {}, "phash": None, "emb": None, "language": None, "checks": {},
                   "computed": []}
            try:
                meta = s.meta()
            except BadMember as exc:
                rec["reasons"].append(("bad_member", str(exc)))
                meta = {}
            rec["meta"] = meta
            stored = meta.get("scores") if isinstance(meta.get("scores"), dict) else {}
            for role, name in names.items():
                if name in stored and not cfg.rescore and isinstance(stored[name], (int, float)):
                    rec["scores"][name] = float(stored[name])
            image_name = s.image_member
            data = s.members.get(image_name, b"") if image_name else b""
            rec["nbytes"] = len(data)
            rec["sha256"] = str(meta.get("sha256") or (hashlib.sha256(data).hexdigest() if data else ""))
            recs.append(rec)

        # caption checks first: cheap, and a rejected caption needs no pixels
        for s, rec in zip(samples, recs):
            if rec["reasons"] or not texts.active:
                continue
            judgements, code = texts.run(s.text("txt") or "")
            rec["language"] = code
            for j in judgements:
                rec["checks"][j.check] = j.score
                if not j.passed:
                    rec["reasons"].append((j.reason, j.detail))

        need_emb = "semantic" in cfg.dedup or any(
            names.get(role) and any(names[role] not in r["scores"] for r in recs) for role in names)
        need_pixels = checks.needs_pixels or "perceptual" in cfg.dedup or need_emb
        model = self._model() if need_emb and self.clip_spec else None

        def decode(pair):
            s, rec = pair
            if rec["reasons"] and not checks.active:
                return None
            width, height = rec["meta"].get("width"), rec["meta"].get("height")
            image = None
            if need_pixels or not (isinstance(width, int) and isinstance(height, int)):
                try:
                    image, info = s.image(cfg.max_image_pixels)
                except ImageRejected as exc:
                    return exc
                width, height = info.width, info.height
            out = {"width": width, "height": height}
            if image is not None:
                if "perceptual" in cfg.dedup:
                    out["phash"] = dd.to_signed(dd.phash(image))
                if model is not None:
                    out["tensor"] = model.image_tensor(image)
                out["image"] = image
            return out

        tensors: list = [None] * len(recs)
        for i, (rec, res) in enumerate(zip(recs, pool.map(decode, zip(samples, recs)))):
            if res is None:
                continue
            if isinstance(res, ImageRejected):
                rec["reasons"].insert(0, (res.reason, res.detail))
                continue
            rec["width"], rec["height"] = res["width"], res["height"]
            rec["phash"] = res.get("phash")
            tensors[i] = res.get("tensor")
            if checks.active:
                for j in checks.run(res["width"], res["height"], rec["nbytes"], res.get("image")):
                    rec["checks"][j.check] = j.score
                    if not j.passed:
                        rec["reasons"].append((j.reason, j.detail))

        # model scores for the samples still in the running
        todo = [i for i, r in enumerate(recs) if not r["reasons"] and tensors[i] is not None]
        if model is not None and todo:
            emb = model.encode_images([tensors[i] for i in todo])
            clip_name = names.get("clip")
            need_text = [k for k, i in enumerate(todo) if clip_name not in recs[i]["scores"]]
            if need_text:
                t_emb = model.encode_texts([samples[todo[k]].text("txt") or "" for k in need_text])
                sc = clip_scores(emb[need_text], t_emb)
                for k, v in zip(need_text, sc):
                    recs[todo[k]]["scores"][clip_name] = float(v)
                    recs[todo[k]]["computed"].append(clip_name)
            for kind in ("aesthetic", "nsfw"):
                h = self.head(kind)
                if h is None:
                    continue
                need = [k for k, i in enumerate(todo) if h.name not in recs[i]["scores"]]
                if need:
                    values = h(emb[need])
                    for k, v in zip(need, values):
                        recs[todo[k]]["scores"][h.name] = float(v)
                        recs[todo[k]]["computed"].append(h.name)
            if "semantic" in cfg.dedup:
                for k, i in enumerate(todo):
                    recs[i]["emb"] = emb[k].astype(np.float32)
        per = (time.perf_counter() - start) / max(len(samples), 1)
        for rec in recs:
            rec["seconds"] = per
            rec.pop("meta", None)
        return recs

    # ------------------------------------------------------------------------------ reduce
    def reduce(self, partial_paths: list[str]) -> dict[str, Any]:
        cfg, names = self.cfg, self.score_names
        tables = [fs.read_parquet(fs.read_bytes(p)) for p in partial_paths]
        table = pa.concat_tables(tables) if tables else _records_table([])
        n = table.num_rows
        keys = table.column("key").to_pylist()
        shards = np.asarray(table.column("shard").to_pylist(), dtype=np.int64)
        pixels = (np.asarray(table.column("width").to_pylist(), dtype=np.float64)
                  * np.asarray(table.column("height").to_pylist(), dtype=np.float64))
        reasons: list[list] = [json.loads(r) for r in table.column("reasons").to_pylist()]
        scores = [dict(s) for s in table.column("scores").to_pylist()]

        def score_array(name):
            return np.array([s.get(name, np.nan) for s in scores], dtype=np.float64)

        plan: dict[str, Any] = {"samples": n, "score_names": names}
        eligible = np.array([not r for r in reasons], dtype=bool)

        # per-sample score thresholds
        clip = score_array(names["clip"]) if "clip" in names else None
        thresholds = []
        if cfg.min_clip_score is not None:
            thresholds.append(("clip_below_threshold", clip, lambda v: v < cfg.min_clip_score,
                               lambda v: f"{names['clip']} {v:.4f} < {cfg.min_clip_score:g}"))
        if cfg.min_aesthetic is not None:
            a = score_array(names["aesthetic"])
            thresholds.append(("aesthetic_below_threshold", a, lambda v: v < cfg.min_aesthetic,
                               lambda v: f"{names['aesthetic']} {v:.4f} < {cfg.min_aesthetic:g}"))
        if cfg.max_nsfw is not None:
            z = score_array(names["nsfw"])
            thresholds.append(("nsfw_above_threshold", z, lambda v: v > cfg.max_nsfw,
                               lambda v: f"{names['nsfw']} {v:.4f} > {cfg.max_nsfw:g}"))
        for code, values, bad, detail in thresholds:
            for i in np.flatnonzero(eligible):
                v = values[i]
                if np.isnan(v) or bad(v):
                    reasons[i].append([code, detail(v) if not np.isnan(v) else "score missing"])
                    eligible[i] = False

        # dedup, each kind over what is still eligible
        groups = {}
        if cfg.dedup:
            digests = table.column("sha256").to_pylist()
            phashes = table.column("phash").to_pylist()
            emb_col = table.column("emb")
            for kind in DEDUP_KINDS:
                if kind not in cfg.dedup:
                    continue
                idx = np.flatnonzero(eligible)
                if len(idx) < 2:
                    groups[kind] = {"groups": 0, "rejected": 0}
                    continue
                if kind == "exact":
                    pairs = [dd.exact_pairs([digests[i] for i in idx])]
                    code = "duplicate_exact"
                elif kind == "perceptual":
                    h = np.array([phashes[i] for i in idx], dtype=np.int64)
                    pairs = dd.hamming_pairs(h, cfg.phash_distance)
                    code = "duplicate_perceptual"
                else:
                    emb = np.stack([np.asarray(emb_col[int(i)].as_py(), dtype=np.float32) for i in idx])
                    pairs = dd.semantic_pairs(emb, cfg.semantic_threshold, probes=cfg.semantic_probes)
                    code = "duplicate_semantic"
                labels = dd.components(len(idx), pairs)
                kept = dd.keepers(labels, pixels[idx], None if clip is None else clip[idx], shards[idx],
                                  [keys[i] for i in idx])
                sizes = np.bincount(labels, minlength=len(idx))
                n_groups, n_rej = int((sizes > 1).sum()), 0
                for local, keeper in enumerate(kept.tolist()):
                    if keeper == local:
                        continue
                    i, k = idx[local], idx[keeper]
                    reasons[i].append([code, json.dumps({"kept_key": keys[k], "kept_shard": int(shards[k]),
                                                         "group_size": int(sizes[labels[local]])})])
                    eligible[i] = False
                    n_rej += 1
                groups[kind] = {"groups": n_groups, "rejected": n_rej}
        plan["dedup"] = groups

        # keep the top fraction by CLIP score of what is left: one global threshold
        if cfg.keep_top is not None:
            idx = np.flatnonzero(eligible)
            from filters.clip import keep_top_threshold

            k, threshold = keep_top_threshold(clip[idx], cfg.keep_top)
            key_rank = {key: r for r, key in enumerate(sorted(keys))}
            order = sorted(idx.tolist(), key=lambda i: (-clip[i], shards[i], key_rank[keys[i]]))
            for rank, i in enumerate(order):
                if rank >= k:
                    reasons[i].append(["clip_below_threshold",
                                       f"{names['clip']} {clip[i]:.4f} outside the top {cfg.keep_top:g} "
                                       f"(kept {k} of {len(idx)}; threshold {threshold:.4f}"
                                       + (", tie broken by shard and key)" if threshold is not None
                                          and clip[i] >= threshold else ")")])
                    eligible[i] = False
            plan["keep_top"] = {"fraction": cfg.keep_top, "candidates": int(len(idx)), "kept": int(k),
                                "threshold": threshold}
        if cfg.min_clip_score is not None:
            plan["min_clip_score"] = cfg.min_clip_score

        # decisions per shard
        by_shard: dict[int, list[tuple[str, str, str]]] = {}
        counts: dict[str, int] = {}
        for i in range(n):
            if reasons[i]:
                code, detail = reasons[i][0]
                if len(reasons[i]) > 1:
                    also = ", ".join(r[0] for r in reasons[i][1:])
                    detail = f"{detail} (also: {also})"
                by_shard.setdefault(int(shards[i]), []).append((keys[i], code, detail, json.dumps(reasons[i])))
                counts[code] = counts.get(code, 0) + 1
        digests_out = {}
        for p in partial_paths:
            index = int(posixpath.basename(str(p).replace("\\", "/")).split(".")[0])
            rows = by_shard.get(index, [])
            t = pa.table({"key": [r[0] for r in rows], "reason": [r[1] for r in rows],
                          "detail": [r[2] for r in rows], "all_reasons": [r[3] for r in rows]})
            buf = io.BytesIO()
            pq.write_table(t, buf, compression="zstd")
            fs.write_bytes_atomic(fs.join(cfg.out, "_decisions", shard_name(index, "parquet")), buf.getvalue())
            digests_out[shard_name(index, "parquet")] = _digest(buf.getvalue())
        computed = table.column("computed").to_pylist()
        plan["rejected_by_reason"] = dict(sorted(counts.items()))
        plan["kept"] = int(n - sum(counts.values()))
        plan["scores_computed"] = int(sum(len(c) for c in computed))
        plan["scores_reused"] = int(sum(len(s) for s in scores) - plan["scores_computed"])
        plan["decisions"] = digests_out
        return plan

    # ------------------------------------------------------------------------------ apply
    def _load_shard_state(self, task: Task) -> None:
        out = self.cfg.out
        part = fs.read_parquet(fs.read_bytes(fs.join(out, "_map", shard_name(task.index, "parquet"))))
        self._partial = {r["key"]: r for r in part.to_pylist()}
        dec = fs.read_parquet(fs.read_bytes(fs.join(out, "_decisions", shard_name(task.index, "parquet"))))
        self._decisions = {r["key"]: (r["reason"], r["detail"], json.loads(r["all_reasons"])) for r in dec.to_pylist()}

    def process(self, task: Task, writer: ShardWriter) -> None:
        self._load_shard_state(task)
        rw = ShardWriter(self.cfg.write_rejected, task.index, self.name) if self.cfg.write_rejected else None
        self._rejected_writer = rw
        try:
            super().process(task, writer)
            if rw is not None:
                rw.close()
        except BaseException:
            if rw is not None:
                rw.abort()
            raise

    def process_batch(self, samples: list[Sample], task: Task) -> list[Result]:
        results = []
        for s in samples:
            rec = self._partial.get(s.key)
            if rec is None:
                raise RuntimeError(f"filter: sample {s.key} of shard {task.index} missing from its scan partial; "
                                   "delete the output folder's _map and _plan.json and rerun")
            scores = dict(rec["scores"] or [])
            checks = json.loads(rec["checks"])
            decision = self._decisions.get(s.key)
            if decision is None:
                meta = s.meta()
                meta["scores"] = {**(meta.get("scores") if isinstance(meta.get("scores"), dict) else {}), **scores}
                meta["filter"] = self._filter_section("kept", [], rec, checks)
                result = keep(s, meta, scores=scores)
            else:
                code, detail, all_reasons = decision
                result = reject(s, code, detail, scores=scores)
                if self._rejected_writer is not None:
                    try:
                        meta = s.meta()
                    except BadMember:
                        meta = {}
                    meta["scores"] = {**(meta.get("scores") if isinstance(meta.get("scores"), dict) else {}),
                                      **scores}
                    meta["filter"] = self._filter_section("rejected", all_reasons, rec, checks)
                    self._rejected_json[s.key] = dumps_json(meta)
            # the scan did the work: its time per sample goes into the ledger (apply's time is added on top)
            result.row.seconds = float(rec["seconds"] or 0.0)
            results.append(result)
        return results

    @staticmethod
    def _filter_section(verdict: str, reasons: list, rec: dict, checks: dict) -> dict:
        out: dict[str, Any] = {"verdict": verdict,
                               "reasons": [{"reason": r[0], "detail": r[1]} for r in reasons]}
        if checks:
            out["checks"] = checks
        if rec.get("language"):
            out["language"] = rec["language"]
        return out

    def _write(self, results: list[Result], writer: ShardWriter) -> None:
        GlobalStage._write(results, writer)
        rw = self._rejected_writer
        if rw is None:
            return
        for r in results:
            if r.kept:
                continue
            members = dict(r.sample.members)
            if r.sample.key in self._rejected_json:
                members["json"] = self._rejected_json.pop(r.sample.key)
            rw.write(r.sample.key, members)
            rw.add_row(r.row)


def _records_table(records: list[dict]) -> pa.Table:
    return pa.table({
        "key": pa.array([r["key"] for r in records], pa.string()),
        "shard": pa.array([r["shard"] for r in records], pa.int32()),
        "sha256": pa.array([r["sha256"] for r in records], pa.string()),
        "width": pa.array([int(r["width"] or 0) for r in records], pa.int64()),
        "height": pa.array([int(r["height"] or 0) for r in records], pa.int64()),
        "nbytes": pa.array([r["nbytes"] for r in records], pa.int64()),
        "reasons": pa.array([json.dumps([list(x) for x in r["reasons"]]) for r in records], pa.string()),
        "scores": pa.array([sorted(r["scores"].items()) for r in records], pa.map_(pa.string(), pa.float64())),
        "phash": pa.array([r["phash"] for r in records], pa.int64()),
        "emb": pa.array([None if r["emb"] is None else r["emb"].tolist() for r in records],
                        pa.list_(pa.float32())),
        "language": pa.array([r["language"] for r in records], pa.string()),
        "checks": pa.array([json.dumps(r["checks"]) for r in records], pa.string()),
        "computed": pa.array([r["computed"] for r in records], pa.list_(pa.string())),
        "seconds": pa.array([float(r.get("seconds", 0.0)) for r in records], pa.float64()),
    })


STAGE = FilterStage
