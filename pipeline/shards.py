"""One shard writer and one safe shard reader for the whole project (ARCHITECTURE.md, Shards).

Writer: POSIX tar in webdataset layout (`{key}.{member}`), members of a sample in sorted order, mtime,
uid and gid 0, so a rerun over the same input is byte-identical; written under a temporary name and
renamed when complete; the shard's ledger parquet is renamed into place *before* the tar, so a tar
that exists always has its ledger.

Reader: reads raw bytes with `tarfile` in streaming mode and never decodes anything by itself.
webdataset's automatic decoders are deliberately not used: they unpickle `.pyd`/`.pickle` members and
`torch.load` `.pth` ones. Hostile structure (path-like names, duplicates, links, truncation) becomes a
`Problem` with a ledger reason; reading goes on where it can.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline import fs, ledger
from pipeline.images import IMAGE_EXTS, ImageRejected, decode_image

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
        self.stats.samples += 1

    def add_row(self, row: ledger.Row) -> None:
        self.stats.rows.append(row)

    def close(self) -> ShardStats:
        self._tar.close()
        self._fh.close()
        ledger.write(self.ledger_path, self.stats.rows, self.index, self.stage)
        fs.put_file_atomic(self._tmp, self.tar_path)
        return self.stats

    def abort(self) -> None:
        try:
            self._tar.close()
            self._fh.close()
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)


def shard_done(out_dir: str, index: int) -> bool:
    """A shard is complete when its tar exists (its ledger is always renamed first)."""
    return fs.exists(fs.join(out_dir, shard_name(index))) and fs.exists(fs.join(out_dir, shard_name(index, "parquet")))


# ---------------------------------------------------------------------------------------------- reader
class BadMember(Exception):
    """A known member that does not parse; `reason` is `bad_member`."""

    reason = "bad_member"


# JSON members and sidecars: parsed only within these caps (env PRX_JSON_MAX_BYTES / PRX_JSON_MAX_DEPTH).
JSON_MAX_BYTES = int(os.environ.get("PRX_JSON_MAX_BYTES", 1 << 20))
JSON_MAX_DEPTH = int(os.environ.get("PRX_JSON_MAX_DEPTH", 64))
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def json_depth(data: bytes) -> int:
    """Deepest nesting of [ and { outside strings (without parsing, so a 100,000-deep file costs O(n))."""
    import numpy as np

    body = np.frombuffer(_JSON_STRING.sub(b'""', bytes(data)), dtype=np.uint8)
    step = (np.isin(body, (ord("["), ord("{"))).astype(np.int32) - np.isin(body, (ord("]"), ord("}"))))
    return int(np.cumsum(step).max()) if step.size else 0


def parse_json(data: bytes, what: str = "json", max_bytes: int | None = None, max_depth: int | None = None) -> dict:
    """A JSON object from bytes, or BadMember: over `max_bytes`, nested deeper than `max_depth`, not UTF-8,
    not JSON, NaN/Infinity (which no JSON writer here may emit again), or not an object."""
    max_bytes = JSON_MAX_BYTES if max_bytes is None else max_bytes
    max_depth = JSON_MAX_DEPTH if max_depth is None else max_depth
    if len(data) > max_bytes:
        raise BadMember(f"{what}: {len(data):,} bytes, over the {max_bytes:,}-byte JSON cap (PRX_JSON_MAX_BYTES)")
    depth = json_depth(data)
    if depth > max_depth:
        raise BadMember(f"{what}: nested {depth} deep, over the JSON depth cap {max_depth} (PRX_JSON_MAX_DEPTH)")
    try:
        value = json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadMember(f"{what}: {exc}") from None
    if not isinstance(value, dict):
        raise BadMember(f"{what}: expected an object, got {type(value).__name__}")
    return value


@dataclass
class Sample:
    """A sample's raw member bytes. Decoding happens only through the methods below."""

    key: str
    members: dict[str, bytes]
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
        """Load a safetensors member; `expect` maps tensor name -> (torch dtype, ndim) to validate."""
        from safetensors.torch import load

        if name not in self.members:
            raise BadMember(f"{name}: missing")
        try:
            tensors = load(self.members[name])
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad member
            raise BadMember(f"{name}: {type(exc).__name__}: {exc}") from None
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


def read_shard(path: str) -> Iterator[Sample | Problem]:
    """Yield the samples of one tar shard, and a Problem for everything that is not a clean sample."""
    base = posixpath.basename(str(path))
    seen_keys: set[str] = set()
    current: Sample | None = None
    current_problem: str | None = None

    def finish(sample: Sample, problem: str | None):
        if sample.key in seen_keys:
            return Problem(sample.key, sample.input_id, "duplicate_member",
                           "key repeated non-consecutively in the shard; first occurrence kept")
        seen_keys.add(sample.key)
        if problem:
            return Problem(sample.key, sample.input_id, "duplicate_member", problem)
        return sample

    try:
        fh = fs.open_file(path, "rb")
    except Exception as exc:  # noqa: BLE001
        yield Problem("", base, "read_error", f"{type(exc).__name__}: {exc}")
        return
    with fh:
        try:
            tar = tarfile.open(fileobj=fh, mode="r|*")
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield Problem("", base, "truncated_tar", f"cannot open tar: {exc}")
            return
        try:
            for info in tar:
                split = _split_name(info.name)
                if split is None:
                    yield Problem("", f"{base}:{info.name}", "unsafe_member_name", info.name)
                    continue
                if info.isdir():
                    continue
                key, member = split
                if not info.isfile():
                    yield Problem(key, f"{base}:{info.name}", "not_a_regular_file", f"tar type {info.type!r}")
                    continue
                if current is None or current.key != key:
                    if current is not None:
                        yield finish(current, current_problem)
                    current, current_problem = Sample(key, {}, str(path)), None
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise EOFError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
                if member in current.members:
                    current_problem = f"member {info.name} appears twice"
                    continue
                current.members[member] = data
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            if current is not None:
                yield Problem(current.key, current.input_id, "truncated_tar", f"{exc}")
            else:
                yield Problem("", base, "truncated_tar", f"{exc}")
            return
        if current is not None:
            yield finish(current, current_problem)
