"""Paths are local or fsspec URLs (s3://, gs://, memory://). These helpers keep that one decision here."""
from __future__ import annotations

import os
import posixpath
import uuid
from typing import Iterator

import fsspec
from fsspec.core import url_to_fs


def get_fs(path: str):
    """(filesystem, path inside it) for a local path or URL."""
    return url_to_fs(str(path))


def local_path(path: str) -> str | None:
    """The path on this machine's disk, or None for a remote URL. Every spelling fsspec reads as a local file
    counts: `file:/x`, `file:///x`, `local://x`, and caches chained over one (`simplecache::file:///x`)."""
    fs, inner = get_fs(path)
    while True:
        if "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
            return inner
        target = getattr(fs, "fs", None)  # caches (simplecache::, ...) wrap the filesystem they read from
        if target is None or target is fs:
            return None
        fs = target


def is_local(path: str) -> bool:
    return local_path(path) is not None


def join(base: str, *parts: str) -> str:
    base = str(base)
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def _with_protocol(fs, path: str, like: str) -> str:
    """fsspec listings drop the protocol; put it back so results can be passed on as URLs."""
    if "://" in str(like) and "://" not in path:
        return fs.unstrip_protocol(path)
    return path


def open_file(path: str, mode: str = "rb"):
    return fsspec.open(str(path), mode).open()


def read_bytes(path: str) -> bytes:
    fs, p = get_fs(path)
    return fs.cat_file(p)


def read_parquet(source, columns: list[str] | None = None):
    """A parquet table from a path, a file object or bytes, read without Arrow's thread pools: after reading
    tables with them, pyarrow (26.0) aborts the process at exit about half the time ("terminate called without
    an active exception", exit 134), after the work is done. Ledgers and partial states are small: one thread
    reads them as fast. One file through `ParquetFile` (`read_table` builds a dataset and imports pandas: 5x
    the time for a 1000-row ledger)."""
    import io

    import pyarrow.parquet as pq

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    if isinstance(source, str):
        with open_file(source, "rb") as fh:
            return pq.ParquetFile(fh, pre_buffer=False).read(columns=columns, use_threads=False)
    return pq.ParquetFile(source, pre_buffer=False).read(columns=columns, use_threads=False)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name beside the target, then rename: a killed run leaves no half file."""
    fs, p = get_fs(path)
    parent = posixpath.dirname(p) if "://" in str(path) else os.path.dirname(p)
    tmp = join(parent, f".{posixpath.basename(p)}.tmp-{uuid.uuid4().hex[:8]}")
    fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(tmp, data)
    fs.mv(tmp, p)


def put_file_atomic(local_src: str, path: str) -> None:
    """Move a finished local temporary file to `path` (local rename, or upload then rename)."""
    fs, p = get_fs(path)
    if is_local(path):
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
        os.replace(local_src, p)
        return
    parent = posixpath.dirname(p)
    tmp = posixpath.join(parent, f".{posixpath.basename(p)}.tmp-{uuid.uuid4().hex[:8]}")
    fs.put_file(local_src, tmp)
    fs.mv(tmp, p)
    os.unlink(local_src)


def exists(path: str) -> bool:
    fs, p = get_fs(path)
    return fs.exists(p)


def makedirs(path: str) -> None:
    fs, p = get_fs(path)
    fs.makedirs(p, exist_ok=True)


def glob(pattern: str) -> list[str]:
    fs, p = get_fs(pattern)
    return sorted(_with_protocol(fs, m, pattern) for m in fs.glob(p))


def walk_files(root: str) -> Iterator[str]:
    """Every file below root, sorted, hidden files and folders skipped."""
    fs, p = get_fs(root)
    for dirpath, dirnames, filenames in sorted(fs.walk(p)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(part.startswith(".") for part in dirpath[len(p):].split("/") if part):
            continue
        for name in sorted(filenames):
            if not name.startswith("."):
                yield _with_protocol(fs, posixpath.join(dirpath, name) if "://" in str(root)
                                     else os.path.join(dirpath, name), root)


def remove(path: str) -> None:
    fs, p = get_fs(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def size(path: str) -> int:
    fs, p = get_fs(path)
    return int(fs.size(p))


def local_tmp_dir_for(path: str) -> str:
    """Where to stage a file before it is renamed into `path` (same filesystem when local)."""
    if is_local(path):
        d = os.path.dirname(get_fs(path)[1]) or "."
        os.makedirs(d, exist_ok=True)
        return d
    import tempfile

    return tempfile.gettempdir()
