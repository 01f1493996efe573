"""The stage runner: resume rules, executors (local or Dask), progress and the end-of-stage summary.

One output folder holds one run of one stage. Rerunning into it with the same config hash resumes
(finished shards are skipped, each phase on its own); a different hash is refused unless --overwrite.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import hashlib
import json
import os
import posixpath
import re
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from contract import fs, ledger
from contract.lock import LOCK_NAME, exclusive
from contract.config import config_hash, to_dict
from contract.shards import ShardWriter, shard_done, shard_name
from pipeline.stage import GlobalStage, Stage, PrxError, Task, read_stage_json

PACKAGES = ("prx", "torch", "torchvision", "transformers", "diffusers", "open_clip_torch", "webdataset",
            "img2dataset", "dask", "distributed", "datasets", "pyarrow", "pillow", "vllm")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------ worker side
_MODEL_CACHE: dict[Any, Any] = {}


def cached(key: Any, factory: Callable[[], Any]) -> Any:
    """Load a model once per worker process and reuse it across shards."""
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = factory()
    return _MODEL_CACHE[key]


def worker_device() -> str:
    """The torch device for this worker: its own GPU when there are GPUs, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    try:
        from distributed import get_worker

        rank = int(get_worker().name)
    except Exception:  # noqa: BLE001 - not on a Dask worker, or a named one
        rank = 0
    return f"cuda:{rank % torch.cuda.device_count()}"


@dataclass
class TaskResult:
    index: int
    rows: int = 0
    kept: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    bytes_by_member: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def run_task(stage_cls: type, cfg: Any, task: Task, plan: dict | None = None) -> TaskResult:
    """One output shard: the unit of work sent to an executor."""
    start = time.perf_counter()
    stage = stage_cls(cfg)
    if plan is not None:
        stage.set_plan(plan)
    writer = ShardWriter(cfg.out, task.index, stage.name)
    try:
        stage.process(task, writer)
        stats = writer.close()
    except BaseException:
        writer.abort()
        raise
    reasons = Counter(f"{r.outcome}:{r.reason}" for r in stats.rows)
    return TaskResult(task.index, len(stats.rows), sum(r.outcome == ledger.KEPT for r in stats.rows),
                      dict(reasons), stats.bytes_by_member, time.perf_counter() - start)


