"""The stages of prx-data and their one registry, STAGES: `prx-data`'s commands and `prx-data run` read it.

A stage is a module `pipeline/stages/NAME.py` that defines STAGE (a `pipeline.stage.Stage` subclass whose
`name` is NAME; a report such as audit has none) and may define `add_commands(subparsers)` for commands that
belong with it (e.g. download-report). Its line here gives its name and its rank in a run: a manifest lists
shard stages by increasing rank (one of each rank at most; stages of the same rank are alternatives; the
last rank's stage may repeat side by side, pipeline/run.py FAN_OUT) and starts with the lowest; a REPORT may come anywhere after the first stage.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

REPORT = None   # the rank of a stage that writes a report, not shards


@dataclass(frozen=True)
class Entry:
    name: str          # the module pipeline/stages/NAME.py, its command `prx-data NAME`, its manifest key
    rank: int | None   # its position in a run (same rank: either one); REPORT: anywhere after the first

    def load(self) -> ModuleType:
        return importlib.import_module(f"pipeline.stages.{self.name}")


STAGES = (
    Entry("ingest", 0),
    Entry("download", 0),
    Entry("filter", 1),
    Entry("recaption", 2),
    Entry("encode", 3),
    Entry("audit", REPORT),
)
