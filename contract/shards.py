"""One shard writer and one safe shard reader for the whole project (ARCHITECTURE.md, Shards).

Writer: POSIX tar in webdataset layout (`{key}.{member}`), members of a sample in sorted order, mtime,
uid and gid 0, so a rerun over the same input is byte-identical; written under a temporary name and
renamed when complete; the shard's ledger parquet is renamed into place *before* the tar, so a tar
that exists always has its ledger.

Reader: never decodes anything by itself. webdataset's automatic decoders are deliberately not used:
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
rows for the keys whose headers a scan finds in it (`_Tail`). `shard_damage` checks a finished shard against
its ledger. docs/reader.md has the checks, caps and reason codes.
"""
from __future__ import annotations

import errno
import io
import itertools
import json
import math
import os
import posixpath
import re
import shutil
import stat
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from contract import fs, ledger
from contract.images import IMAGE_EXTS, ImageRejected, decode_image

SHARD_DIGITS = 6


def shard_name(index: int, ext: str = "tar") -> str:
    return f"{index:0{SHARD_DIGITS}d}.{ext}"


def shard_index(path: str) -> int:
    m = re.fullmatch(r"(\d+)\.tar", posixpath.basename(str(path)))
    if not m:
        raise ValueError(f"not a shard name: {path}")
    return int(m.group(1))


def list_shards(folder: str) -> list[str]:
    """The `NNNNNN.tar` shards of a folder, in order."""
    return [p for p in fs.glob(fs.join(folder, "*.tar")) if re.fullmatch(r"\d+\.tar", posixpath.basename(p))]


def dumps_json(meta: dict) -> bytes:
    """Deterministic JSON bytes (insertion order kept, no whitespace variance)."""
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------- writer
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
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
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


def shard_done(out_dir: str, index: int) -> bool:
    """A shard is complete when its tar exists (its ledger is always renamed first)."""
    return fs.exists(fs.join(out_dir, shard_name(index))) and fs.exists(fs.join(out_dir, shard_name(index, "parquet")))


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


# ---------------------------------------------------------------------------------------------- reader
class BadMember(Exception):
    """A known member that does not parse; `reason` is `bad_member`."""

    reason = "bad_member"


