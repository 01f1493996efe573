"""`prx-data run MANIFEST.yaml`: a whole pipeline from one manifest, on one Dask cluster.

A manifest names the run, its root folder and an ordered list of stages, each with its own options under
the names of its flags:

    name: demo
    root: demo-out/pipeline
    stages:
      - download: {urls: "{root}/../urls.parquet", allow-private-network: true}
      - filter: {clip-model: clip-vit-b-32, keep-top: 0.3}
      - recaption: {model: qwen2-vl}
      - encode: {}
      - audit: {fail-on: "long.words.median < 100"}

Stage k writes `ROOT/NN-STAGE/` and is stage k+1's input (`audit` reads the folder before it, or the stages
its `dirs` names, and is nobody's input). Every block is checked by its stage's config dataclass before any
work. Resume is each stage's own; a stage whose options changed, or whose input was rewritten since it read
it, is refused unless `--overwrite`, which redoes it and every later stage. The end: a summary (the funnel,
time and samples/s per stage, the audit gate) printed and saved as `ROOT/_run.json`. Exit status 0, 1 when
the gate fails (outputs kept), 2 for a bad manifest or a stage that cannot run.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from contract import fs
from contract.config import ConfigError, add_arguments, flag_for, build_config, content_fields, option, option_key, \
    read_yaml, to_dict, values_from_mapping
from contract.errors import PrxError
from contract.ledger import read_stage_json
from pipeline.stages import REPORT, STAGES

# The order rules come from the stage registry (pipeline/stages/__init__.py): shard stages by rank (same rank:
# either one), reports anywhere after the first. `audit` is the report this module runs.
ENTRIES = {s.name: s for s in STAGES}
RANK = {s.name: s.rank for s in STAGES if s.rank is not REPORT}
FIRST = [name for name, rank in RANK.items() if rank == min(RANK.values())]
AUDIT = "audit"
# The last shard stage may be listed several times in a row, each with its own options and folder, all reading
# the stage before them: one captioned folder encoded into several latent spaces
# (manifests/pipelines/example-latent-spaces.yaml). Nothing comes after it, so no later stage is ambiguous.
FAN_OUT = [name for name, rank in RANK.items() if rank == max(RANK.values())]


def _order_text() -> str:
    """The order rules in words: "ingest or download first, then filter, recaption, encode (...); audit ..."."""
    later = [" or ".join(n for n, r in RANK.items() if r == rank) for rank in sorted(set(RANK.values()))][1:]
    reports = ", ".join(s.name for s in STAGES if s.rank is REPORT)
    return (" or ".join(FIRST) + f" first, then {', '.join(later)} (each at most once, in that order, except "
            f"{' and '.join(FAN_OUT)}, which may be repeated side by side: each reads the same input, e.g. one "
            f"folder per latent space); {reports} anywhere after the first")


ORDER_TEXT = _order_text()
RUN_SET = ("out", "executor", "scheduler", "workers", "progress", "overwrite", "config", "limit")  # run flags
TOP_KEYS = ("name", "root", "stages")
RUN_FILE = "_run.json"


@dataclass
class RunConfig:
    """Flags of `prx-data run` (the manifest is the positional argument)."""

    root: str | None = option(None, help="output root (default: the manifest's `root`); stage k writes ROOT/NN-STAGE")
    from_stage: str | None = option(None, flag="--from", help="start at this stage (name or NN-name); the "
                                                              "stages before it must be complete")
    until: str | None = option(None, help="stop after this stage (name or NN-name)")
    dry_run: bool = option(False, help="print each stage's state and its equivalent prx-data command; run nothing")
    overwrite: bool = option(False, help="redo a stage whose options or input changed, and every later stage")
    limit: int | None = option(None, help="process only the first N inputs of the first stage", minimum=0)
    executor: str = option("dask", choices=["local", "dask"],
                           help="'dask' (one LocalCluster for the whole run, or --scheduler) or 'local'")
    scheduler: str | None = option(None, help="address of an existing Dask scheduler (shared storage needed)")
    workers: int | None = option(None, help="LocalCluster worker processes (default: cores, or GPUs)", minimum=1)
    progress: bool = option(True, help="show progress bars")


@dataclass
class Step:
    """One manifest entry, checked: its stage, options as written, folder and config."""

    index: int                                  # 1-based position in the manifest
    name: str                                   # stage name
    options: dict[str, Any]                     # the manifest block, {root} expanded
    folder: str                                 # ROOT/NN-STAGE
    cfg: Any                                    # the stage's config dataclass, filled
    inputs: list[str] = field(default_factory=list)  # folders of earlier steps it reads
    state: str = "new"                          # new, resume, done, changed, stale, redo
    why: str = ""

    @property
    def label(self) -> str:
        return f"{self.index:02d}-{self.name}"


class ManifestError(ConfigError):
    """A manifest that cannot run; the message names the file, the stage and the key."""


# ------------------------------------------------------------------------------------ reading the manifest
def stage_class(name: str):
    """The Stage class of a shard stage (None for audit, which is a report)."""
    return getattr(ENTRIES[name].load(), "STAGE", None)


def config_class(name: str) -> type:
    if name == AUDIT:
        from pipeline.stages.audit import AuditConfig

        return AuditConfig
    return stage_class(name).config_cls


def load_manifest(path: str) -> dict[str, Any]:
    if not fs.exists(path):
        raise ManifestError(f"manifest {path} does not exist")
    data = read_yaml(path)
    unknown = set(data) - set(TOP_KEYS)
    if unknown:
        raise ManifestError(f"{path}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; "
                            f"valid: {', '.join(TOP_KEYS)}")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ManifestError(f"{path}: `stages:` must be a non-empty list of `- STAGE: {{option: value}}` entries")
    return data


def _entry(path: str, i: int, entry: Any) -> tuple[str, dict]:
    valid = ", ".join(ENTRIES)
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ManifestError(f"{path}: stage {i}: expected one `STAGE: {{options}}` mapping; stages: {valid}")
    (name, options), = entry.items()
    if name not in ENTRIES:
        raise ManifestError(f"{path}: stage {i}: unknown stage {name!r}; valid stages: {valid}")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ManifestError(f"{path}: stage {i} ({name}): options must be a mapping of option: value")
    return name, options


def check_order(path: str, names: list[str]) -> None:
    if names[0] not in FIRST:
        raise ManifestError(f"{path}: stage 1 is {names[0]!r}; a pipeline starts with {' or '.join(FIRST)} "
                            f"({ORDER_TEXT})")
    last, previous = -1, None
    for i, name in enumerate(names, 1):
        if name not in RANK:   # a report
            continue
        if RANK[name] < last or (RANK[name] == last and not (name == previous and name in FAN_OUT)):
            raise ManifestError(f"{path}: stage {i} ({name}) is out of order; {ORDER_TEXT}")
        last, previous = RANK[name], name


def _expand(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace("{root}", root)
    if isinstance(value, list):
        return [_expand(v, root) for v in value]
    return value


def build_steps(path: str, root: str, run: RunConfig) -> list[Step]:
    """Every entry checked by its stage's config dataclass and wired to its input: before any work."""
    data = load_manifest(path)
    entries = [_entry(path, i, e) for i, e in enumerate(data["stages"], 1)]
    check_order(path, [n for n, _ in entries])
    steps: list[Step] = []
    for i, (name, raw) in enumerate(entries, 1):
        options = {k: _expand(v, root) for k, v in raw.items()}
        folder = fs.join(root, f"{i:02d}-{name}")
        where = f"{path}: stage {i} ({name})"
        cls = config_class(name)
        values = values_from_mapping(cls, options, where)
        refused = sorted(set(values) & set(RUN_SET)) + (["in"] if "input" in values and i > 1 else [])
        if refused:
            raise ManifestError(f"{where}: option(s) {', '.join(refused)} are set by prx-data run "
                                f"(folders are chained ROOT/NN-STAGE; use the run's own flags)")
        step = Step(i, name, options, folder, None)
        values.update(_wiring(step, steps, values, run, where))
        step.cfg = build_config(cls, values)
        steps.append(step)
    _check_first_input(steps, path)
    _check_folders(steps, path)
    _check_audits(steps, path)
    return steps