def run_scan(stage_cls: type, cfg: Any, task: Task) -> TaskResult:
    start = time.perf_counter()
    table = stage_cls(cfg).scan(task)
    import io

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    fs.write_bytes_atomic(fs.join(cfg.out, "_map", shard_name(task.index, "parquet")), buf.getvalue())
    return TaskResult(task.index, rows=table.num_rows, seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------ executors
class LocalExecutor:
    """In-process, one task after another: for debugging and tests."""

    def map(self, fn, stage: Stage, tasks: list[Task], *args, batch: int = 1):
        for task in tasks:
            yield fn(type(stage), stage.cfg, task, *args)

    def close(self):
        pass


class DaskExecutor:
    """A distributed.LocalCluster on this machine, or an existing cluster by address."""

    def __init__(self, scheduler: str | None, workers: int | None, uses_model: bool, processes: int = 0):
        from distributed import Client

        self.cluster = None
        self.resources: dict[str, float] = {}
        if scheduler:
            self.client = Client(scheduler)
            infos = self.client.scheduler_info().get("workers", {}).values()
            if uses_model and any(w.get("resources", {}).get("GPU") for w in infos):
                self.resources = {"GPU": 1}
        else:
            self.cluster = start_local_cluster(workers, uses_gpus=uses_model, daemon=not processes)
            self.client = Client(self.cluster)
            if uses_model and _local_gpu_count():
                self.resources = {"GPU": 1}

    def map(self, fn, stage: Stage, tasks: list[Task], *args, batch: int = 1):
        """fn(stage class, cfg, task, *args) for every task, results as they complete. `batch` tasks run one
        after another in one Dask task: for cheap tasks (the audit's ~0.1 s shards), where Dask's own work,
        ~8 ms of the driver's CPU a task on a 2-core machine, would otherwise cost several percent."""
        from distributed import as_completed

        import uuid

        run = uuid.uuid4().hex[:8]   # a key names one run's task: a cluster may still hold an earlier run's
        chunks = [tasks[i:i + max(1, batch)] for i in range(0, len(tasks), max(1, batch))]
        futures = [self.client.submit(_run_batch, fn, type(stage), stage.cfg, chunk, *args, pure=False,
                                      resources=self.resources or None,
                                      key=f"{fn.__name__}-{stage.name}-{chunk[0].index}-{run}")
                   for chunk in chunks]
        try:
            for fut in as_completed(futures):
                yield from fut.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def close(self):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _run_batch(fn, stage_cls: type, cfg: Any, tasks: list[Task], *args) -> list:
    return [fn(stage_cls, cfg, task, *args) for task in tasks]


# Dask's diagnostics are tuned for watching a dashboard: a 20 ms event-loop tick and a 10 ms statistical profiler
# in every process cost ~9% of a 2-core machine with the cluster idle (bench/audit.py notes). A local cluster
# starts with them turned down; a value the user set (Dask config file, DASK_* variables) still wins.
LOCAL_CLUSTER_DEFAULTS = {"distributed": {
    "admin": {"tick": {"interval": "500ms"}, "system-monitor": {"interval": "2s"}},
    "worker": {"profile": {"enabled": False}, "memory": {"monitor-interval": "1s"}}}}


def start_local_cluster(workers: int | None, uses_gpus: bool, daemon: bool = True):
    """A distributed.LocalCluster here: one worker process per GPU (each advertising a `GPU` resource) when
    there are GPUs and `uses_gpus`, else one per core; `workers` overrides the count. `prx-data run` starts
    one for the whole pipeline and hands its address to every stage (as --scheduler). `daemon` False: workers
    that may start processes of their own (--prepare-processes; pipeline/prepare_pool.py)."""
    import dask.config
    from distributed import LocalCluster

    dask.config.update_defaults(LOCAL_CLUSTER_DEFAULTS)
    n_gpus = _local_gpu_count() if uses_gpus else 0
    kwargs: dict[str, Any] = {"threads_per_worker": 1, "processes": True, "dashboard_address": None}
    if n_gpus:
        kwargs["n_workers"] = workers or n_gpus
        kwargs["resources"] = {"GPU": 1}
    else:
        kwargs["n_workers"] = workers or os.cpu_count() or 1
    with dask.config.set({"distributed.worker.daemon": daemon}):
        return LocalCluster(**kwargs)


def _local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def make_executor(cfg: Any, uses_model: bool):
    if cfg.executor == "local":
        return LocalExecutor()
    if cfg.executor == "dask":
        return DaskExecutor(cfg.scheduler, cfg.workers, uses_model, getattr(cfg, "prepare_processes", 0))
    raise PrxError(f"unknown executor {cfg.executor!r}: use local or dask")


# ------------------------------------------------------------------------------------ the run
def _hash_file_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# ------------------------------------------------------------------------------------ output safety
def prepare_output(stage: Stage, chash: str) -> None:
    """Apply the one-folder-one-run rule to every folder the stage writes: resume on the same hash (redoing
    damaged shards), refuse on another unless --overwrite, which removes only what that folder's `_stage.json`
    says its run wrote. Nothing is touched before the checks: an output that is, holds or sits inside an input
    is refused, and so is a folder holding prx-named files that no `_stage.json` accounts for."""
    check_paths(stage)
    for folder in stage.output_folders():
        _prepare_folder(stage, folder, chash)


def folder_role(stage: Stage, folder: str) -> dict[str, str]:
    """What `_stage.json` says a folder is beyond the stage: the primary output, or a secondary one (the
    filter's --write-rejected) and the run it belongs to."""
    return {} if folder == stage.cfg.out else {"role": "secondary", "primary": str(stage.cfg.out)}


def _prepare_folder(stage: Stage, folder: str, chash: str) -> None:
    previous = _own_stage_json(stage, folder)
    if previous is None:
        strays = _prx_named(folder)
        if strays:
            raise PrxError(
                f"{folder} holds {_listing(strays)} named like prx outputs but no _stage.json: prx did not write "
                "them (or their record is gone), so they are never deleted or written over, --overwrite or not. "
                "Use another --out, or move them away. Nothing was changed")
        return
    same = (previous.get("stage") == stage.name and previous.get("config_hash") == chash
            and all(previous.get(k) == folder_role(stage, folder).get(k) for k in ("role", "primary")))
    if same:
        _check_executor(stage, folder, previous)
        if folder == stage.cfg.out:
            redo_damaged(stage)
        return
    if not stage.cfg.overwrite and _holds_results(folder):
        raise PrxError(
            f"{folder} holds a run of stage {previous.get('stage')!r} with config hash {previous.get('config_hash')}"
            f"{_role_text(previous)}; this run's hash is {chash}. Use another --out, or --overwrite to replace it")
    remove_written(stage, folder, previous)


def _role_text(doc: dict) -> str:
    return f" (written beside {doc.get('primary')})" if doc.get("role") == "secondary" else ""


def _own_stage_json(stage: Stage, folder: str) -> dict | None:
    """The folder's _stage.json; an unparsable one is an error unless --overwrite replaces it ({} then)."""
    try:
        return read_stage_json(folder)
    except ledger.StageJsonError as exc:
        if stage.cfg.overwrite:
            return {}
        raise PrxError(f"{exc.path} {exc.problem}. It records which run wrote {folder}: use another "
                         "--out, or --overwrite to replace that folder's outputs") from None


def _check_executor(stage: Stage, folder: str, previous: dict) -> None:
    """A model stage resumes under the executor it started with: local and Dask runs differ in the last
    float bits (~2e-5 in encode latents), and one folder holds the results of one."""
    before = previous.get("executor")
    if stage.uses_model and before and before != stage.cfg.executor and _holds_results(folder):
        raise PrxError(f"{folder} was started with --executor {before}; resume it with --executor {before} "
                         f"(the executors' floating-point results differ slightly, and one folder holds one "
                         f"run's), or --overwrite to redo it with --executor {stage.cfg.executor}")


def canonical(path: str) -> "Place":
    """Where a path lands. Local paths (every spelling fsspec reads as local: `file:/x`, `file:///x`,
    `simplecache::file:///x`) by what the filesystem says: the device and inode of the deepest existing
    folder and of every folder above it, so symbolic links, `..` and bind mounts compare equal; URLs by
    protocol and normalised path."""
    path = str(path)
    local = fs.local_path(os.path.expanduser(path) if path.startswith("~") else path)
    if local is None:
        fsys, inner = fs.get_fs(path)
        proto = fsys.protocol[0] if isinstance(fsys.protocol, (tuple, list)) else fsys.protocol
        return Place(str(proto), posixpath.normpath("/" + inner.strip("/")))
    real = os.path.realpath(local)
    tail: list[str] = []
    probe = real
    while not os.path.exists(probe):
        probe, name = os.path.split(probe)
        tail.insert(0, name)
    ids = []
    while True:
        st = os.stat(probe)
        ids.append((st.st_dev, st.st_ino))
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return Place("file", real, tuple(ids), tuple(tail))


@dataclass(frozen=True)
class Place:
    proto: str
    path: str                               # real path (local) or normalised path (URL)
    ids: tuple[tuple[int, int], ...] = ()   # local: (device, inode) of the deepest existing folder, then above
    tail: tuple[str, ...] = ()              # local: the names below it that do not exist yet


def _within(a: Place, b: Place) -> str | None:
    """'the same as' or 'inside' when a is b or lies below it, else None."""
    if a.proto != b.proto:
        return None
    if a.proto != "file":
        if a.path == b.path:
            return "the same as"
        return "inside" if a.path.startswith(b.path.rstrip("/") + "/") else None
    if b.tail:  # b does not exist: only a path through the same missing names lies in it
        if a.ids[0] != b.ids[0] or a.tail[:len(b.tail)] != b.tail:
            return None
        return "the same as" if a.tail == b.tail else "inside"
    if b.ids[0] not in a.ids:
        return None
    return "the same as" if a.ids[0] == b.ids[0] and not a.tail else "inside"


def relation(a: Place, b: Place) -> str | None:
    """How path a stands to path b: 'the same as', 'inside', 'a folder holding', or None."""
    return _within(a, b) or ("a folder holding" if _within(b, a) else None)


def check_paths(stage: Stage) -> None:
    """Refuse, before touching anything, an output that is, holds or sits inside an input or another output,
    and a report path that names a file prx did not write."""
    reads = [p for p in stage.read_paths() if p and not str(p).startswith("hf:")]
    writes = [p for p in stage.output_folders() + stage.report_paths() if p]
    for w in writes:
        if "::" in str(w):
            raise PrxError(f"output {w}: write to a folder path or a plain URL (s3://..., file:///...), not a "
                             "chain of filesystems. Nothing was changed")
    check_no_overlap(writes, reads)
    for path in stage.report_paths():
        if path:
            check_report_path(path)


REPORT_MARK = '<meta name="generator" content="prx">'  # in every HTML page prx writes


def check_report_path(path: str) -> None:
    """A report may replace only a report: an existing file there must be a prx HTML page or a prx JSON report
    (an object with `captions` and `groups`, as the audit writes)."""
    if not fs.exists(path):
        return
    fsys, inner = fs.get_fs(path)
    if fsys.isdir(inner):
        raise PrxError(f"{path} is a folder; give a file path for the report. Nothing was changed")
    head = b""
    if fsys.size(inner) <= 256 << 20:
        with fs.open_file(path, "rb") as fh:
            head = fh.read()
    if REPORT_MARK.encode() in head[:4096] or _is_json_report(head):
        return
    raise PrxError(f"{path} exists and is not a report prx wrote; it is left as it is. Give another path, or "
                     "move that file away. Nothing was changed")


def _is_json_report(data: bytes) -> bool:
    if not data.lstrip().startswith(b"{"):
        return False
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and "captions" in doc and "groups" in doc


def check_no_overlap(writes: list[str], reads: list[str], allowed=lambda w, r: False) -> None:
    """No write path is, holds or sits inside a read path or another write path (`allowed(w, r)` exempts
    a pair, e.g. a pipeline stage's output that the next stage reads)."""
    places = {p: canonical(p) for p in [*writes, *reads]}
    for i, w in enumerate(writes):
        for other, role in [(r, "input") for r in reads] + [(o, "output") for o in writes[i + 1:]]:
            rel = relation(places[w], places[other])
            if rel is not None and not (role == "input" and rel == "the same as" and allowed(w, other)):
                raise PrxError(f"output {w} is {rel} {role} {other}; a run never writes where it reads (and "
                                 "--overwrite would delete it): choose an --out outside every input. "
                                 "Nothing was changed")


RUNNER_OWNED = ("[0-9]*.tar", "[0-9]*.parquet", "_stage.json", "_plan.json", "_map", ".*.tmp*")
SHARD_FILE = re.compile(r"^(\d+)\.(tar|parquet)$")


def _entries(folder: str) -> list[str]:
    fsys, root = fs.get_fs(folder)
    if not fsys.exists(root):
        return []
    names = (posixpath.basename(str(e).rstrip("/")) for e in fsys.ls(root, detail=False))
    return sorted(n for n in names if n not in (".", "..", LOCK_NAME))


def _prx_named(folder: str) -> list[str]:
    """Entries named like what the runner writes (shards, ledgers, _stage.json, _plan.json, _map)."""
    return [n for n in _entries(folder) if any(fnmatch.fnmatchcase(n, p) for p in RUNNER_OWNED[:-1])]


def _holds_results(folder: str) -> bool:
    """Whether a folder holds anything a run produced (a folder holding only the `_stage.json` of a start that
    failed before any work, and temporaries, holds nothing worth a refusal)."""
    return any(n != "_stage.json" and not fnmatch.fnmatchcase(n, ".*.tmp*") for n in _entries(folder))


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:20])
    return f"{len(names)} file(s) ({shown}{f' and {len(names) - 20} more' if len(names) > 20 else ''})"


