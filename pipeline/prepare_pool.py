"""Where a MapStage's per-sample `prepare()` runs while the worker's own thread drives the model.

- threads (`prefetch_threads`, the default): decode and resize release the GIL, so they overlap; whatever
  `prepare` does in Python (caption cleaning's regexes, json) still holds the one GIL the worker's model loop
  needs, and so bounds one worker's rate;
- processes (`--prepare-processes N`): `prepare` runs in N spawned processes, each with its own GIL and its
  own copy of the stage (built from the same config), kept for the worker's life and reused across shards.
  Samples go out and prepared items come back pickled by multiprocessing between this worker and its own
  children (no file is unpickled). A Dask worker started as a daemonic process cannot have children: prx's
  own local cluster starts its workers non-daemonic when a stage asks for processes; for a cluster given by
  address, start its workers with the Dask config `distributed.worker.daemon: False`.

Work goes out in chunks (a batch split in about 2N pieces), so the pickling and queueing cost per sample
stays small; the prepared items come back in the batch's order. Processes pay where `prepare` holds the GIL
(encode: caption cleaning and tokenisation), not where its result is large (recaption: images at the VLM's
pixel budget, pickled back): BENCHMARKS.md, host-path ceilings.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from contract.config import option
from contract.errors import PrxError


def prepare_processes_option():
    """The `--prepare-processes` option of a stage with a `prepare()` (one definition for every stage)."""
    return option(0, runtime=True, minimum=0,
                  help="processes that run the per-sample CPU work (decode, crop, caption cleaning and, for "
                       "encode, tokenisation) instead of threads of the worker: each has its own GIL, so the "
                       "worker's model loop is left only the batch work; 0 = threads (--decode-threads)")


class Pool:
    """Submits a batch's prepare() calls and hands back their results in order."""

    def __init__(self, executor: Executor, chunk: int, owned: bool):
        self.executor, self.chunk, self.owned = executor, chunk, owned

    def submit(self, stage, samples: list) -> list[Future]:
        """Futures whose results, concatenated, are `[stage.prepare(s) for s in samples]` (in a process, by
        its own copy of the stage)."""
        if isinstance(self.executor, ThreadPoolExecutor):
            return [self.executor.submit(_prepare_many, stage, [s]) for s in samples]
        size = max(1, -(-len(samples) // self.chunk))
        return [self.executor.submit(_prepare_in_child, samples[i:i + size]) for i in range(0, len(samples), size)]

    @staticmethod
    def results(futures: list[Future]) -> list[Any]:
        """The prepared items, in order; a process that died (killed, out of memory, a crash in a decoder) is
        one clear error: the shard stays unfinished, and the next call starts a fresh pool."""
        try:
            return [x for f in futures for x in f.result()]
        except BrokenProcessPool:
            raise PrxError("a --prepare-processes process died (killed, out of memory, or a crash in a decoder); "
                           "this shard is left unfinished: run the same command again to resume, or use "
                           "--prepare-processes 0") from None

    def done_with_shard(self, futures: list[Future]) -> None:
        """After a shard: a thread pool closes; a process pool stays for the next shard, its queued work cancelled."""
        for f in futures:
            f.cancel()
        if self.owned:
            self.executor.shutdown(cancel_futures=True)


def _prepare_many(stage, samples: list) -> list:
    return [stage.prepare(s) for s in samples]


_POOL: dict[str, Any] = {"key": None, "executor": None}


def thread_pool(name: str, threads: int) -> Pool:
    return Pool(ThreadPoolExecutor(threads, thread_name_prefix=f"{name}-prepare"), 1, owned=True)


def process_pool(stage_cls: type, cfg: Any, processes: int) -> Pool:
    """This worker's pool of `processes` spawned processes for this stage and config: started once, reused for
    every shard; another stage or config replaces it."""
    if multiprocessing.current_process().daemon:
        raise PrxError("--prepare-processes: this worker is a daemonic process (a Dask worker started with "
                       "distributed.worker.daemon: True), which cannot start processes; start the cluster's "
                       "workers with the Dask config distributed.worker.daemon: False, or use "
                       "--prepare-processes 0 (threads)")
    key = (stage_cls.__module__, stage_cls.__qualname__, processes, repr(cfg))
    if _POOL["key"] != key or getattr(_POOL["executor"], "_broken", False):
        if _POOL["executor"] is not None:
            _POOL["executor"].shutdown(cancel_futures=True)
        _POOL["executor"] = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_start_child, initargs=(stage_cls, cfg))
        _POOL["key"] = key
    return Pool(_POOL["executor"], 2 * processes, owned=False)


_CHILD: dict[str, Any] = {}


def _start_child(stage_cls: type, cfg: Any) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle; its pool then stops us
    _exit_with_parent()
    _CHILD["stage"] = stage_cls(cfg)


def _exit_with_parent(every: float = 0.5) -> None:
    """A worker killed without closing its pool (a Dask nanny's terminate, SIGKILL) leaves its children waiting
    on a queue they hold both ends of: each one watches for its parent to go and then exits."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(0)

    threading.Thread(target=watch, name="prx-parent-watch", daemon=True).start()


def _prepare_in_child(samples: list) -> list:
    return _prepare_many(_CHILD["stage"], samples)
