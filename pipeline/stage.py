"""What a stage is: a config dataclass plus a pure function over one shard.

`Stage`     plans tasks (one per output shard) and processes one task into a ShardWriter.
`MapStage`  the usual case, input shard N -> output shard N: read samples, prepare each (CPU work, one batch
            ahead in `prefetch_threads` threads or `prepare_processes` processes: pipeline/prepare_pool.py),
            handle a batch, write kept samples (members the stage does not own copied byte for byte) and one
            ledger row each (with `write_behind`, in a writer thread while the next batch runs).
`GlobalStage` a MapStage that first needs a view of every shard: scan (per shard, a parquet of partial
            results) -> reduce (one plan, hashed into `_stage.json`) -> apply (per shard).
The runner (`pipeline.runner`) decides where and when tasks run; stages never see executors.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import pyarrow as pa

from contract import ledger
from contract.config import CommonConfig
from contract.errors import PrxError
from contract.ledger import read_stage_json
from pipeline.prepare_pool import Pool, process_pool, thread_pool
from contract.shards import (MemberCaps, Problem, Sample, ShardWriter, dumps_json, list_shards, read_shard,
                             shard_index)


@dataclass
class Task:
    index: int                      # output shard number
    inputs: list[str]               # input shard path(s) or stage-specific input items
    max_samples: int | None = None  # --limit quota for this shard
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    """What a stage decided for one sample."""

    sample: Sample
    row: ledger.Row
    members: dict[str, bytes] = field(default_factory=dict)  # new or replaced members (own members only)
    drop_members: tuple[str, ...] = ()                        # members this stage removes (e.g. --drop-images)

    @property
    def kept(self) -> bool:
        return self.row.outcome == ledger.KEPT


def keep(sample: Sample, meta: dict | None = None, members: dict[str, bytes] | None = None,
         scores: dict[str, float] | None = None, detail: str = "", drop: tuple[str, ...] = ()) -> Result:
    new = dict(members or {})
    if meta is not None:
        new["json"] = dumps_json(meta)
    return Result(sample, ledger.row(sample.key, sample_input_id(sample), "", detail, scores=scores or {}), new, drop)


def reject(sample: Sample, reason: str, detail: str = "", scores: dict[str, float] | None = None) -> Result:
    return Result(sample, ledger.row(sample.key, sample_input_id(sample), reason, detail, scores=scores or {}))


def sample_input_id(sample: Sample) -> str:
    """The original input id (URL, path or source member) travels in json; fall back to shard:key."""
    try:
        return str(sample.meta().get("input_id") or sample.input_id)
    except Exception:  # noqa: BLE001 - a bad json member is reported elsewhere
        return sample.input_id


class Stage:
    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    config_cls: ClassVar[type] = CommonConfig
    uses_model: ClassVar[bool] = False  # model tasks ask for the GPU resource where workers have one
    # names (fnmatch patterns) of the top-level entries of --out this stage writes beyond the runner's own
    # (NNNNNN.tar/.parquet, _stage.json, _map/, _plan.json): --overwrite removes these and nothing else
    owned: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg):
        self.cfg = cfg

    # --- what _stage.json records beyond the config
    def input_folders(self) -> list[str]:
        return [self.cfg.input] if self.cfg.input else []

    def read_paths(self) -> list[str]:
        """Every folder or file this run reads: no output may be one of them, inside one, or around one."""
        return self.input_folders()

    def output_folders(self) -> list[str]:
        """Every folder this run writes into."""
        return [self.cfg.out] if self.cfg.out else []

    def report_paths(self) -> list[str]:
        """Single files this run writes outside its folders (the audit's --json, --html)."""
        return []

    def provenance(self) -> dict[str, Any]:
        """Model ids and revisions, prompt hashes...: hashed with the config."""
        return {}

    def validate(self) -> None:
        """Raise PrxError before any work if the config cannot work."""

    # --- work
    def plan(self) -> list[Task]:
        raise NotImplementedError

    def process(self, task: Task, writer: ShardWriter) -> None:
        raise NotImplementedError


def kept_counts(folder: str) -> dict[int, int]:
    """Samples per shard of a folder, from its ledgers (kept rows); empty when it has no ledgers."""
    table = ledger.read_folder(folder)
    counts: dict[int, int] = {}
    for shard, outcome in zip(table.column("shard").to_pylist(), table.column("outcome").to_pylist()):
        if outcome == ledger.KEPT:
            counts[shard] = counts.get(shard, 0) + 1
    return counts


class MapStage(Stage):
    """Input shard N -> output shard N."""

    batch_size: int = 64
    prefetch_threads: int = 0  # > 0: prepare() runs in this many threads one batch ahead, so the model never waits
    prepare_processes: int = 0  # > 0: ... in this many processes instead (each its own GIL; pipeline/prepare_pool.py)
    write_behind: bool = False  # True: a writer thread writes batch N while batch N+1 is processed

    def plan(self) -> list[Task]:
        if not self.cfg.input:
            raise PrxError("--in is required")
        shards = list_shards(self.cfg.input)
        if not shards:
            raise PrxError(f"no NNNNNN.tar shards in {self.cfg.input}")
        tasks = [Task(shard_index(p), [p]) for p in shards]
        if self.cfg.limit is not None:
            counts = kept_counts(self.cfg.input)
            left, limited = self.cfg.limit, []
            for t in tasks:
                if left <= 0:
                    break
                n = counts.get(t.index, left)
                t.max_samples = min(n, left)
                left -= t.max_samples
                limited.append(t)
            tasks = limited
        return tasks

    def samples(self, task: Task) -> Iterator[Sample | Problem]:
        n = 0
        for item in read_shard(task.inputs[0], MemberCaps.from_config(self.cfg)):
            if task.max_samples is not None and n >= task.max_samples:
                return
            n += 1
            yield item

    def process(self, task: Task, writer: ShardWriter) -> None:
        """Each batch's rows and kept samples written in order; with `write_behind`, by a writer thread while
        the next batch is processed (its file writes release the GIL)."""
        if not self.write_behind:
            for problems, results in self.batches(task):
                self._write_batch(problems, results, writer)
            return
        with ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-write") as wpool:
            pending: Future | None = None
            for problems, results in self.batches(task):
                if pending is not None:
                    pending.result()
                pending = wpool.submit(self._write_batch, problems, results, writer)
            if pending is not None:
                pending.result()

    def _write_batch(self, problems: list[Problem], results: list[Result], writer: ShardWriter) -> None:
        for p in problems:
            writer.add_row(p.row())
        self._write(results, writer)

    # --- per batch: prepare each sample (CPU work; in threads or processes one batch ahead), then process it
    def prepare(self, sample: Sample) -> Any:
        """Per-sample CPU work (decode, crop) that can run in a thread or a process (then from `self.cfg` alone)
        while the previous batch runs."""
        return None

    def process_prepared(self, samples: list[Sample], task: Task, prepared: list[Any]) -> list[Result]:
        """One Result per sample, in order; prepared[i] = prepare(samples[i])."""
        return self.process_batch(samples, task)

    def process_batch(self, samples: list[Sample], task: Task) -> list[Result]:
        """One Result per sample, in order (for stages that do not prepare)."""
        raise NotImplementedError

    def batches(self, task: Task) -> Iterator[tuple[list[Problem], list[Result]]]:
        """(Problems read, Results) per batch of `batch_size` samples. With prefetch threads or prepare
        processes, batch N+1's prepare() calls are submitted before batch N is processed."""
        pool = self._prepare_pool()
        ahead: list[Future] = []
        try:
            pending = None
            for problems, samples in self._read_batches(task):
                if pool is None:
                    yield self._finish(problems, samples, None, task)
                    continue
                ahead = pool.submit(self, samples)
                if pending is not None:
                    yield self._finish(*pending, task)
                pending = (problems, samples, ahead)
            if pending is not None:
                yield self._finish(*pending, task)
        finally:
            if pool is not None:
                pool.done_with_shard(ahead)

    def _prepare_pool(self) -> Pool | None:
        if self.prepare_processes > 0:
            return process_pool(type(self), self.cfg, self.prepare_processes)
        if self.prefetch_threads > 0:
            return thread_pool(self.name, self.prefetch_threads)
        return None

    def _read_batches(self, task: Task) -> Iterator[tuple[list[Problem], list[Sample]]]:
        problems: list[Problem] = []
        samples: list[Sample] = []
        for item in self.samples(task):
            (problems if isinstance(item, Problem) else samples).append(item)
            if len(samples) >= self.batch_size:
                yield problems, samples
                problems, samples = [], []
        if problems or samples:
            yield problems, samples

    def _finish(self, problems: list[Problem], samples: list[Sample], ahead: list[Future] | None,
                task: Task) -> tuple[list[Problem], list[Result]]:
        if not samples:
            return problems, []
        return problems, self._timed(samples, task, ahead)

    def _timed(self, batch: list[Sample], task: Task, ahead: list[Future] | None = None) -> list[Result]:
        """Adds this batch's seconds per sample (waiting on its prepare threads or processes included) to each
        row, on top of any time a stage already put there (the filter's scan)."""
        start = time.perf_counter()
        prepared = Pool.results(ahead) if ahead is not None else [self.prepare(s) for s in batch]
        results = self.process_prepared(batch, task, prepared)
        if len(results) != len(batch):
            raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} samples")
        per = (time.perf_counter() - start) / max(len(batch), 1)
        for r in results:
            r.row.seconds += per
        return results

    @staticmethod
    def _write(results: list[Result], writer: ShardWriter) -> None:
        for r in results:
            if r.kept:
                members = {k: v for k, v in r.sample.members.items() if k not in r.drop_members}
                members.update(r.members)
                writer.write(r.sample.key, members)
            writer.add_row(r.row)


class GlobalStage(MapStage):
    """scan -> reduce -> apply. `scan` returns a table per shard; `reduce` turns them into a plan."""

    def scan(self, task: Task) -> pa.Table:
        raise NotImplementedError

    def reduce(self, partial_paths: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def set_plan(self, plan: dict[str, Any]) -> None:
        self.plan_data = plan