def written_by(stage: Stage, folder: str, doc: dict) -> tuple[list[str], list[str]]:
    """(entries of the folder that the run recorded in `doc` wrote, entries it did not). A record without a
    `writes` list (or an unreadable one) is taken to cover every shard file and the stage's own extras."""
    writes = doc.get("writes") if isinstance(doc.get("writes"), dict) else None
    shards = set(writes.get("shards", [])) if writes else None
    extras = tuple(writes.get("extras", [])) if writes else tuple(stage.owned)
    mine, unknown = [], []
    for name in _entries(folder):
        m = SHARD_FILE.match(name)
        if m:
            ok = shards is None or int(m.group(1)) in shards
        else:
            ok = any(fnmatch.fnmatchcase(name, pat) for pat in RUNNER_OWNED + extras)
        (mine if ok else unknown).append(fs.join(folder, name))
    return mine, unknown


def discard_run(stage: Stage) -> None:
    """Remove what a stage's last run wrote in each of its folders (`prx-data run` redoing a stage)."""
    for folder in stage.output_folders():
        with exclusive(folder, f"prx-data {stage.name} (removing its outputs)"):
            try:
                doc = read_stage_json(folder) or {}
            except ledger.StageJsonError:
                doc = {}
            remove_written(stage, folder, doc)


