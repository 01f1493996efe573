"""The one shard writer (ARCHITECTURE.md, "Reading safely").

POSIX tar in webdataset layout (`{key}.{member}`), members of a sample in sorted order, mtime, uid and gid 0,
so a rerun over the same input is byte-identical; written under a temporary name and renamed when complete;
the shard's ledger parquet is renamed into place *before* the tar, so a tar that exists always has its ledger.
A full disk becomes `OutOfSpace`, which says how much more space the run needs.
"""
from __future__ import annotations

import errno
import io
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field

from contract import fs, ledger
from contract.shards.layout import shard_done, shard_name

COPY_BUFSIZE = 64 << 20   # bytes tarfile moves per read/write when it copies a member in


@dataclass
class ShardStats:
    samples: int = 0
    bytes_by_member: dict[str, int] = field(default_factory=dict)
    rows: list = field(default_factory=list)


class ShardWriter:
    """Collects one output shard and its ledger rows; `close()` publishes both atomically."""

    def __init__(self, out_dir: str, index: int, stage: str):
        self.out_dir, self.index, self.stage = out_dir, index, stage
        self.tar_path = fs.join(out_dir, shard_name(index))
        self.ledger_path = fs.join(out_dir, shard_name(index, "parquet"))
        tmp_dir = fs.local_tmp_dir_for(self.tar_path)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{shard_name(index)}.", suffix=".tmp", dir=tmp_dir)
        self._fh = os.fdopen(fd, "wb")
        # one read and one write per member (tarfile copies in 16 KiB pieces by default: ~75 writes per MB)
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT, copybufsize=COPY_BUFSIZE)
        self._keys: set[str] = set()
        self.stats = ShardStats()

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample. `members` maps member names (`jpg`, `json`, `caption_long.txt`) to bytes."""
        if key in self._keys:
            raise ValueError(f"key {key} written twice to shard {self.index}")
        if not key or "/" in key or "." in key:
            raise ValueError(f"invalid sample key {key!r}")
        self._keys.add(key)
        try:
            for name in sorted(members):
                data = members[name]
                if not isinstance(data, (bytes, bytearray)):
                    raise TypeError(f"member {name} of {key} must be bytes, got {type(data).__name__}")
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                self._tar.addfile(info, io.BytesIO(data))
                self.stats.bytes_by_member[name] = self.stats.bytes_by_member.get(name, 0) + len(data)
        except OSError as exc:
            self._raise_if_full(exc)
            raise
        self.stats.samples += 1

    def add_row(self, row: ledger.Row) -> None:
        self.stats.rows.append(row)

    def close(self) -> ShardStats:
        try:
            self._tar.close()
            self._fh.close()
            ledger.write(self.ledger_path, self.stats.rows, self.index, self.stage)
            fs.put_file_atomic(self._tmp, self.tar_path)
        except OSError as exc:
            self._raise_if_full(exc)
            raise
        return self.stats

    def abort(self) -> None:
        """Drop the shard (after an error): its temporary is removed; nothing is raised, whatever the error was
        (a full disk fails the flush of a close too)."""
        try:
            self._fh.close()
        except OSError:
            pass
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)

    def _raise_if_full(self, exc: OSError) -> None:
        """A full disk (ENOSPC) while writing becomes OutOfSpace, naming this shard's folder."""
        if exc.errno == errno.ENOSPC and not isinstance(exc, OutOfSpace):
            try:
                written = os.path.getsize(self._tmp)
            except OSError:
                written = 0
            raise OutOfSpace(self.out_dir, os.path.dirname(self._tmp), self.index, written) from exc


class OutOfSpace(OSError):
    """The disk filled (ENOSPC) while shard `index` of `folder` was written. `staging`: the local folder its
    temporary was in (the folder itself, for local outputs); `written`: the bytes that temporary held then.
    Finished shards stay; a rerun of the same command resumes. `describe()` says how much more space the run
    needs, about."""

    def __init__(self, folder: str, staging: str, index: int, written: int):
        super().__init__(errno.ENOSPC, "No space left on device")
        self.folder, self.staging, self.index, self.written = folder, staging, index, written

    def __reduce__(self):  # picklable across Dask workers
        return type(self), (self.folder, self.staging, self.index, self.written)

    def describe(self) -> str:
        """One line: where, about how much more space is needed (and how that is reckoned), what to do."""
        per, left, averaged = _shard_bytes(self.folder, self.written)
        free = shutil.disk_usage(self.staging).free if os.path.isdir(self.staging) else 0
        need = max(per * left - free, per)
        where = self.folder if fs.local_path(self.folder) else f"{self.folder} (staged in {self.staging})"
        each = (f"about {_mb(per)} each, the finished shards' average" if averaged else
                f"at least {_mb(per)} each, what shard {self.index} held when the disk filled")
        return (f"no space left on device writing {where} ({left} shard(s) to go, {each}; {_mb(free)} free); "
                f"free space (about {_mb(need)} more needed) and rerun the same command to resume")


def disk_full(exc: OSError, out: str | None) -> str:
    """The one line for a full disk: a shard writer's says where and about how much more space is needed."""
    if isinstance(exc, OutOfSpace):
        return exc.describe()
    where = exc.filename or out or "the output folder"
    return f"no space left on device writing {where}; free space and rerun the same command to resume"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _shard_bytes(folder: str, written: int) -> tuple[float, int, bool]:
    """(bytes a shard of `folder` takes, shards not finished, whether the first is an average): the average of
    up to 100 finished shards (tar and ledger), or else `written`, what the unfinished shard held when the disk
    filled (a lower bound). The shards planned are those its `_stage.json` lists."""
    try:
        planned = ((ledger.read_stage_json(folder) or {}).get("writes") or {}).get("shards") or []
    except ledger.StageJsonError:
        planned = []
    try:
        done = [i for i in planned if shard_done(folder, i)]
        sizes = [fs.size(fs.join(folder, shard_name(i))) + fs.size(fs.join(folder, shard_name(i, "parquet")))
                 for i in done[-100:]]
    except OSError:   # the folder changed meanwhile: the lower bound, then
        done, sizes = [], []
    left = max(len(planned) - len(done), 1)
    if sizes:
        return sum(sizes) / len(sizes), left, True
    return float(written), left, False
