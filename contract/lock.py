"""One writer per folder: an exclusive lock a stage (or `prx-train`) holds on its output while it runs.

On this machine's disks the lock is `fcntl.flock` on `FOLDER/.prx.lock`: the kernel releases it when its
process dies, so a lock left by a killed run is stale by construction and taken over, with a note. The file
holds the holder's pid, host and start time, which a refused process prints. Network filesystems honour
flock only where their client does (NFSv4 and Lustre do; check yours). Object stores (s3://, gs://) have no
atomic create-if-absent here: the lock is a `.prx.lock` object written after checking that none exists, so
two processes starting within the same second can both pass; one left by a dead holder on another host is
reported with the command to remove it.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import sys
from typing import Iterator

from contract import fs
from contract.errors import PrxError

LOCK_NAME = ".prx.lock"


class LockHeld(PrxError):
    """Another process holds the folder's lock; the message names it."""


def _holder(what: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _describe(doc: dict) -> str:
    return (f"{doc.get('what', 'a prx process')} (pid {doc.get('pid', '?')} on {doc.get('host', '?')}, "
            f"started {doc.get('started', '?')})")


def _parse(data: bytes) -> dict:
    try:
        doc = json.loads(data.decode("utf-8", "replace") or "{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _refusal(folder: str, doc: dict) -> LockHeld:
    return LockHeld(f"{folder} is in use by {_describe(doc)}; one process writes a folder at a time. Wait for "
                    "it to finish, or stop it, then rerun")


@contextlib.contextmanager
def exclusive(folder: str, what: str) -> Iterator[None]:
    """Hold FOLDER's lock for the block (the folder is created). Raises LockHeld naming the holder."""
    fs.makedirs(folder)
    local = fs.local_path(folder)
    if local is not None:
        with _local_lock(os.path.join(local, LOCK_NAME), folder, what):
            yield
    else:
        with _object_lock(fs.join(folder, LOCK_NAME), folder, what):
            yield


@contextlib.contextmanager
def _local_lock(path: str, folder: str, what: str) -> Iterator[None]:
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            with open(path, "rb") as fh:
                raise _refusal(folder, _parse(fh.read(4096))) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and our lock: take the new one
    try:
        stale = _parse(os.pread(fd, 4096, 0))
        if stale.get("pid"):
            print(f"note: took over the lock on {folder} left by {_describe(stale)}, which is no longer running",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(what)).encode("utf-8"), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def _object_lock(path: str, folder: str, what: str) -> Iterator[None]:
    if fs.exists(path):
        doc = _parse(fs.read_bytes(path))
        raise LockHeld(f"{folder} is locked by {_describe(doc)}. If that process is no longer running, remove "
                       f"the lock ({path}) and rerun")
    fs.write_bytes_atomic(path, json.dumps(_holder(what)).encode("utf-8"))
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            fs.remove(path)