def remove_written(stage: Stage, folder: str, doc: dict) -> None:
    """--overwrite: remove what the recorded run wrote; refuse a folder that also holds anything else."""
    mine, unknown = written_by(stage, folder, doc)
    if unknown:
        names = [posixpath.basename(u) for u in unknown]
        raise PrxError(f"--overwrite refused: {folder} holds {_listing(names)} the {doc.get('stage') or stage.name} "
                         "stage did not write (its _stage.json lists what it wrote); move them away or use another "
                         "--out. Nothing was changed")
    for path in mine:
        fs.remove(path)


def tar_problem(path: str, ledger_path: str) -> str | None:
    """Why a published tar is damaged (None when whole): its headers (data skipped by seeking) must hold
    exactly the keys its ledger (`ledger_path`, readable) kept, then the end-of-archive marker and nothing
    but zeros (`shards.shard_damage`)."""
    from contract.shards import shard_damage

    table = ledger.read(ledger_path)
    kept = [k for k, o in zip(table.column("key").to_pylist(), table.column("outcome").to_pylist())
            if o == ledger.KEPT]
    return shard_damage(path, kept)


def ledger_problem(path: str) -> str | None:
    try:
        ledger.read(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable ledger is redone
        return f"ledger unreadable ({type(exc).__name__}: {exc})"
    return None


def redo_damaged(stage: Stage) -> list[str]:
    """On resume, check every finished shard (tar + ledger) and scan partial; remove the damaged ones so this
    run redoes them, saying which on stderr. Returns the removed paths."""
    out = stage.cfg.out
    removed = []
    for tar_path in fs.glob(fs.join(out, "*.tar")):
        name = posixpath.basename(tar_path)
        if not name[:-4].isdigit():
            continue
        ledger_path = tar_path[:-4] + ".parquet"
        if not fs.exists(ledger_path):
            continue  # not finished: the runner redoes it anyway
        why = ledger_problem(ledger_path) or tar_problem(tar_path, ledger_path)
        if why:
            print(f"{stage.name}: {name} is damaged: {why}; redoing shard {name[:-4]}", file=sys.stderr)
            fs.remove(tar_path)   # the tar first: a tar that exists always has its ledger
            fs.remove(ledger_path)
            removed.append(tar_path)
    for part in fs.glob(fs.join(out, "_map", "*.parquet")):
        why = ledger_problem(part)
        if why:
            print(f"{stage.name}: scan partial {posixpath.basename(part)} is damaged: {why}; redoing it",
                  file=sys.stderr)
            fs.remove(part)
            removed.append(part)
            plan = fs.join(out, "_plan.json")
            if fs.exists(plan):
                fs.remove(plan)  # the plan is recomputed from the partials
    plan = fs.join(out, "_plan.json")
    if fs.exists(plan):
        try:
            json.loads(fs.read_bytes(plan))
        except ValueError:
            print(f"{stage.name}: _plan.json is damaged; recomputing it from the scan partials", file=sys.stderr)
            fs.remove(plan)
            removed.append(plan)
    return removed


def remove_stale_temporaries(out: str) -> None:
    """Half-written files of a killed run (their finished shards were never renamed into place). Called
    under the folder's lock: no other process is writing there."""
    for pattern in (".*.tmp*", "_map/.*.tmp*"):
        for path in fs.glob(fs.join(out, pattern)):
            fs.remove(path)


def input_hashes(folders: list[str]) -> dict[str, str]:
    """The config hash recorded in each input folder's `_stage.json` (folders without one are left out):
    `prx-data run` calls a stage stale when its input's hash is no longer the one it read."""
    out = {}
    for folder in folders:
        info = read_stage_json(folder) if folder and fs.exists(folder) else None
        if info and info.get("config_hash"):
            out[folder] = info["config_hash"]
    return out


def write_stage_json(stage: Stage, chash: str, info: dict[str, Any], folder: str | None = None,
                     shards: list[int] | None = None) -> None:
    """The record of a run in each folder it writes: what ran, on what, and which files it writes (--overwrite
    removes those and nothing else)."""
    folder = folder or stage.cfg.out
    doc = {
        "stage": stage.name,
        **folder_role(stage, folder),
        "inputs": stage.input_folders(),
        "input_hashes": input_hashes(stage.input_folders()),
        "config": to_dict(stage.cfg),
        "config_hash": chash,
        "provenance": stage.provenance(),
        "packages": package_versions(),
        "executor": getattr(stage.cfg, "executor", None),
        "writes": {"shards": sorted(shards if shards is not None else []), "extras": list(stage.owned)},
        **info,
    }
    fs.write_bytes_atomic(fs.join(folder, "_stage.json"), json.dumps(doc, indent=2, default=str).encode("utf-8"))


def _progress(stage: Stage, total: int, desc: str):
    return tqdm(total=total, desc=f"{stage.name} {desc}", unit="shard", disable=not stage.cfg.progress,
                file=sys.stderr, dynamic_ncols=True)


def _drive(executor, fn, stage: Stage, tasks: list[Task], desc: str, *args) -> list[TaskResult]:
    results = []
    start = time.perf_counter()
    samples = 0
    with _progress(stage, len(tasks), desc) as bar:
        for res in executor.map(fn, stage, tasks, *args):
            results.append(res)
            samples += res.rows
            bar.set_postfix(samples=samples, rate=f"{samples / max(time.perf_counter() - start, 1e-9):.1f}/s")
            bar.update(1)
    return results


def run_stage(stage: Stage) -> dict[str, Any]:
    """Run (or resume) one stage into cfg.out and return its summary. Every output folder is locked for the
    run: a second process on the same --out is refused, naming this one."""
    cfg = stage.cfg
    if not cfg.out:
        raise PrxError("--out is required")
    stage.validate()
    chash = config_hash(cfg, extra=stage.provenance())
    check_paths(stage)
    with contextlib.ExitStack() as locks:
        for folder in stage.output_folders():
            locks.enter_context(exclusive(folder, f"prx-data {stage.name} --out {cfg.out}"))
        prepare_output(stage, chash)
        for folder in stage.output_folders():
            remove_stale_temporaries(folder)
        return _run_locked(stage, chash)


def _run_locked(stage: Stage, chash: str) -> dict[str, Any]:
    cfg = stage.cfg
    previous = read_stage_json(cfg.out) or {}
    started = previous.get("started", _now())
    tasks = stage.plan()
    shards = [t.index for t in tasks]
    for folder in stage.output_folders():
        write_stage_json(stage, chash, {"status": "running", "started": started}, folder, shards)
    t0 = time.perf_counter()
    plan_hash, todo = _execute(stage, tasks)
    summary = summarize(cfg.out, shards)
    summary["seconds_this_run"] = round(time.perf_counter() - t0, 3)
    summary["shards_resumed"] = len(tasks) - len(todo)
    info = {"status": "complete", "started": started, "finished": _now(), "counts": summary}
    if plan_hash:
        info["plan_hash"] = plan_hash
    for folder in stage.output_folders():
        write_stage_json(stage, chash, info, folder, shards)
    return summary


def _execute(stage: Stage, tasks: list[Task]) -> tuple[str | None, list[Task]]:
    """Scan and reduce (global stages), then apply: each phase skips what is already done.
    Returns (the plan's hash or None, the tasks applied in this run)."""
    cfg = stage.cfg
    executor = None

    def get_executor():
        nonlocal executor
        if executor is None:
            executor = make_executor(cfg, stage.uses_model)
        return executor

    plan_hash = plan = None
    try:
        if isinstance(stage, GlobalStage):
            scan_todo = [t for t in tasks
                         if not fs.exists(fs.join(cfg.out, "_map", shard_name(t.index, "parquet")))]
            if scan_todo:
                _drive(get_executor(), run_scan, stage, scan_todo, "scan")
            plan_path = fs.join(cfg.out, "_plan.json")
            if not fs.exists(plan_path):
                partials = [fs.join(cfg.out, "_map", shard_name(t.index, "parquet")) for t in tasks]
                fs.write_bytes_atomic(plan_path, json.dumps(stage.reduce(partials), sort_keys=True).encode("utf-8"))
            data = fs.read_bytes(plan_path)
            plan, plan_hash = json.loads(data), _hash_file_bytes(data)
        todo = [t for t in tasks if not shard_done(cfg.out, t.index)]
        if todo:
            args = (plan,) if plan is not None else ()
            _drive(get_executor(), run_task, stage, todo, "apply" if plan is not None else "", *args)
    finally:
        if executor is not None:
            executor.close()
    return plan_hash, todo


def tar_member_bytes(path: str) -> tuple[int, dict[str, int]]:
    """(samples, bytes by member name) from a shard's tar headers."""
    samples: set[str] = set()
    by_member: Counter = Counter()
    with fs.open_file(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
        for info in tar:
            key, _, member = info.name.partition(".")
            samples.add(key)
            by_member[member] += info.size
    return len(samples), dict(by_member)


def _summary_read(read: Callable[[str], Any], path: str) -> Any:
    """A shard file read for the summary; damage that appeared after the run's checks is named, with the fix."""
    try:
        return read(path)
    except Exception as exc:  # noqa: BLE001 - any damage gets the same clear message
        raise PrxError(f"{path} is damaged ({type(exc).__name__}: {exc}); rerun the same command to redo "
                         "that shard") from None


def summarize(out: str, indices: list[int]) -> dict[str, Any]:
    """Counts by outcome and reason (from the ledgers) and bytes per sample by member (from the tars)."""
    outcomes: Counter = Counter()
    reasons: Counter = Counter()
    for i in indices:
        table = _summary_read(ledger.read, fs.join(out, shard_name(i, "parquet")))
        for outcome, reason in zip(table.column("outcome").to_pylist(), table.column("reason").to_pylist()):
            outcomes[outcome] += 1
            if reason:
                reasons[f"{outcome}:{reason}"] += 1
    samples, member_bytes = 0, Counter()
    for i in indices:
        n, by = _summary_read(tar_member_bytes, fs.join(out, shard_name(i)))
        samples += n
        member_bytes.update(by)
    return {
        "in": sum(outcomes.values()),
        "kept": outcomes.get(ledger.KEPT, 0),
        "rejected": outcomes.get(ledger.REJECTED, 0),
        "failed": outcomes.get(ledger.FAILED, 0),
        "reasons": dict(sorted(reasons.items())),
        "shards": len(indices),
        "samples_written": samples,
        "bytes_per_sample": {m: round(b / samples, 1) for m, b in sorted(member_bytes.items())} if samples else {},
    }


def format_summary(name: str, out: str, s: dict[str, Any]) -> str:
    lines = [f"{name}: {s['in']} in, {s['kept']} kept, {s['rejected']} rejected, {s['failed']} failed "
             f"in {s.get('seconds_this_run', 0):.1f}s ({s['shards']} shards, {s.get('shards_resumed', 0)} resumed)"]
    for reason, n in s["reasons"].items():
        lines.append(f"  {reason:<40} {n}")
    if s["bytes_per_sample"]:
        lines.append("  bytes per sample: " + ", ".join(f"{m} {b:,.0f}" for m, b in s["bytes_per_sample"].items()))
    lines.append(f"  output: {out}")
    return "\n".join(lines)