def _wiring(step: Step, earlier: list[Step], values: dict, run: RunConfig, where: str) -> dict[str, Any]:
    """in/out/dirs and the run's executor flags for one step."""
    wired: dict[str, Any] = {"out": step.folder, "executor": run.executor, "scheduler": run.scheduler,
                             "workers": run.workers, "progress": run.progress}
    shard_steps = [s for s in earlier if s.name != AUDIT]
    if step.index == 1:
        wired["limit"] = run.limit
    elif step.name != AUDIT:  # the last earlier stage of a lower rank (repeated FAN_OUT stages share it)
        source = [s for s in shard_steps if RANK[s.name] < RANK[step.name]][-1]
        wired["input"] = source.folder
        step.inputs = [source.folder]
    else:
        by_name = {s.name: s.folder for s in shard_steps} | {s.label: s.folder for s in shard_steps}
        dirs = [by_name.get(d, d) for d in values.get("dirs") or []] or [shard_steps[-1].folder]
        wired["dirs"] = dirs
        step.inputs = [d for d in dirs if d in by_name.values()]
        for d in dirs:
            if d not in by_name.values() and not fs.exists(d):
                raise ManifestError(f"{where}: dirs: {d} is neither an earlier stage ({', '.join(by_name)}) "
                                    f"nor an existing folder")
    return wired


