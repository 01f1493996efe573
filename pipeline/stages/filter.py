"""`prx-data filter`: runs the filters of the registry (`filters/__init__.py`), then dedup across shards.

The filters are plug-ins (filters/base.py): each declares its options (the flags below, in registry order, between
the stage's own and dedup's), its reason codes, and either a per-sample `judge` (a `Check`) or a batched `score`
with a threshold and maybe a top fraction (a `ScoreFilter`). A GlobalStage, because `--keep-top` and cross-shard
dedup need every shard:
  scan   (per shard, `_map/NNNNNN.parquet`): caption checks, decode, size and pixel checks, pHash, the CLIP image
         embeddings and every score (stored scores of the same name reused unless --rescore).
  reduce (once): score thresholds, dedup (exact -> perceptual -> semantic, connected components, documented
         keeper), then the top fractions over what is left; writes `_decisions/NNNNNN.parquet` (the rejected keys
         of each shard with reason and detail) and a small plan (thresholds, counts, decision digests).
  apply  (per shard): kept samples get `json.scores` and `json.filter {verdict, reasons, checks, facts...}`;
         every sample gets a ledger row with its scores; `--write-rejected DIR` keeps the rejected ones as shards.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import posixpath
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import filters
from contract import fs, ledger
from contract.config import CommonConfig, option
from contract.images import DEFAULT_MAX_PIXELS, ImageRejected
from contract.shards import BadMember, Problem, Sample, ShardWriter, dumps_json, shard_name
from filters import dedup as dd
from filters.base import Check, Context, Filter, Judgement, ScoreBatch, ScoreFilter, View, keep_top_threshold
from filters.clip import ClipSpec, load_clip, resolve_clip
from pipeline.device_decode import DECODERS, on_device, to_pil
from pipeline.device_decode import provenance as decode_provenance
from pipeline.runner import cached, worker_device
from pipeline.stage import GlobalStage, PrxError, Result, Task, keep, reject

FILTERS: list[type[Filter]] = filters.load()
DEDUP_KINDS = ("exact", "perceptual", "semantic")
KEEPER_SCORE = "clip"   # the score (by filter name) dedup's keeper rule ranks by, after size

for _cls in FILTERS:
    ledger.register_reasons(_cls.reasons)
ledger.register_reasons({code: (ledger.REJECTED, text) for code, text in dd.REASONS.items()})


@dataclass
class StageOptions:
    """The stage's own options, before the filters'."""

    clip_model: str | None = option(None, help="open_clip NAME:PRETRAINED, an alias from manifests/models.yaml, "
                                               "hf-hub:ORG/REPO or a local open_clip folder")
    rescore: bool = option(False, help="recompute scores already stored in json.scores for the same model")
    batch_size: int = option(64, runtime=True, help="images per model batch", minimum=1)
    decode_threads: int = option(4, runtime=True, help="CPU threads decoding and preprocessing images", minimum=1)
    decode: str = option("cpu", runtime=True, choices=list(DECODERS),
                         help="JPEG decoder: cpu (Pillow) or gpu (torchvision's nvJPEG decode on the device, the pixels "
                              "back to the host for the checks, pHash and CLIP preprocessing; other images, and any it "
                              "cannot read, go through the CPU decoder)")
    decode_device: str | None = option(None, runtime=True,
                                       help="torch device of --decode gpu (default: the worker's GPU, the CPU "
                                            "without one; cpu runs the same code path with the output of --decode cpu)")
    max_image_pixels: int = option(DEFAULT_MAX_PIXELS, help="refuse to decode images whose header declares more",
                                   minimum=1)


@dataclass
class DedupOptions:
    """Dedup's options and the rejected-samples folder, after the filters'."""

    dedup: list[str] = option(default_factory=list, help="comma-separated: exact (sha256), perceptual (pHash), "
                                                         "semantic (CLIP image embeddings); across all shards")
    phash_distance: int = option(6, help="perceptual: max Hamming distance between 64-bit pHashes", minimum=0)
    semantic_threshold: float = option(0.95, help="semantic: min cosine between CLIP image embeddings")
    semantic_probes: int = option(2, help="semantic: clusters each embedding is compared in", minimum=1)
    write_rejected: str | None = option(None, help="also write rejected samples as shards into this folder")


def config_class(name: str, parts: list[type]) -> type:
    """One config dataclass (CommonConfig first) with the option fields of `parts`, in order; an option
    declared twice is an error naming both declarers."""
    fields, owner = [], {f.name: "CommonConfig" for f in dataclasses.fields(CommonConfig)}
    for part in parts:
        hints = typing.get_type_hints(part)
        for f in dataclasses.fields(part):
            if f.name in owner:
                raise TypeError(f"option {f.name!r} is declared by both {owner[f.name]} and {part.__name__}")
            owner[f.name] = part.__name__
            fields.append((f.name, hints[f.name], dataclasses.field(
                default=f.default, default_factory=f.default_factory, metadata=f.metadata)))
    cls = dataclasses.make_dataclass(name, fields, bases=(CommonConfig,))
    cls.__module__ = __name__   # pickled by name to the workers
    return cls


FilterConfig = config_class("FilterConfig", [StageOptions, *FILTERS, DedupOptions])


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _record(rec: dict, judgements: Judgement | list[Judgement]) -> bool:
    """Judgements into the sample's record; True when one of them is a final failure."""
    for j in [judgements] if isinstance(judgements, Judgement) else judgements:
        rec["checks"][j.check] = j.score
        rec["facts"].update(j.facts)
        if not j.passed:
            rec["reasons"].append((j.reason, j.detail))
            if j.final:
                return True
    return False


