"""A local shard opened once (`_ShardFile`: pread, or one read of the whole file when it is small), the file
object `tarfile` walks its headers through (`_HeaderReader`), and a sample's members read from it when asked
(`Members`)."""
from __future__ import annotations

import os
import tarfile
from typing import Mapping


WHOLE_SHARD = 16 << 20   # a local shard up to this size is read whole, once (_ShardFile.read_whole)


class _ShardFile:
    """A local shard opened once and shared by every sample read from it: members are read with
    `os.pread`, and the descriptor closes when the last sample (and the reader) let go of it, so samples
    kept in a shuffle buffer after the reader moved on still read correctly."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.size = os.fstat(self.fd).st_size
        self.data: bytes | None = None   # the whole file, when it is small (read_whole)

    def read_whole(self) -> None:
        """Hold a shard of at most WHOLE_SHARD bytes in memory: its headers and members are then sliced from
        one read instead of a pread each (text-only shards: ~3 MB for 1000 samples). `read_shard` lets go of
        it when its walk ends: samples still held then read their members by pread."""
        if self.size <= WHOLE_SHARD:
            data = os.pread(self.fd, self.size, 0)
            self.data = data if len(data) == self.size else None

    def read(self, offset: int, size: int, name: str = "") -> bytes:
        whole = self.data   # once: read_shard may let go of it meanwhile (a decode thread reading a sample)
        if whole is not None:
            data = whole[offset:offset + size]
        elif size >= 1 << 30:  # one pread returns at most ~2 GiB on Linux: fill a buffer in steps
            return bytes(self.read_into(bytearray(size), offset, name))
        else:
            data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.path}: member {name} short read ({len(data)} of {size} bytes): "
                          "the shard changed while it was being read")
        return data

    def read_into(self, buf: bytearray, offset: int, name: str = "") -> bytearray:
        whole = self.data
        if whole is not None and offset + len(buf) <= len(whole):
            buf[:] = memoryview(whole)[offset:offset + len(buf)]
            return buf
        view, done = memoryview(buf), 0
        while done < len(buf):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: member {name} short read ({done} of {len(buf)} bytes): "
                              "the shard changed while it was being read")
            done += got
        return buf

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None


class _HeaderReader:
    """The file object `tarfile` walks a local shard's headers through (mode `r:`): reads never ask for
    more than the file holds (Python would allocate a pax header's declared 8 GiB up front) and, as in
    streaming mode, never go backwards (a negative size would otherwise loop over the same header)."""

    def __init__(self, file: _ShardFile):
        self._file, self._pos = file, 0

    def read(self, n: int = -1) -> bytes:
        left = max(0, self._file.size - self._pos)
        data = os.pread(self._file.fd, left if n is None or n < 0 else min(n, left), self._pos)
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise tarfile.StreamError("only absolute seeks are used")
        if pos < self._pos:
            raise tarfile.StreamError("seeking backwards is not allowed")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos


class Members(Mapping):
    """A sample's members, name -> bytes, read from the shard when asked (each access reads again; nothing
    is cached, so members a consumer never touches are never read, unless the shard is small enough to be
    read whole). Pickles as a plain dict."""

    __slots__ = ("_file", "_index")

    def __init__(self, file: _ShardFile, index: dict[str, tuple[int, int]]):
        self._file, self._index = file, index  # name -> (offset of the data in the shard, size)

    def __getitem__(self, name: str) -> bytes:
        offset, size = self._index[name]
        return self._file.read(offset, size, name)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def get(self, name: str, default=None):
        where = self._index.get(name)
        return default if where is None else self._file.read(where[0], where[1], name)

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def size(self, name: str) -> int:
        return self._index[name][1]

    def buffer(self, name: str) -> bytearray:
        """The member's bytes in a new writable buffer (one copy from the file: tensors can view it)."""
        offset, size = self._index[name]
        return self._file.read_into(bytearray(size), offset, name)

    def __reduce__(self):
        return dict, (dict(self),)

    def __repr__(self) -> str:
        return f"Members({self._file.path!r}, {sorted(self._index)})"