def _check_first_input(steps: list[Step], path: str) -> None:
    """The first stage's input must exist (its stage's own checks)."""
    first = steps[0]
    stage = stage_class(first.name)(dataclasses.replace(first.cfg))
    try:
        stage.validate()
    except PrxError as exc:
        raise ManifestError(f"{path}: stage 1 ({first.name}): {exc}") from None


def stage_of(step: Step):
    """The Stage object a step runs (the audit's too)."""
    if step.name == AUDIT:
        from pipeline.stages.audit import AuditStage

        return AuditStage(step.cfg)
    return stage_class(step.name)(step.cfg)


def _check_folders(steps: list[Step], path: str) -> None:
    """No stage writes where a stage of the run reads or another one writes, whatever the spelling (links,
    `file:` URLs, bind mounts): only the chain itself, a stage folder read by a later stage, is allowed."""
    from pipeline.runner import canonical, relation

    stages = {s.index: stage_of(s) for s in steps}
    writes = [(s.index, w) for s in steps for w in stages[s.index].output_folders() + stages[s.index].report_paths()
              if w]
    reads = [(s.index, r) for s in steps for r in stages[s.index].read_paths() if r and not str(r).startswith("hf:")]
    places = {p: canonical(p) for _, p in writes + reads}
    chain = {s.folder: s.index for s in steps}
    for n, (wi, w) in enumerate(writes):
        for ri, r in reads:
            rel = relation(places[w], places[r])
            if rel and not (rel == "the same as" and chain.get(w) == wi and ri > wi):
                raise ManifestError(f"{path}: stage {wi} would write {w}, which is {rel} stage {ri}'s input {r}; "
                                    "a run never writes where it reads: change that option or the run's --root")
        for wj, w2 in writes[n + 1:]:
            rel = relation(places[w], places[w2])
            if rel:
                raise ManifestError(f"{path}: stage {wi} would write {w}, which is {rel} stage {wj}'s output {w2}")


def _check_audits(steps: list[Step], path: str) -> None:
    from pipeline.audit import gate

    for s in steps:
        if s.name == AUDIT:
            try:
                gate.parse_rules(s.cfg.fail_on)
            except ConfigError as exc:
                raise ManifestError(f"{path}: stage {s.index} (audit): fail-on: {exc}") from None