def _run_checks(checks: list[Check], view: View, rec: dict) -> None:
    for check in checks:
        if _record(rec, check.judge(view)):
            return


class FilterStage(GlobalStage):
    """Filter shards by the registered filters (CLIP score, image and caption checks, LAION heads...) and dedup;
    every rejection in the ledger."""

    name = "filter"
    help = "CLIP score, image/caption checks, aesthetic/NSFW heads, exact/perceptual/semantic dedup"
    config_cls = FilterConfig
    uses_model = True
    owned = ("_decisions",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self._clip_spec: ClipSpec | None = None
        self._built: list[Filter] | None = None
        self._partial: dict[str, dict] | None = None
        self._decisions: dict[str, tuple[str, str, list]] | None = None
        self._rejected_writer: ShardWriter | None = None
        self._rejected_json: dict[str, bytes] = {}

    # ------------------------------------------------------------------------------ config
    @property
    def clip_spec(self) -> ClipSpec | None:
        if self._clip_spec is None and self.cfg.clip_model:
            self._clip_spec = resolve_clip(self.cfg.clip_model)
        return self._clip_spec

    @property
    def built(self) -> list[Filter]:
        """Every registered filter with this run's options, active or not."""
        if self._built is None:
            ctx = Context(self.clip_spec, cached)
            self._built = [cls.build(self.cfg, ctx) for cls in FILTERS]
        return self._built

    def checks(self, *needs: str) -> list[Check]:
        return [f for f in self.built if isinstance(f, Check) and f.needs in needs and f.active()]

    @property
    def scorers(self) -> list[ScoreFilter]:
        return [f for f in self.built if isinstance(f, ScoreFilter) and f.active()]

    @property
    def score_names(self) -> dict[str, str]:
        """filter name -> score name, for the scores this run produces."""
        return {f.name: f.score_name() for f in self.scorers}

    def output_folders(self) -> list[str]:
        return super().output_folders() + ([self.cfg.write_rejected] if self.cfg.write_rejected else [])

    def validate(self) -> None:
        c = self.cfg
        bad = sorted(set(c.dedup) - set(DEDUP_KINDS))
        if bad:
            raise PrxError(f"--dedup: unknown kind(s) {bad}; use {','.join(DEDUP_KINDS)}")
        try:
            built = self.built   # resolves --clip-model
        except (ValueError, FileNotFoundError) as exc:
            raise PrxError(str(exc)) from exc
        needs_clip = [flag for f in built for flag in f.clip_flags()]
        if "semantic" in c.dedup:
            needs_clip.append("--dedup semantic")
        if needs_clip and not c.clip_model:
            raise PrxError(f"{', '.join(needs_clip)} need(s) --clip-model (e.g. ViT-B-32:laion2b_s34b_b79k)")
        if not 0 <= c.phash_distance <= 32:
            raise PrxError("--phash-distance must be in 0..32 bits")
        if c.semantic_probes < 1:  # 0 probes would compare nothing: semantic dedup silently off
            raise PrxError("--semantic-probes must be at least 1")
        for f in built:
            f.validate()

    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"clip": self.clip_spec.provenance()} if self.clip_spec else {}
        for f in self.built:
            if f.active():
                out.update(f.provenance())
        out.update(decode_provenance(self.cfg.decode))
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
        """Scan records of the shard's samples, a batch at a time: batch N+1's images decode in the threads while
        batch N is scored, so the model does not wait for the decoder."""
        records: list[dict] = []
        with ThreadPoolExecutor(self.cfg.decode_threads) as pool:
            pending = None
            for batch in self._sample_batches(task):
                started = self._start_batch(batch, task, pool)
                if pending is not None:
                    records += self._finish_batch(*pending)
                pending = started
            if pending is not None:
                records += self._finish_batch(*pending)
        return _records_table(records)

    def _sample_batches(self, task: Task):
        batch: list[Sample] = []
        for item in self.samples(task):
            if isinstance(item, Problem):
                continue  # apply writes its ledger row
            batch.append(item)
            if len(batch) >= self.cfg.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _start_batch(self, samples: list[Sample], task: Task, pool) -> tuple:
        """Records and caption checks (cheap, and a rejected caption needs no model), then the decodes submitted."""
        start = time.perf_counter()
        names = self.score_names
        recs = [self._new_record(s, task, names.values()) for s in samples]
        captions = self.checks("caption")
        for s, rec in zip(samples, recs):
            if captions and not rec["reasons"]:
                _run_checks(captions, View(s.key, rec["meta"], s.text("txt") or "", rec["nbytes"]), rec)
        need_emb = "semantic" in self.cfg.dedup or any(n not in r["scores"] for n in names.values() for r in recs)
        model = self._model() if need_emb and self.clip_spec else None
        decoded = self._submit_decodes(samples, recs, pool, model, need_emb)
        return samples, recs, decoded, model, time.perf_counter() - start

    def _finish_batch(self, samples: list[Sample], recs: list[dict], decoded: list, model, spent: float) -> list[dict]:
        """The decoded images' checks and the scores; each record's seconds: its share of this batch's work."""
        start = time.perf_counter()
        tensors = self._check_decoded(samples, recs, decoded)
        self._score(samples, recs, tensors, model)
        per = (spent + time.perf_counter() - start) / max(len(samples), 1)
        for rec in recs:
            rec["seconds"] = per
            rec.pop("meta", None)
        return recs

    def _new_record(self, s: Sample, task: Task, score_names) -> dict:
        """The sample's scan record: its json, the stored scores it may reuse, its image bytes' size and digest."""
        rec = {"key": s.key, "shard": task.index, "sha256": "", "width": 0, "height": 0, "nbytes": 0,
               "reasons": [], "scores": {}, "phash": None, "emb": None, "facts": {}, "checks": {}, "computed": []}
        try:
            meta = s.meta()
        except BadMember as exc:
            rec["reasons"].append(("bad_member", str(exc)))
            meta = {}
        rec["meta"] = meta
        stored = meta.get("scores") if isinstance(meta.get("scores"), dict) else {}
        for name in score_names:
            if name in stored and not self.cfg.rescore and isinstance(stored[name], (int, float)):
                rec["scores"][name] = float(stored[name])
        data = s.members.get(s.image_member, b"") if s.image_member else b""
        rec["nbytes"] = len(data)
        rec["sha256"] = str(meta.get("sha256") or (hashlib.sha256(data).hexdigest() if data else ""))
        return rec

    def _submit_decodes(self, samples, recs, pool, model, need_emb: bool) -> list:
        """Decode (in threads) what needs decoding: a future per sample, None where nothing is to decode."""
        image_checks = self.checks("size", "pixels")
        need_pixels = (any(c.needs == "pixels" for c in image_checks) or "perceptual" in self.cfg.dedup
                       or need_emb)
        return [None if rec["reasons"] and not image_checks else pool.submit(self._decode, s, rec["meta"],
                                                                             need_pixels, model)
                for s, rec in zip(samples, recs)]

    def _check_decoded(self, samples, recs, decoded: list) -> list:
        """The size and pixel checks on the decoded images; the model's input tensors."""
        image_checks = self.checks("size", "pixels")
        tensors: list = [None] * len(recs)
        for i, (s, rec, fut) in enumerate(zip(samples, recs, decoded)):
            res = fut.result() if fut is not None else None
            if res is None:
                continue
            if isinstance(res, ImageRejected):
                rec["reasons"].insert(0, (res.reason, res.detail))
                continue
            rec["width"], rec["height"], rec["phash"] = res["width"], res["height"], res.get("phash")
            tensors[i] = res.get("tensor")
            if image_checks:
                view = View(s.key, rec["meta"], s.text("txt") or "", rec["nbytes"], res["width"], res["height"],
                            res.get("image"))
                _run_checks(image_checks, view, rec)
        return tensors

    def _decode(self, s: Sample, meta: dict, need_pixels: bool, model) -> dict | ImageRejected:
        width, height = meta.get("width"), meta.get("height")
        image = None
        if need_pixels or not (isinstance(width, int) and isinstance(height, int)):
            try:
                image, info = self._image(s)
            except ImageRejected as exc:
                return exc
            width, height = info.width, info.height
        out = {"width": width, "height": height}
        if image is not None:
            if "perceptual" in self.cfg.dedup:
                out["phash"] = dd.to_signed(dd.phash(image))
            if model is not None:
                out["tensor"] = model.image_tensor(image)
            out["image"] = image
        return out

    def _image(self, s: Sample):
        """(RGB PIL image, ImageInfo): with --decode gpu decoded on the device when it takes the image, else (and
        for every rejection) by the CPU decoder, `Sample.image`."""
        if self.cfg.decode == "gpu" and s.image_member is not None:
            got = on_device(s.members[s.image_member], self.cfg.max_image_pixels,
                            self.cfg.decode_device or worker_device())
            if got is not None:
                return to_pil(got[0]), got[1]
        return s.image(self.cfg.max_image_pixels)

    def _score(self, samples: list[Sample], recs: list[dict], tensors: list, model) -> None:
        """Every active score on the samples still in the running (scores already there are kept)."""
        todo = [i for i, r in enumerate(recs) if not r["reasons"] and tensors[i] is not None]
        if model is None or not todo:
            return
        batch = ScoreBatch(model.encode_images([tensors[i] for i in todo]), [samples[i] for i in todo], model)
        for f in self.scorers:
            name = f.score_name()
            need = [k for k, i in enumerate(todo) if name not in recs[i]["scores"]]
            if need:
                for k, value in zip(need, f.score(batch.subset(need))):
                    recs[todo[k]]["scores"][name] = float(value)
                    recs[todo[k]]["computed"].append(name)
        if "semantic" in self.cfg.dedup:
            for k, i in enumerate(todo):
                recs[i]["emb"] = batch.image_emb[k].astype(np.float32)

    # ------------------------------------------------------------------------------ reduce
    def reduce(self, partial_paths: list[str]) -> dict[str, Any]:
        tables = [fs.read_parquet(fs.read_bytes(p)) for p in partial_paths]
        scan = _Scan(pa.concat_tables(tables) if tables else _records_table([]))
        plan: dict[str, Any] = {"samples": scan.n, "score_names": self.score_names}
        eligible = np.array([not r for r in scan.reasons], dtype=bool)
        for f in self.scorers:
            if f.threshold() is not None:
                self._threshold(f, scan, eligible)
        plan["dedup"] = {kind: self._dedup(kind, scan, eligible) for kind in DEDUP_KINDS if kind in self.cfg.dedup}
        for f in self.scorers:
            if f.top_fraction() is not None:
                plan[f.top_option] = self._keep_top(f, scan, eligible)
            plan.update(f.plan())
        counts, plan["decisions"] = self._write_decisions(partial_paths, scan)
        plan["rejected_by_reason"] = dict(sorted(counts.items()))
        plan["kept"] = int(scan.n - sum(counts.values()))
        plan["scores_computed"] = int(sum(len(c) for c in scan.computed))
        plan["scores_reused"] = int(sum(len(s) for s in scan.scores) - plan["scores_computed"])
        return plan

    @staticmethod
    def _threshold(f: ScoreFilter, scan: "_Scan", eligible: np.ndarray) -> None:
        values = scan.score_array(f.score_name())
        for i in np.flatnonzero(eligible):
            v = values[i]
            detail = "score missing" if np.isnan(v) else f.rejects(v)
            if detail:
                scan.reasons[i].append([f.reason, detail])
                eligible[i] = False

    def _dedup(self, kind: str, scan: "_Scan", eligible: np.ndarray) -> dict[str, int]:
        """One dedup kind over what is still eligible; the kept member of each group by dd.keepers."""
        idx = np.flatnonzero(eligible)
        if len(idx) < 2:
            return {"groups": 0, "rejected": 0}
        cfg = self.cfg
        if kind == "exact":
            pairs = [dd.exact_pairs([scan.digests[i] for i in idx])]
        elif kind == "perceptual":
            pairs = dd.hamming_pairs(np.array([scan.phashes[i] for i in idx], dtype=np.int64), cfg.phash_distance)
        else:
            emb = np.stack([np.asarray(scan.emb[int(i)].as_py(), dtype=np.float32) for i in idx])
            pairs = dd.semantic_pairs(emb, cfg.semantic_threshold, probes=cfg.semantic_probes)
        labels = dd.components(len(idx), pairs)
        rank = self.score_names.get(KEEPER_SCORE)
        kept = dd.keepers(labels, scan.pixels[idx], None if rank is None else scan.score_array(rank)[idx],
                          scan.shards[idx], [scan.keys[i] for i in idx])
        sizes = np.bincount(labels, minlength=len(idx))
        n_rej = 0
        for local, keeper in enumerate(kept.tolist()):
            if keeper == local:
                continue
            i, k = idx[local], idx[keeper]
            scan.reasons[i].append([f"duplicate_{kind}", json.dumps({
                "kept_key": scan.keys[k], "kept_shard": int(scan.shards[k]), "group_size": int(sizes[labels[local]])})])
            eligible[i] = False
            n_rej += 1
        return {"groups": int((sizes > 1).sum()), "rejected": n_rej}

    @staticmethod
    def _keep_top(f: ScoreFilter, scan: "_Scan", eligible: np.ndarray) -> dict[str, Any]:
        """Keep the top fraction by `f`'s score of what is left: one global threshold; ties by shard, then key."""
        fraction, name, values = f.top_fraction(), f.score_name(), scan.score_array(f.score_name())
        idx = np.flatnonzero(eligible)
        k, threshold = keep_top_threshold(values[idx], fraction)
        key_rank = {key: r for r, key in enumerate(sorted(scan.keys))}
        order = sorted(idx.tolist(), key=lambda i: (-values[i], scan.shards[i], key_rank[scan.keys[i]]))
        for i in order[k:]:
            tie = ", tie broken by shard and key)" if threshold is not None and values[i] >= threshold else ")"
            scan.reasons[i].append([f.reason, f"{name} {values[i]:.4f} outside the top {fraction:g} "
                                              f"(kept {k} of {len(idx)}; threshold {threshold:.4f}" + tie])
            eligible[i] = False
        return {"fraction": fraction, "candidates": int(len(idx)), "kept": int(k), "threshold": threshold}

    def _write_decisions(self, partial_paths: list[str], scan: "_Scan") -> tuple[dict[str, int], dict[str, str]]:
        """`_decisions/NNNNNN.parquet` per shard (first reason, detail with the others, all reasons);
        (rejections per first reason, digest per decisions file)."""
        by_shard: dict[int, list[tuple[str, str, str, str]]] = {}
        counts: dict[str, int] = {}
        for i, reasons in enumerate(scan.reasons):
            if reasons:
                code, detail = reasons[0]
                if len(reasons) > 1:
                    detail = f"{detail} (also: {', '.join(r[0] for r in reasons[1:])})"
                by_shard.setdefault(int(scan.shards[i]), []).append((scan.keys[i], code, detail, json.dumps(reasons)))
                counts[code] = counts.get(code, 0) + 1
        digests = {}
        for p in partial_paths:
            index = int(posixpath.basename(str(p).replace("\\", "/")).split(".")[0])
            rows = by_shard.get(index, [])
            t = pa.table({"key": [r[0] for r in rows], "reason": [r[1] for r in rows],
                          "detail": [r[2] for r in rows], "all_reasons": [r[3] for r in rows]})
            buf = io.BytesIO()
            pq.write_table(t, buf, compression="zstd")
            fs.write_bytes_atomic(fs.join(self.cfg.out, "_decisions", shard_name(index, "parquet")), buf.getvalue())
            digests[shard_name(index, "parquet")] = _digest(buf.getvalue())
        return counts, digests

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
            decision = self._decisions.get(s.key)
            if decision is None:
                result = keep(s, self._annotated(s.meta(), scores, "kept", [], rec), scores=scores)
            else:
                code, detail, all_reasons = decision
                result = reject(s, code, detail, scores=scores)
                if self._rejected_writer is not None:
                    try:
                        meta = s.meta()
                    except BadMember:
                        meta = {}
                    self._rejected_json[s.key] = dumps_json(self._annotated(meta, scores, "rejected", all_reasons, rec))
            # the scan did the work: its time per sample goes into the ledger (apply's time is added on top)
            result.row.seconds = float(rec["seconds"] or 0.0)
            results.append(result)
        return results

    @staticmethod
    def _annotated(meta: dict, scores: dict, verdict: str, reasons: list, rec: dict) -> dict:
        """`meta` with this run's scores added to json.scores and the verdict in json.filter."""
        meta["scores"] = {**(meta.get("scores") if isinstance(meta.get("scores"), dict) else {}), **scores}
        section: dict[str, Any] = {"verdict": verdict, "reasons": [{"reason": r[0], "detail": r[1]} for r in reasons]}
        checks = json.loads(rec["checks"])
        if checks:
            section["checks"] = checks
        section.update({k: v for k, v in _facts(rec).items() if v})
        meta["filter"] = section
        return meta

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


