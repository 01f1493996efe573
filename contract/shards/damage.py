"""A damaged tar, seen: what follows the point where a walk over a tar's headers ended (`_Tail`: zeros, or an
unreadable region), `truncated_tar` rows for the keys whose headers a scan finds in such a region
(`_unreadable`), and `shard_damage`, which checks a finished shard against its ledger."""
from __future__ import annotations

import itertools
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from contract import fs
from contract.shards.layout import _split_name
from contract.shards.localfile import _ShardFile
from contract.shards.sample import Problem
from contract.shards.tarheaders import _ZERO_BLOCK, _compressed


def shard_damage(path: str, kept: list[str]) -> str | None:
    """Why a finished shard does not hold what its ledger kept (None when it does). Its headers are walked by
    `tarfile` over a seekable file (member data skipped: cheap on object stores too); they must hold exactly
    the `kept` keys, each once with its members together, then the end-of-archive marker and nothing but zeros
    (a zeroed or broken header mid-archive ends the walk early, with data after it)."""
    try:
        with fs.open_file(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            keys = [k for k, _ in itertools.groupby(info.name.partition(".")[0] for info in tar)]
            tail = _Tail(tar.offset)
            fh.seek(tar.offset)
            while chunk := fh.read(TAIL_CHUNK):
                tail.feed(chunk)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        return f"tar unreadable ({exc})"
    if not tail.clean:
        return tail.damage()
    if tail.size < 1024:
        return f"tar truncated: no end-of-archive marker after its last member (byte {tail.at:,})"
    if sorted(keys) != sorted(kept):
        missing, extra = sorted(set(kept) - set(keys)), sorted(set(keys) - set(kept))
        return (f"the tar holds {len(keys)} samples, its ledger kept {len(kept)}"
                + (f"; {len(missing)} kept key(s) missing from the tar (first {missing[0]})" if missing else "")
                + (f"; {len(extra)} key(s) the ledger does not keep (first {extra[0]})" if extra else "")
                + ("; a key's members are apart" if len(set(keys)) < len(keys) else ""))
    return None


TAIL_CHUNK = 1 << 20   # the region after a tar's last header is checked (and scanned) this many bytes at a time
_LONG_NAME_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK)


@dataclass
class _Tail:
    """What follows the point where a walk over a tar's headers ended quietly (byte `at`): the zero blocks of
    the end-of-archive marker and zero padding, in a whole tar. A zeroed header mid-archive (tarfile reads it
    as the marker) or one failing its checks ends the walk the same way: then the bytes after it are not all
    zeros, and the region from `at` on is unreadable. `marker`: it starts with two zero blocks (data after a
    finished archive: two tars concatenated, say), not a damaged header; `names`: the regular-file members
    whose ustar headers a scan of the region's 512-byte blocks found."""

    at: int
    size: int = 0
    clean: bool = True
    marker: bool = False
    names: list[str] = field(default_factory=list)
    _head: bytes = b""      # the region's first 1,024 bytes
    _skip: int = 0          # region offset up to which a found member's data runs: not scanned for headers
    _long: bool = False     # the last header found gives the next one's long name (pax, GNU): that name is not it

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the region (chunks of a multiple of 512 bytes, but the last)."""
        pos, self.size = self.size, self.size + len(chunk)
        if pos < 1024:
            self._head += chunk[:1024 - pos]
            self.marker = self._head == _ZERO_BLOCK * 2
        if self.clean and chunk == bytes(len(chunk)):
            return
        self.clean = False
        self._headers(chunk, pos)

    def _headers(self, chunk: bytes, pos: int) -> None:
        start = max(self._skip - pos, 0)
        while (hit := chunk.find(b"ustar", start + 257)) >= 0:
            block = hit - 257
            start = block - block % 512 + 512
            if block % 512 or block + 512 > len(chunk):
                continue
            try:
                info = tarfile.TarInfo.frombuf(chunk[block:block + 512], tarfile.ENCODING, "surrogateescape")
            except tarfile.HeaderError:
                continue
            self._skip = pos + block + 512 + -(-max(info.size, 0) // 512) * 512
            if info.isreg() and not self._long:
                self.names.append(info.name)
            self._long = info.type in _LONG_NAME_TYPES
            start = max(self._skip - pos, start)

    def damage(self) -> str:
        what = ("data follows its end-of-archive marker" if self.marker else
                "a header there is zeros or fails its checks, and what follows is not all zeros")
        return f"the tar is unreadable from byte {self.at:,} to its end ({self.size:,} bytes): {what}"


def _file_tail(file: _ShardFile, at: int) -> _Tail:
    tail = _Tail(at)
    while at < file.size:
        n = min(TAIL_CHUNK, file.size - at)
        chunk = file.data[at:at + n] if file.data is not None else os.pread(file.fd, n, at)
        if not chunk:
            break
        tail.feed(chunk)
        at += len(chunk)
    return tail


def _stream_tail(tar: tarfile.TarFile, block: bytes) -> _Tail:
    """The rest of a streamed tar, from the header block that ended its walk (read already: `block`)."""
    tail = _Tail(tar.offset)
    chunk = block + tar.fileobj.read(TAIL_CHUNK - len(block))
    while chunk:
        tail.feed(chunk)
        chunk = tar.fileobj.read(TAIL_CHUNK)
    return tail


def _url_tail(path: str) -> _Tail:
    """A streamed tar whose first header cannot be read, from its start: nothing when it is compressed or a
    local file that is not a regular one (read once already)."""
    tail, local = _Tail(0), fs.local_path(path)
    if local is not None and not os.path.isfile(local):
        return tail
    try:
        with fs.open_file(path, "rb") as fh:
            chunk = fh.read(TAIL_CHUNK)
            while chunk and not (tail.size == 0 and _compressed(chunk[:10])):
                tail.feed(chunk)
                chunk = fh.read(TAIL_CHUNK)
    except OSError:
        pass
    return tail


def _block_keeping_info() -> type:
    """A TarInfo class (one per walk) that keeps the last header block tarfile parsed: after a quiet end, the
    block that ended it (a streamed tar cannot read it again)."""

    class Info(tarfile.TarInfo):
        block = b""

        @classmethod
        def frombuf(cls, buf, encoding, errors):
            cls.block = buf
            return super().frombuf(buf, encoding, errors)

    return Info


def _unreadable(tail: _Tail, base: str, seen: set[str], named: bool) -> Iterator[Problem]:
    """`truncated_tar` rows for an unreadable region: one per key whose header the scan found there (keys
    with a row already left out), or, when that gives none and no row named the damage yet (`named`: a sample
    cut, a tar that cannot be opened), one for the region."""
    rows = 0
    for name in tail.names:
        split = _split_name(name)
        if split is None or split[0] in seen:
            continue
        seen.add(split[0])
        rows += 1
        yield Problem(split[0], f"{base}:{split[0]}", "truncated_tar", f"{tail.damage()}; member {name} lies in it")
    if not rows and not named and not tail.clean:
        yield Problem("", base, "truncated_tar", f"{tail.damage()}; no member header found in it")