def select(steps: list[Step], run: RunConfig) -> list[Step]:
    """The steps between --from and --until (both included)."""
    def find(value: str | None, flag: str, default: int) -> int:
        if value is None:
            return default
        hits = [s.index for s in steps if value in (s.name, s.label, str(s.index))]
        if len(hits) != 1:
            names = ", ".join(s.label for s in steps)
            what = "names several stages" if hits else "is not a stage of this manifest"
            raise ManifestError(f"{flag} {value!r} {what}; give one of: {names}")
        return hits[0]

    lo, hi = find(run.from_stage, "--from", 1), find(run.until, "--until", len(steps))
    if lo > hi:
        raise ManifestError(f"--from {run.from_stage} comes after --until {run.until}")
    return [s for s in steps if lo <= s.index <= hi]


# ------------------------------------------------------------------------------------ what is already there
def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def changed_options(recorded: dict[str, Any], cfg: Any) -> list[str]:
    """`name: old -> new` for each content option (runtime ones left out) that differs from the recorded run."""
    now = _normal(content_fields(cfg))
    return [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in now.items() if _normal(recorded.get(k)) != v]


def _validated(step: Step) -> Any:
    """The config as the stage records it (validate() may fill derived fields, e.g. download's urls)."""
    cls = stage_class(step.name)
    if cls is None or step.index > 1:
        return step.cfg
    stage = cls(dataclasses.replace(step.cfg))
    stage.validate()
    return stage.cfg


def classify(steps: list[Step]) -> None:
    """Set each step's state from its folder: new, resume, done, changed or stale; later ones redo."""
    by_folder = {s.folder: s for s in steps}
    dirty = False
    for s in steps:
        info = read_stage_json(s.folder) if fs.exists(s.folder) else None
        if info is None:
            s.state = "new"
        elif info.get("stage") != s.name:
            s.state, s.why = "changed", f"the folder holds a run of stage {info.get('stage')!r}"
        elif diffs := changed_options(info.get("config") or {}, _validated(s)):
            s.state, s.why = "changed", "options changed: " + "; ".join(diffs)
        elif stale := _stale_inputs(s, info, by_folder):
            s.state, s.why = "stale", stale
        else:
            s.state = "done" if info.get("status") == "complete" else "resume"
        if dirty and s.state in ("done", "resume"):
            s.state, s.why = "redo", "an earlier stage is redone"
        dirty = dirty or s.state in ("changed", "stale")


def _stale_inputs(step: Step, info: dict, by_folder: dict[str, Step]) -> str:
    recorded = info.get("input_hashes") or {}
    for folder in step.inputs:
        upstream = read_stage_json(folder) if fs.exists(folder) else None
        if upstream is None or upstream.get("config_hash") != recorded.get(folder):
            return f"its input {by_folder[folder].label} was rewritten since it read it"
    return ""


def refuse_changes(steps: list[Step], selected: list[Step], overwrite: bool) -> None:
    before = [s for s in steps if s.index < selected[0].index and s.state != "done"]
    if before:
        s = before[0]
        raise ManifestError(f"--from {selected[0].label}: stage {s.label} is not complete ({s.state}"
                            f"{': ' + s.why if s.why else ''}); run without --from first")
    todo = [s for s in selected if s.state in ("changed", "stale", "redo")]
    if todo and not overwrite:
        first = todo[0]
        later = ", ".join(s.label for s in todo[1:])
        raise ManifestError(f"stage {first.label}: {first.why}; refusing to redo it"
                            f"{' and ' + later if later else ''} without --overwrite (outputs kept as they are)")