def _facts(rec: dict) -> dict:
    """What the checks found (json.filter beside checks); scan partials written before facts held `language`."""
    if "facts" in rec:
        return json.loads(rec["facts"])
    return {"language": rec.get("language")}


class _Scan:
    """The concatenated scan partials as the reduce reads them; `reasons` grow as the reduce rejects."""

    def __init__(self, table: pa.Table):
        self.table, self.n = table, table.num_rows
        self.keys = table.column("key").to_pylist()
        self.shards = np.asarray(table.column("shard").to_pylist(), dtype=np.int64)
        self.pixels = (np.asarray(table.column("width").to_pylist(), dtype=np.float64)
                       * np.asarray(table.column("height").to_pylist(), dtype=np.float64))
        self.reasons: list[list] = [json.loads(r) for r in table.column("reasons").to_pylist()]
        self.scores = [dict(s) for s in table.column("scores").to_pylist()]
        self.computed = table.column("computed").to_pylist()
        self.digests = table.column("sha256").to_pylist()
        self.phashes = table.column("phash").to_pylist()
        self.emb = table.column("emb")

    def score_array(self, name: str) -> np.ndarray:
        return np.array([s.get(name, np.nan) for s in self.scores], dtype=np.float64)


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
        "facts": pa.array([json.dumps(r["facts"]) for r in records], pa.string()),
        "checks": pa.array([json.dumps(r["checks"]) for r in records], pa.string()),
        "computed": pa.array([r["computed"] for r in records], pa.list_(pa.string())),
        "seconds": pa.array([float(r.get("seconds", 0.0)) for r in records], pa.float64()),
    })


STAGE = FilterStage
