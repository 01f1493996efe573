"""The one safe shard reader (ARCHITECTURE.md, "Reading safely"): `read_shard`.

It never decodes anything by itself. webdataset's automatic decoders are deliberately not used:
they unpickle `.pyd`/`.pickle` members and `torch.load` `.pth` ones. `tarfile` walks the headers (every
check it makes: checksums, pax and GNU long names, truncation); a plain local shard is walked in one
pass over its 512-byte headers, seeking over the data, and a sample's members are read from the file
only when asked (`Members`); a local shard up to WHOLE_SHARD (16 MiB: text, json and small images) is
read whole once instead, and its headers and members are sliced from memory. Other shards (s3://...,
compressed) stream through `tarfile`. Every member
is size-checked against its kind's cap (`MemberCaps`) before it is read, sparse members are refused,
and hostile structure (path-like names, duplicates, links, truncation) becomes a `Problem` with a
ledger reason; reading goes on where it can. When the headers end, anything but zeros after them (a zeroed
or broken header mid-archive, which `tarfile` takes for the end) is an unreadable region: `truncated_tar`
rows for the keys whose headers a scan finds in it (`_Tail`). docs/reader.md has the checks, caps and reason codes.
"""
from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from typing import Any, Callable, Iterator

from contract import fs
from contract.shards.caps import MemberCaps
from contract.shards.damage import _block_keeping_info, _file_tail, _stream_tail, _Tail, _unreadable, _url_tail
from contract.shards.layout import _split_name
from contract.shards.localfile import _HeaderReader, _ShardFile, Members
from contract.shards.sample import Problem, Sample
from contract.shards.tarheaders import _compressed, _plain_end, _plain_headers


def _indexable(path: str) -> _ShardFile | None:
    """The opened shard when it is a plain local uncompressed file (read by offsets), else None (stream)."""
    local = fs.local_path(path)
    if local is None or not os.path.isfile(local):
        return None
    file = _ShardFile(local)
    if not stat.S_ISREG(os.fstat(file.fd).st_mode) or _compressed(os.pread(file.fd, 10, 0)):
        return None
    return file


def read_shard(path: str, caps: MemberCaps | None = None) -> Iterator[Sample | Problem]:
    """Yield the samples of one tar shard, and a Problem for everything that is not a clean sample.
    Each member is checked against `caps` (default `MemberCaps()`) before it is read."""
    caps = caps or MemberCaps()
    base = posixpath.basename(str(path))
    try:
        file = _indexable(path)
        plain = _plain_headers(file) if file is not None else None
        fh = None if plain is not None else _HeaderReader(file) if file is not None else fs.open_file(path, "rb")
    except Exception as exc:  # noqa: BLE001
        yield Problem("", base, "read_error", f"{type(exc).__name__}: {exc}")
        return
    try:
        if plain is not None:
            yield from _walk(plain, str(path), base, caps, file, None, lambda: _file_tail(file, _plain_end(plain)))
            return
        info = _block_keeping_info()
        try:
            tar = tarfile.open(fileobj=fh, mode="r|*" if file is None else "r:", tarinfo=info)
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield Problem("", base, "truncated_tar", f"cannot open tar: {exc}")
            yield from _unreadable(_file_tail(file, 0) if file is not None else _url_tail(path), base, set(), True)
            return
        end = (lambda: _file_tail(file, tar.offset)) if file is not None else (lambda: _stream_tail(tar, info.block))
        yield from _walk(tar, str(path), base, caps, file, tar, end)
    finally:
        if file is None:
            fh.close()
        else:  # samples kept after the reader moved on (a shuffle buffer) read by pread, not pinning the shard
            file.data = None


def _refusal(name: str, size: int, sparse: bool, member: str, caps: MemberCaps) -> tuple[str, str] | None:
    """(reason, detail) for a member refused before reading: sparse (never expanded) or over its cap."""
    if sparse:
        return "sparse_member", f"member {name}: sparse tar member declaring {size:,} bytes (not expanded)"
    detail = caps.refusal(member, size)
    return ("member_too_large", detail) if detail else None


def _walk(headers, path: str, base: str, caps: MemberCaps, file: _ShardFile | None,
          tar: tarfile.TarFile | None, end: Callable[[], "_Tail"]) -> Iterator[Sample | Problem]:
    """The samples of a tar's headers (a TarFile's TarInfos, or `_plain_headers`' tuples): members in file
    order, grouped by key. With `file` (a local shard) members are indexed (offset, size) and read later through
    `Members`; without, they are read now from the streaming `tar`. When the headers end, `end()` says what
    follows them (a `_Tail`): anything but zeros there is an unreadable region (`_unreadable`)."""
    seen_keys: set[str] = set()
    floor = min(caps.image, caps.json, caps.text, caps.tensors, caps.other)   # within every cap: not refused
    key: str | None = None
    entries: dict[str, Any] = {}
    refused: tuple[str, str] | None = None   # first member refused before reading
    duplicate: str | None = None             # last member name repeated within the sample

    def finish() -> Sample | Problem:
        input_id = f"{base}:{key}"
        if key in seen_keys:
            return Problem(key, input_id, "duplicate_member",
                           "key repeated non-consecutively in the shard; first occurrence kept")
        seen_keys.add(key)
        if refused or duplicate:
            return Problem(key, input_id, *(refused or ("duplicate_member", duplicate)))
        return Sample(key, entries if file is None else Members(file, entries), path)

    plain = tar is None   # `_plain_headers`: (name, size, data offset) of regular files
    try:
        for info in headers:
            name, size = (info[0], info[1]) if plain else (info.name, info.size)
            split = _split_name(name)
            if split is None:
                yield Problem("", f"{base}:{name}", "unsafe_member_name", name)
                continue
            if not plain and info.isdir():
                continue
            k, member = split
            if not plain and not info.isfile():
                yield Problem(k, f"{base}:{name}", "not_a_regular_file", f"tar type {info.type!r}")
                continue
            if k != key:
                if key is not None:
                    yield finish()
                key, entries, refused, duplicate = k, {}, None, None
            sparse = not plain and info.issparse()
            why = _refusal(name, size, sparse, member, caps) if size > floor or sparse else None
            if why:
                refused = refused or why
                continue
            value = (info[2], size) if plain else _member(tar, info) if file is None else _located(info)
            if member in entries:
                duplicate = f"member {name} appears twice"
                continue
            entries[member] = value
        tail = end()
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        yield Problem(key or "", f"{base}:{key}" if key is not None else base, "truncated_tar", f"{exc}")
        return
    # a damaged header right after the sample read last may have been one of its own: a row, not a sample
    cut = key is not None and not (tail.clean or tail.marker) and key not in seen_keys
    if key is not None:
        yield Problem(key, f"{base}:{key}", "truncated_tar", f"{tail.damage()}; {key} was read last before it "
                      "and may be missing members") if cut else finish()
        seen_keys.add(key)
    if not tail.clean:
        yield from _unreadable(tail, base, seen_keys, cut)


def _member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    """A member's bytes, read now (streaming)."""
    data = tar.extractfile(info).read()
    if len(data) != info.size:
        raise EOFError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
    return data


def _located(info: tarfile.TarInfo) -> tuple[int, int]:
    """Where a member's bytes are (read later). tarfile checks that they are all in the file when it moves
    on to the next header, before the sample is yielded."""
    if info.size < 0:  # what reading it in streaming mode reports
        raise EOFError(f"member {info.name} truncated (0 of {info.size} bytes)")
    return info.offset_data, info.size