# JSON members and sidecars: parsed only within these caps (env PRX_JSON_MAX_BYTES / PRX_JSON_MAX_DEPTH).
JSON_MAX_BYTES = int(os.environ.get("PRX_JSON_MAX_BYTES", 1 << 20))
JSON_MAX_DEPTH = int(os.environ.get("PRX_JSON_MAX_DEPTH", 64))
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800-\udfff: half of a pair, or a lone one


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: Infinity by another spelling
        raise ValueError(f"{text} is out of the float range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)  # json.loads: one a call


def _loads(text: str) -> Any:
    """json.loads(text) refusing NaN, Infinity and out-of-range numbers, with one decoder for the process."""
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _DECODER.decode(text)


def json_depth(data: bytes) -> int:
    """Deepest nesting of [ and { outside strings (without parsing, so a 100,000-deep file costs O(n))."""
    import numpy as np

    body = np.frombuffer(_JSON_STRING.sub(b'""', bytes(data)), dtype=np.uint8)
    step = (np.isin(body, (ord("["), ord("{"))).astype(np.int32) - np.isin(body, (ord("]"), ord("}"))))
    return int(np.cumsum(step).max()) if step.size else 0


def parse_json(data: bytes, what: str = "json", max_bytes: int | None = None, max_depth: int | None = None) -> dict:
    """A JSON object from bytes, or BadMember: over `max_bytes`, nested deeper than `max_depth`, not UTF-8,
    not JSON, NaN/Infinity or a number beyond the float range (which no JSON writer here may emit), not an
    object, or holding a lone surrogate escape (`"\\ud800"`: a str that cannot be written back as UTF-8)."""
    max_bytes = JSON_MAX_BYTES if max_bytes is None else max_bytes
    max_depth = JSON_MAX_DEPTH if max_depth is None else max_depth
    if len(data) > max_bytes:
        raise BadMember(f"{what}: {len(data):,} bytes, over the {max_bytes:,}-byte JSON cap (PRX_JSON_MAX_BYTES)")
    bound = data.count(b"[") + data.count(b"{")  # depth can be no more than this: the exact count only if needed
    depth = json_depth(data) if bound > max_depth else 0
    if depth > max_depth:
        raise BadMember(f"{what}: nested {depth} deep, over the JSON depth cap {max_depth} (PRX_JSON_MAX_DEPTH)")
    try:
        value = _loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadMember(f"{what}: {exc}") from None
    if not isinstance(value, dict):
        raise BadMember(f"{what}: expected an object, got {type(value).__name__}")
    if _SURROGATE_ESCAPE.search(data) and not _utf8_text(value):
        raise BadMember(f"{what}: a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair): not text "
                        "that UTF-8 can hold")
    return value


def _utf8_text(value: Any) -> bool:
    """Whether every string of a parsed JSON value (keys too) encodes as UTF-8: `json` decodes a lone surrogate
    escape ("\\ud800") to a str that no UTF-8 writer (dumps_json, the ledger) can store."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# Per-member size caps (bytes, as declared in the member's tar header), checked before a member is read.
MIB = 1 << 20


@dataclass(frozen=True)
class MemberCaps:
    """The largest member of each kind the reader accepts; a sample with a bigger one becomes one
    `member_too_large` Problem and that member is never read (nor handed out, in a shard read whole). Kinds go by the member's last extension:
    image (`jpg`, `png`, ... IMAGE_EXTS), json, text (`txt`, `caption_long.txt`), tensors (`safetensors`),
    other (anything else: copied byte for byte by the stages)."""

    image: int = 64 * MIB
    json: int = JSON_MAX_BYTES
    text: int = 1 * MIB
    tensors: int = 1024 * MIB
    other: int = 64 * MIB

    def __post_init__(self):
        for kind in ("image", "json", "text", "tensors", "other"):
            value = getattr(self, kind)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"member cap {kind} must be a positive number of bytes, got {value!r}")

    @staticmethod
    def kind(member: str) -> str:
        ext = member.rsplit(".", 1)[-1].lower()
        if ext in IMAGE_EXTS:
            return "image"
        return {"json": "json", "txt": "text", "safetensors": "tensors"}.get(ext, "other")

    def refusal(self, member: str, size: int) -> str | None:
        """Why a member of `size` bytes is refused (the ledger detail), or None if it is within its cap."""
        kind = self.kind(member)
        cap = getattr(self, kind)
        if size > cap:
            return (f"member {member}: {size:,} bytes, over the {cap:,}-byte {kind} cap "
                    f"(--max-member-bytes-{kind})")
        return None

    @classmethod
    def from_config(cls, cfg: Any) -> "MemberCaps":
        """The caps a stage config asks for (its `max_member_bytes_*` options; defaults where it has none)."""
        default = cls()
        return cls(**{k: getattr(cfg, f"max_member_bytes_{k}", None) or getattr(default, k)
                      for k in ("image", "json", "text", "tensors", "other")})


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


# safetensors: the format's dtype names; a member is parsed in place (tensors view one buffer).
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
              "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
              "C64": "complex64"}


def _tensor_entry(name: str, info: Any, what: str) -> tuple[Any, list[int], int, int]:
    """(torch dtype, shape, begin, end) of one header entry, or BadMember."""
    import torch

    ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
          and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
          and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                  for x in info["shape"] + info["data_offsets"]))
    if not ok:
        raise BadMember(f"{what}: tensor {name!r}: header entry is not {{dtype, shape, data_offsets}}")
    dtype = getattr(torch, _ST_DTYPES.get(info["dtype"], ""), None)
    if dtype is None:
        raise BadMember(f"{what}: tensor {name!r}: unsupported dtype {info['dtype']!r}")
    begin, end = info["data_offsets"]
    return dtype, info["shape"], begin, end


def load_safetensors(buf: bytearray, what: str = "safetensors") -> dict:
    """name -> tensor of a safetensors blob, checked as the safetensors library checks it (header length,
    JSON object, dtypes, contiguous offsets that cover the data exactly), or BadMember. The tensors are
    views of `buf` (no copy) unless a tensor's data is misaligned for its dtype."""
    import torch

    if sys.byteorder != "little":  # the views below assume the format's byte order
        from safetensors.torch import load
        return load(bytes(buf))
    n = int.from_bytes(buf[:8], "little") if len(buf) >= 8 else -1
    if n < 0 or n > SAFETENSORS_MAX_HEADER or 8 + n > len(buf) or buf[8:9] != b"{":
        raise BadMember(f"{what}: not a safetensors blob (header length {n}, {len(buf)} bytes)")
    try:
        header = _loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadMember(f"{what}: header: {exc}") from None
    if not isinstance(header, dict):
        raise BadMember(f"{what}: header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadMember(f"{what}: __metadata__ is not a mapping of strings")
    entries = sorted(((name, *_tensor_entry(name, info, what)) for name, info in header.items()),
                     key=lambda e: (e[3], e[4]))
    done, base = 0, 8 + n
    for name, dtype, shape, begin, end in entries:
        if begin != done or end - begin != math.prod(shape) * dtype.itemsize:
            raise BadMember(f"{what}: tensor {name!r}: data offsets [{begin}, {end}] do not fit its dtype and "
                            f"shape {shape}, or leave a gap or overlap")
        done = end
    if base + done != len(buf):
        raise BadMember(f"{what}: the header covers {done:,} bytes of data, the member has {len(buf) - base:,}")
    return {name: _view(buf, base + begin, math.prod(shape), dtype, shape)
            for name, dtype, shape, begin, end in entries}


def _view(buf: bytearray, offset: int, numel: int, dtype, shape: list[int]):
    import torch

    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if offset % dtype.itemsize:  # misaligned for its dtype: copy rather than view
        return torch.frombuffer(bytearray(buf[offset:offset + numel * dtype.itemsize]), dtype=dtype).reshape(shape)
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset).reshape(shape)


@dataclass
class Sample:
    """A sample's raw member bytes (a mapping name -> bytes; lazy `Members` when read from a local
    shard). Decoding happens only through the methods below."""

    key: str
    members: Mapping[str, bytes]
    shard: str = ""

    @property
    def input_id(self) -> str:
        return f"{posixpath.basename(self.shard)}:{self.key}" if self.shard else self.key

    @property
    def image_member(self) -> str | None:
        for name in sorted(self.members):
            if name.lower() in IMAGE_EXTS:
                return name
        return None

    def meta(self) -> dict[str, Any]:
        if "json" not in self.members:
            return {}
        return parse_json(self.members["json"], "json")

    def text(self, name: str = "txt") -> str | None:
        data = self.members.get(name)
        return None if data is None else data.decode("utf-8", errors="replace")

    def image(self, max_pixels: int | None = None):
        """(RGB PIL image, ImageInfo); raises ImageRejected (missing_image, decode_error, ...)."""
        name = self.image_member
        if name is None:
            raise ImageRejected("missing_image", f"members: {', '.join(sorted(self.members))}")
        kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
        return decode_image(self.members[name], **kwargs)

    def tensors(self, name: str, expect: dict[str, tuple[Any, int]] | None = None) -> dict:
        """Load a safetensors member (tensors view one buffer read straight from the shard); `expect` maps
        tensor name -> (torch dtype, ndim) to validate."""
        if name not in self.members:
            raise BadMember(f"{name}: missing")
        members = self.members
        buf = members.buffer(name) if isinstance(members, Members) else bytearray(members[name])
        tensors = load_safetensors(buf, name)
        for tname, (dtype, ndim) in (expect or {}).items():
            t = tensors.get(tname)
            if t is None:
                raise BadMember(f"{name}: tensor {tname!r} missing")
            if t.dtype != dtype or t.ndim != ndim:
                raise BadMember(f"{name}: tensor {tname!r} is {t.dtype} with {t.ndim} dims, "
                                f"expected {dtype} with {ndim}")
        return tensors


@dataclass
class Problem:
    """Something in a shard that could not become a sample; one ledger row."""

    key: str
    input_id: str
    reason: str
    detail: str = ""

    def row(self) -> ledger.Row:
        return ledger.row(self.key, self.input_id, self.reason, self.detail)


def _split_name(name: str) -> tuple[str, str] | None:
    """`abc.caption_long.txt` -> ("abc", "caption_long.txt"); None if unsafe."""
    if not name or name.startswith("/") or "/" in name or "\\" in name or name in (".", ".."):
        return None
    key, dot, member = name.partition(".")
    if not key or not dot or not member:
        return None
    return key, member


# tarfile's own test for a compressed stream (mode r|* decompresses these; they have no member offsets)
def _compressed(head: bytes) -> bool:
    return (head.startswith((b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ"))
            or (head[0:3] == b"BZh" and head[4:10] == b"1AY&SY"))


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


_Header = tuple  # (name, size, offset of its data): a plain regular-file header, as `_plain_headers` returns it


_OCTAL = re.compile(rb" *[0-7]* *(?:\0|$)")  # a numeric header field tarfile reads as plain octal
_NUMERIC_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337), (337, 345))
# The same fields as Python's tarfile, GNU tar and webdataset write them (zero-padded octal, NUL-terminated;
# the checksum "NNNNNN\0 "; device numbers empty or zero): a shortcut past the per-field check, which they pass
_USUAL_FIELDS = re.compile(rb"[0-7]{7}\0[0-7]{7}\0[0-7]{7}\0[0-7]{11}\0[0-7]{11}\0[0-7]{6}\0 ")
_USUAL_DEVICES = re.compile(rb"(?:\0{8}|[0-7]{7}\0){2}")


def _octal_fields(block: bytes) -> tuple[int, int] | None:
    """(size, checksum) of a header whose numeric fields are all plain octal, else None (tarfile decides)."""
    if _USUAL_FIELDS.fullmatch(block, 100, 156) and _USUAL_DEVICES.fullmatch(block, 329, 345):
        return int(block[124:135], 8), int(block[148:154], 8)
    values = []
    for start, end in _NUMERIC_FIELDS:
        if not _OCTAL.match(block, start, end):  # base-256, signs, garbage
            return None
        values.append(int(block[start:end].split(b"\0", 1)[0].strip() or b"0", 8))
    return values[3], values[5]


def _checksums_match(blocks: list[bytes], checksums: list[int]) -> bool:
    """Every header's stored checksum is the unsigned sum of its bytes with the checksum field as spaces."""
    if not blocks:
        return True
    b = np.frombuffer(b"".join(blocks), dtype=np.uint8).reshape(len(blocks), 512)
    sums = b.sum(axis=1, dtype=np.int64) - b[:, 148:156].sum(axis=1, dtype=np.int64) + 256
    return bool(np.array_equal(sums, np.asarray(checksums, dtype=np.int64)))


def _plain_headers(file: _ShardFile) -> list[_Header] | None:
    """The headers of a shard made only of plain regular files (what ShardWriter and most webdataset
    writers produce), parsed quickly; None when anything else shows up (pax or GNU headers, links, folders,
    prefixes, base-256 numbers, a bad checksum, truncation, trailing garbage), and then `tarfile` walks the
    shard instead. What this accepts, tarfile reads the same (tests/test_reader.py). Headers in the usual
    format take `_usual_headers`; a shard with any other header takes `_checked_headers`."""
    file.read_whole()
    usual = _usual_headers(file)
    return usual if usual is not None else _checked_headers(file)


_ZERO_BLOCK = bytes(512)
# The usual format, byte by byte over a header's numeric fields (offsets 100-155): octal digits, NUL
# terminators at 107, 115, 123, 135, 147, 154, and the space that ends the checksum at 155.
_USUAL_NUL = np.array([107, 115, 123, 135, 147, 154])
_USUAL_DIGIT = np.setdiff1d(np.arange(100, 155), _USUAL_NUL)
_OCTAL_WEIGHTS = 8 ** np.arange(5, -1, -1, dtype=np.int64)    # the checksum's 6 digits


def _header_block(file: _ShardFile, offset: int) -> bytes:
    return file.data[offset:offset + 512] if file.data is not None else os.pread(file.fd, 512, offset)


def _usual_headers(file: _ShardFile) -> list[_Header] | None:
    """`_checked_headers` for a shard read whole whose headers all match `_USUAL_FIELDS` and
    `_USUAL_DEVICES`: the headers are followed from the first by their size fields (one `int` each, no
    check yet), then every check is made for all of them at once in numpy (fields, type, devices, checksums,
    names). None when any header is not in that format or fails a check: `_checked_headers` then decides,
    header by header, exactly as before. (A size field that `int` accepts but the usual format does not, with
    a space or a sign, fails the field check: its header is one of those followed.)"""
    data, size = file.data, file.size
    if data is None or size < 512:
        return None
    chain, sizes, offset = [], [], 0
    while size - offset >= 512:   # a whole header left (tarfile ends quietly on a short one after the first)
        if not data[offset]:
            if offset and data[offset:offset + 512] == _ZERO_BLOCK:  # a zero block ends the archive
                break
            return None
        try:
            member = int(data[offset + 124:offset + 135], 8)
        except ValueError:
            return None
        chain.append(offset // 512)
        sizes.append(member)
        offset += 512 + -(-member // 512) * 512
        if member and offset > size:  # the member runs past the end
            return None
    if not chain:
        return None
    h = np.frombuffer(data, dtype=np.uint8, count=size // 512 * 512).reshape(-1, 512)[chain]
    names = _usual_names(h)
    if names is None or not _usual_fields(h):
        return None
    return list(zip(names, sizes, [c * 512 + 512 for c in chain]))


def _usual_fields(h: np.ndarray) -> bool:
    """Every header (rows of `h`) in the usual format, a regular file, with a matching checksum."""
    digits = h[:, _USUAL_DIGIT] - 48   # uint8: anything below "0" wraps above 7
    if not ((digits <= 7).all() and not h[:, _USUAL_NUL].any() and (h[:, 155] == 32).all()):
        return False
    devices = h[:, 329:345].reshape(-1, 2, 8)
    dev_ok = ~devices.any(axis=2) | (((devices[:, :, :7] - 48) <= 7).all(axis=2) & (devices[:, :, 7] == 0))
    kind = h[:, 156]
    if not (dev_ok.all() and ((kind == 48) | (kind == 0)).all() and not h[:, 345].any()):
        return False
    stored = digits[:, -6:].astype(np.int64) @ _OCTAL_WEIGHTS   # the checksum's digits, 148-153
    sums = h.sum(axis=1, dtype=np.int64) - h[:, 148:156].sum(axis=1, dtype=np.int64) + 256
    return bool(np.array_equal(sums, stored))


def _usual_names(h: np.ndarray) -> list[str] | None:
    """Each header's name (its first 100 bytes up to the first NUL, decoded as tarfile does); None when a
    name has bytes after its NUL or ends with "/" (the checked pass decides those)."""
    field = h[:, :100]
    nul = field == 0
    length = np.where(nul.any(axis=1), nul.argmax(axis=1), 100)
    if not np.array_equal(np.count_nonzero(field, axis=1), length):   # a byte after the first NUL
        return None
    raw = field.copy().view("S100").ravel().tolist()   # numpy drops the trailing NULs
    names = b"\0".join(raw).decode(tarfile.ENCODING, "surrogateescape").split("\0")
    if len(names) != len(raw) or any(n.endswith("/") for n in names):
        return None
    return names


def _checked_headers(file: _ShardFile) -> list[_Header] | None:
    """`_plain_headers` header by header: each header's fields checked on their own (any octal spelling
    tarfile reads as plain octal), the checksums compared in one numpy pass at the end."""
    out, offset, size = [], 0, file.size
    blocks, checksums = [], []
    while True:
        if offset and size - offset < 512:  # tarfile ends quietly on a missing or short header (not at 0)
            break
        block = _header_block(file, offset)
        if len(block) < 512 or block[156:157] not in (b"0", b"\0") or block[345] or not block[0]:
            if offset and block == bytes(512):  # a zero block ends the archive
                break
            return None
        fields = _octal_fields(block)
        if fields is None:
            return None
        member_size, data = fields[0], offset + 512
        blocks.append(block)
        checksums.append(fields[1])
        name = block[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
        offset = data + -(-member_size // 512) * 512
        if name.endswith("/") or (member_size and size < offset):
            return None
        out.append((name, member_size, data))
    return out if _checksums_match(blocks, checksums) else None


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


# ------------------------------------------------------------------------------------------- after the headers
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


def _plain_end(headers: list[_Header]) -> int:
    """Where the headers of `_plain_headers` end: after the last member's data, padded to a block."""
    _, size, data = headers[-1]
    return data + -(-size // 512) * 512


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