# ------------------------------------------------------------------------------------ commands
def _flag_value(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def stage_argv(step: Step) -> list[str]:
    """The `prx-data STAGE ...` command line equivalent to this step: the options its block sets, its
    folders and the executor flags."""
    cfg = step.cfg
    keys = {str(k).replace("_", "-") for k in step.options}
    argv = [step.name] + (list(cfg.dirs) if step.name == AUDIT else [])
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        wanted = option_key(f) in keys or f.name in ("input", "out", "limit", "executor", "scheduler", "workers") \
            or (f.name == "progress" and value is False)
        if f.name in ("config", "overwrite", "dirs") or not wanted or value is None:
            continue
        flag = "--" + option_key(f)
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        else:
            argv += [flag, _flag_value(value)]
    return argv


def command_text(argv: list[str], prog: str = "prx-data") -> str:
    return " ".join([prog, *(shlex.quote(a) for a in argv)])


def run_argv(manifest: str, run: RunConfig, **changes: Any) -> str:
    """The `prx-data run` command line for this run, with some flags changed (e.g. from_stage)."""
    values = dataclasses.replace(run, **changes)
    argv = ["run", manifest]
    for f in dataclasses.fields(values):
        value, default = getattr(values, f.name), f.default
        if value == default or value is None:
            continue
        flag = f.metadata.get("flag") or flag_for(f.name)
        argv += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return command_text(argv)


# ------------------------------------------------------------------------------------ running
@dataclass
class Outcome:
    """What happened to one step in this invocation."""

    step: Step
    action: str            # done (skipped), ran, resumed, redone
    seconds: float | None  # this invocation's wall time (None when skipped)


def run_step(step: Step, scheduler: str | None) -> int:
    """Run one step in this process; its exit status (the stage's own messages are printed)."""
    cfg = dataclasses.replace(step.cfg, scheduler=scheduler or step.cfg.scheduler)
    if step.name == AUDIT:
        from pipeline.stages.audit import main as audit_main

        return audit_main(stage_argv(dataclasses.replace(step, cfg=cfg))[1:])
    from pipeline.runner import format_summary, run_stage

    summary = run_stage(stage_class(step.name)(cfg))
    print(format_summary(step.name, cfg.out, summary), flush=True)
    return 0


def _start_cluster(run: RunConfig, steps: list[Step]):
    """One Dask cluster for every stage of the run: (scheduler address or None, the cluster to close)."""
    if run.executor != "dask" or run.scheduler or not steps:
        return run.scheduler, None
    from pipeline.runner import start_local_cluster

    uses_gpus = any(getattr(stage_class(s.name), "uses_model", False) for s in steps if s.name != AUDIT)
    processes = any(getattr(s.cfg, "prepare_processes", 0) for s in steps)
    cluster = start_local_cluster(run.workers, uses_gpus, daemon=not processes)
    return cluster.scheduler_address, cluster


def _fail(step: Step, manifest: str, run: RunConfig, why: str) -> None:
    print(f"prx-data run: stage {step.label} failed: {why}\n"
          f"  rerun the run from it:   {run_argv(manifest, run, from_stage=step.label)}\n"
          f"  or the stage alone:      {command_text(stage_argv(step))}", file=sys.stderr)


def execute(steps: list[Step], todo: list[Step], manifest: str, run: RunConfig) -> tuple[int, list[Outcome]]:
    """Run the selected steps in order on one cluster; stops at the first failure or failing gate."""
    outcomes: list[Outcome] = []
    scheduler, cluster = _start_cluster(run, [s for s in todo if s.state != "done"])
    try:
        for step in todo:
            if step.state == "done":
                print(f"== {step.label}: complete, skipped", flush=True)
                outcomes.append(Outcome(step, "done", None))
                continue
            if step.state in ("changed", "stale", "redo"):
                print(f"== {step.label}: redone ({step.why}); removing what it wrote in {step.folder}", flush=True)
                from pipeline.runner import discard_run

                discard_run(stage_of(step))
            print(f"== {step.label}: {command_text(stage_argv(step))}", flush=True)
            t0 = time.perf_counter()
            try:
                rc = run_step(step, scheduler)
            except (ConfigError, PrxError, FileNotFoundError) as exc:
                _fail(step, manifest, run, str(exc))
                return 2, outcomes
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                from contract.shards import disk_full

                _fail(step, manifest, run, disk_full(exc, step.folder))
                return 1, outcomes
            except Exception as exc:  # noqa: BLE001 - a crash inside a stage: say which, then how to rerun
                traceback.print_exc()
                _fail(step, manifest, run, f"{type(exc).__name__}: {exc}")
                return 1, outcomes
            action = {"new": "ran", "resume": "resumed"}.get(step.state, "redone")
            outcomes.append(Outcome(step, action, time.perf_counter() - t0))
            step.state = "done"
            if rc == 2:
                _fail(step, manifest, run, "see the message above")
                return 2, outcomes
            if step.name == AUDIT and not gate_result(step)["passed"]:
                return 1, outcomes
    finally:
        if cluster is not None:
            cluster.close()
    return 0, outcomes


# ------------------------------------------------------------------------------------ the summary
def gate_result(step: Step) -> dict[str, Any]:
    """The audit step's --fail-on rules evaluated over its audit.json (so a changed rule needs no rescan)."""
    from pipeline.audit import gate

    rules = gate.parse_rules(step.cfg.fail_on)
    path = step.cfg.json_out or fs.join(step.folder, "audit.json")
    if not rules:
        return {"stage": step.label, "rules": [], "passed": True, "report": path}
    report = json.loads(fs.read_bytes(path).decode("utf-8"))
    results = gate.evaluate(rules, report["groups"])
    return {"stage": step.label, "rules": results, "passed": all(r["passed"] for r in results), "report": path}


def stage_row(step: Step, outcome: Outcome | None, previous: dict[str, Any]) -> dict[str, Any]:
    info = read_stage_json(step.folder) or {}
    counts = info.get("counts") or {}
    seconds = outcome.seconds if outcome and outcome.seconds is not None else previous.get("seconds")
    n = counts.get("in", counts.get("captions", 0))
    return {"stage": step.label, "folder": step.folder, "status": info.get("status", "not run"),
            "action": outcome.action if outcome else "not run",
            "in": n, "kept": counts.get("kept"), "rejected": counts.get("rejected"), "failed": counts.get("failed"),
            "reasons": counts.get("reasons", {}), "seconds": round(seconds, 3) if seconds is not None else None,
            "samples_per_s": round(n / seconds, 2) if seconds else None}


def funnel(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Inputs of the first stage -> kept after each shard stage; every input has one final outcome when each
    stage's `in` is the previous one's `kept` (`balanced`)."""
    shard = [r for r in rows if r["kept"] is not None]
    if not shard:
        return {}
    balanced = all(b["in"] == a["kept"] for a, b in zip(shard, shard[1:]))
    lost = {f"{r['stage']} {k}": n for r in shard for k, n in r["reasons"].items() if not k.startswith("kept:")}
    return {"inputs": shard[0]["in"], "kept": shard[-1]["kept"], "per_stage": [r["kept"] for r in shard],
            "not_kept": sum(r["rejected"] + r["failed"] for r in shard), "by_reason": lost, "balanced": balanced}


def write_run_json(root: str, doc: dict[str, Any]) -> None:
    fs.write_bytes_atomic(fs.join(root, RUN_FILE), json.dumps(doc, indent=2, default=str).encode("utf-8"))


def format_run(doc: dict[str, Any]) -> str:
    head = f"{'stage':<14} {'action':<8} {'in':>7} {'kept':>7} {'rejected':>8} {'failed':>7} {'seconds':>8} {'samples/s':>9}"
    lines = [f"run {doc['name']}: {doc['root']} ({doc['status']})", head]
    for r in doc["stages"]:
        cell = lambda v, w, f="{}": (f.format(v) if v is not None else "-").rjust(w)  # noqa: E731
        lines.append(f"{r['stage']:<14} {r['action']:<8} {cell(r['in'], 7)} {cell(r['kept'], 7)} "
                     f"{cell(r['rejected'], 8)} {cell(r['failed'], 7)} {cell(r['seconds'], 8, '{:.1f}')} "
                     f"{cell(r['samples_per_s'], 9, '{:.1f}')}")
    f = doc.get("funnel") or {}
    if f:
        lines.append(f"funnel: {f['inputs']} inputs -> " + " -> ".join(map(str, f["per_stage"]))
                     + f" kept; {f['not_kept']} not kept" + ("" if f["balanced"] else " (DOES NOT ADD UP)"))
        lines += [f"  {k:<50} {n}" for k, n in sorted(f["by_reason"].items())]
    for g in doc.get("gates", []):
        ok = sum(r["passed"] for r in g["rules"])
        lines.append(f"gate {g['stage']}: {'passed' if g['passed'] else 'FAILED'} ({ok}/{len(g['rules'])} rules); "
                     f"report {g['report']}")
        lines += [f"  FAIL {r['rule']}: " + ", ".join(f"{x['group']} {x['value']}" for x in r["failures"])
                  for r in g["rules"] if not r["passed"]]
    return "\n".join(lines)


def summarize_run(name: str, manifest: str, root: str, run: RunConfig, steps: list[Step],
                  outcomes: list[Outcome], status: str) -> dict[str, Any]:
    previous = {}
    if fs.exists(fs.join(root, RUN_FILE)):
        old = json.loads(fs.read_bytes(fs.join(root, RUN_FILE)).decode("utf-8"))
        previous = {r["stage"]: r for r in old.get("stages", [])}
    by_step = {o.step.index: o for o in outcomes}
    rows = [stage_row(s, by_step.get(s.index), previous.get(s.label, {})) for s in steps]
    gates = [gate_result(s) for s in steps if s.name == AUDIT and s.index in by_step
             and fs.exists(s.cfg.json_out or fs.join(s.folder, "audit.json"))]
    return {"name": name, "manifest": manifest, "root": root, "status": status, "run_config": to_dict(run),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": rows, "funnel": funnel(rows),
            "gates": gates}


# ------------------------------------------------------------------------------------ the command
def dry_run(steps: list[Step], todo: list[Step]) -> int:
    for s in steps:
        mark = "" if s in todo else "  (not selected)"
        why = f": {s.why}" if s.why else ""
        print(f"# {s.label}: {s.state}{why}{mark}")
        print(command_text(stage_argv(s)))
    return 0


def run_manifest(manifest: str, run: RunConfig) -> int:
    data = load_manifest(manifest)
    root = run.root or data.get("root")
    if not root:
        raise ManifestError(f"{manifest}: no `root:` and no --root: say where the stage folders go")
    name = str(data.get("name") or os.path.splitext(os.path.basename(manifest))[0])
    steps = build_steps(manifest, str(root), run)
    todo = select(steps, run)
    classify(steps)
    if run.dry_run:
        return dry_run(steps, todo)
    refuse_changes(steps, todo, run.overwrite)
    if all(s.state == "done" for s in todo) and fs.exists(fs.join(root, RUN_FILE)):
        doc = summarize_run(name, manifest, root, run, steps, [Outcome(s, "done", None) for s in todo], "complete")
        print("nothing to do: every stage is complete\n" + format_run(doc))
        return 0 if all(g["passed"] for g in doc["gates"]) else 1
    from contract.lock import exclusive

    with exclusive(root, f"prx-data run {manifest}"):
        rc, outcomes = execute(steps, todo, manifest, run)
    status = {0: "complete" if todo[-1] is steps[-1] else f"complete until {todo[-1].label}",
              1: "gate failed" if outcomes and outcomes[-1].step.name == AUDIT else "failed"}.get(rc, "failed")
    doc = summarize_run(name, manifest, root, run, steps, outcomes, status)
    write_run_json(root, doc)
    print("\n" + format_run(doc) + f"\nsummary: {fs.join(root, RUN_FILE)}")
    return rc


def add_command(sub) -> None:
    p = sub.add_parser("run", help="a whole pipeline from a manifest (manifests/pipelines/*.yaml), on one cluster",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", metavar="MANIFEST.yaml")
    add_arguments(p, RunConfig)
    p.set_defaults(_func=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    values = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "manifest")}
    return run_manifest(args.manifest, build_config(RunConfig, values))
