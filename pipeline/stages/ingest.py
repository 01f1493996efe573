"""`prx-data ingest`: images you already have -> raw shards with content keys and a ledger.

Inputs: a folder tree of images with optional `stem.txt` / `stem.json` sidecars; existing webdataset or
img2dataset shards (a folder of .tar); or a Hugging Face `datasets` dataset (`hf:NAME`, or a folder saved
with `save_to_disk`). Each input becomes one ledger row. Image bytes are kept as they are; the member is
named by the format detected from the bytes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import stat
import time
from dataclasses import dataclass
from typing import Any, Iterator

from contract import fs, ledger, shards
from contract.config import CommonConfig, option
from contract.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from pipeline.download.sample import content_key, decode_caption
from pipeline.runner import cached
from contract.shards import BadMember, MemberCaps, Problem, ShardWriter, dumps_json, parse_json, read_shard
from pipeline.stage import Stage, PrxError, Task

SIDECARS = (".txt", ".json")
SOURCE_META_ROOM = 4096  # bytes of the output json left for prx's own fields


@dataclass
class IngestConfig(CommonConfig):
    source: str | None = option(None, help="source name recorded in every sample (default: the input folder's name)")
    kind: str = option("auto", choices=["auto", "folder", "webdataset", "hf"],
                       help="input kind; auto: hf:NAME or a save_to_disk folder -> hf, a folder with .tar -> webdataset, "
                            "else a folder of images")
    shard_size: int = option(1000, help="samples per output shard (folder and hf inputs; tar inputs map 1:1)")
    max_image_pixels: int = option(DEFAULT_MAX_PIXELS, help="reject images whose header declares more pixels")
    hf_split: str = option("train", help="split of a Hugging Face dataset")
    image_column: str = option("image", help="image column of a Hugging Face dataset")
    text_column: str = option("text", help="caption column of a Hugging Face dataset ('' for none)")


@dataclass
class Item:
    """One input: the image bytes (None when unreadable), its caption bytes and metadata."""

    input_id: str
    data: bytes | None
    caption: bytes | str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    orig_key: str | None = None
    url: str | None = None
    problem: Problem | None = None


def detect_kind(cfg: IngestConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    path = cfg.input
    if path.startswith("hf:"):
        return "hf"
    if fs.exists(fs.join(path, "dataset_info.json")) or fs.exists(fs.join(path, "state.json")):
        return "hf"
    if fs.glob(fs.join(path, "*.tar")):
        return "webdataset"
    return "folder"


def folder_inputs(root: str) -> list[str]:
    """Every file that is an input (sidecars excluded), sorted, relative to root."""
    files = list(fs.walk_files(root))
    stems = {}
    for f in files:
        stem, ext = os.path.splitext(f)
        if ext.lower() not in SIDECARS:
            stems[stem] = f
    inputs = []
    for f in files:
        stem, ext = os.path.splitext(f)
        if ext.lower() in SIDECARS and stem in stems:
            continue
        inputs.append(f)
    return inputs


class Refused(Exception):
    """A folder file that is not read: `reason` and `detail` are its ledger row's."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


_FILE_TYPES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(name: str, mode: int) -> Refused:
    what = next((text for test, text in _FILE_TYPES if test(mode)), "not a regular file")
    return Refused("not_a_regular_file", f"{name} is {what}: only regular files are read")


def _cap(name: str, caps: MemberCaps) -> int:
    return getattr(caps, MemberCaps.kind(name))


def _too_large(name: str, size: int, caps: MemberCaps, growing: bool = False) -> Refused | None:
    if size <= _cap(name, caps):
        return None
    kind, more = MemberCaps.kind(name), " (and growing while read)" if growing else ""
    return Refused("member_too_large", f"{name}: {size:,} bytes{more}, over the {_cap(name, caps):,}-byte {kind} "
                                       f"cap (--max-member-bytes-{kind}); not read")


def read_file(path: str, caps: MemberCaps, optional: bool = False) -> bytes | None:
    """A folder file's bytes, under the tar members' caps (`MemberCaps`, by the file's extension): only a
    regular file is read (a symbolic link is followed to one); a FIFO, device, socket or folder, and a file
    over its cap, raise Refused before a byte is read, and a file growing while it is read is cut one byte past
    its cap and refused. `optional`: None when the file does not exist (sidecars)."""
    local = fs.local_path(path) if "://" in path or "::" in path else path
    if local is None:
        return _read_remote(path, caps, optional)
    name = posixpath.basename(path)
    try:
        st = os.stat(local)
    except FileNotFoundError:
        if optional:
            return None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(name, st.st_mode)
    refused = _too_large(name, st.st_size, caps)
    if refused:
        raise refused
    # O_NONBLOCK: a FIFO swapped in since the stat fails the read instead of blocking it
    with open(os.open(local, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)), "rb") as fh:
        data = fh.read(st.st_size + 1)
        if len(data) > st.st_size:   # grown since the stat: read on to one byte past the cap at most
            data += fh.read(_cap(name, caps) + 1 - len(data))
    refused = _too_large(name, len(data), caps, growing=True)
    if refused:
        raise refused
    return data


def _read_remote(path: str, caps: MemberCaps, optional: bool) -> bytes | None:
    """`read_file` on an object store (no FIFOs or devices there): one bounded ranged read."""
    if optional and not fs.exists(path):
        return None
    name = posixpath.basename(path)
    fsys, inner = fs.get_fs(path)
    data = fsys.cat_file(inner, start=0, end=_cap(name, caps) + 1)
    refused = _too_large(name, len(data), caps)
    if refused:
        raise refused
    return data


def printable(name: str) -> str:
    """A file name as text any UTF-8 writer stores: bytes that are not UTF-8 (which Python holds as lone
    surrogates) are spelled as escapes (`\\xff`)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def folder_items(root: str, paths: list[str], caps: MemberCaps | None = None) -> Iterator[Item]:
    caps = caps or MemberCaps()
    for path in paths:
        yield folder_item(root, path, caps)


def folder_item(root: str, path: str, caps: MemberCaps) -> Item:
    """One folder input with its sidecars; a file that is refused or unreadable makes the item a Problem."""
    rel = printable(os.path.relpath(path, root) if "://" not in root else path[len(root):].lstrip("/"))
    stem = os.path.splitext(path)[0]
    data = None
    try:
        data = read_file(path, caps)
        caption = read_file(stem + ".txt", caps, optional=True)
        extra = sidecar_meta(stem + ".json", caps)
    except (Refused, BadMember, OSError) as exc:
        reason = exc.reason if isinstance(exc, (Refused, BadMember)) else "read_error"
        return Item(rel, None, problem=Problem(content_key(data)[0] if data else "", rel, reason, printable(str(exc))))
    return Item(rel, data, caption, extra=extra, url=_url(extra))


def sidecar_meta(path: str, caps: MemberCaps) -> dict[str, Any]:
    """A json sidecar's object ({} when there is none), read within the json cap and parsed within the JSON caps:
    one over its cap is `bad_member`, as any JSON over the JSON caps is, and is never read."""
    try:
        raw = read_file(path, caps, optional=True)
    except Refused as exc:
        if exc.reason != "member_too_large":
            raise
        raise BadMember(exc.detail) from None
    return parse_source_meta(raw, posixpath.basename(path)) if raw is not None else {}


def parse_source_meta(data: bytes, what: str) -> dict[str, Any]:
    """A json sidecar or member, within the JSON caps less the room prx's own fields take around it (it is
    stored one level down, as `source_meta`), so the output json passes the same caps downstream."""
    return parse_json(data, what, max_bytes=shards.JSON_MAX_BYTES - SOURCE_META_ROOM,
                      max_depth=shards.JSON_MAX_DEPTH - 1)


def _url(meta: dict[str, Any]) -> str | None:
    url = meta.get("url")
    return url if isinstance(url, str) else None


def tar_items(path: str, caps: MemberCaps | None = None) -> Iterator[Item]:
    """Samples of an existing webdataset/img2dataset shard; its own keys are kept as orig_key."""
    for s in read_shard(path, caps):
        if isinstance(s, Problem):
            yield Item(s.input_id, None, problem=s)
            continue
        image = s.image_member
        try:
            meta = parse_source_meta(s.members["json"], "json") if "json" in s.members else {}
        except BadMember as exc:
            key = content_key(s.members[image])[0] if image else ""
            yield Item(s.input_id, None, problem=Problem(key, s.input_id, exc.reason, str(exc)))
            continue
        if image is None:
            yield Item(s.input_id, None, problem=Problem("", s.input_id, "missing_image",
                                                         f"members: {', '.join(sorted(s.members))}"))
            continue
        caption = s.members.get("txt")
        yield Item(s.input_id, s.members[image], caption, extra=meta, orig_key=s.key, url=_url(meta))


def _load_hf(cfg: IngestConfig):
    import datasets

    def load():
        name = cfg.input[3:] if cfg.input.startswith("hf:") else cfg.input
        if fs.exists(fs.join(name, "state.json")) or fs.exists(fs.join(name, "dataset_info.json")):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.hf_split]
        else:
            ds = datasets.load_dataset(name, split=cfg.hf_split)
        if cfg.image_column not in ds.column_names:
            raise PrxError(f"dataset has no column {cfg.image_column!r}; columns: {ds.column_names}")
        if isinstance(ds.features[cfg.image_column], datasets.Image):
            ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
        return ds

    return cached(("hf", cfg.input, cfg.hf_split, cfg.image_column), load)


def hf_items(cfg: IngestConfig, start: int, stop: int) -> Iterator[Item]:
    ds = _load_hf(cfg)
    name = cfg.input[3:] if cfg.input.startswith("hf:") else posixpath.basename(cfg.input.rstrip("/"))
    for i in range(start, stop):
        row = ds[i]
        value = row[cfg.image_column]
        input_id = f"{name}[{cfg.hf_split}][{i}]"
        data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
        if data is None and isinstance(value, dict) and value.get("path") and os.path.exists(value["path"]):
            data = fs.read_bytes(value["path"])
        if data is None:
            yield Item(input_id, None, problem=Problem("", input_id, "missing_image", "image column holds no bytes"))
            continue
        caption = row.get(cfg.text_column) if cfg.text_column else None
        extra = {k: v for k, v in row.items() if k not in (cfg.image_column, cfg.text_column)
                 and isinstance(v, (str, int, float, bool, type(None)))
                 and not (isinstance(v, float) and not math.isfinite(v))}  # JSON has no NaN/Infinity
        yield Item(input_id, data, caption if isinstance(caption, (str, bytes)) else None, extra=extra,
                   orig_key=str(i), url=extra.get("url"))


class IngestStage(Stage):
    name = "ingest"
    help = "images you have (folder, webdataset/img2dataset shards, HF dataset) -> raw shards + ledger"
    config_cls = IngestConfig

    def validate(self) -> None:
        cfg = self.cfg
        if not cfg.input:
            raise PrxError("--in is required (a folder, a folder of .tar shards, or hf:NAME)")
        if not cfg.input.startswith("hf:") and not fs.exists(cfg.input):
            raise PrxError(f"input {cfg.input} does not exist")
        if cfg.shard_size < 1:
            raise PrxError("--shard-size must be at least 1")

    @property
    def source(self) -> str:
        return printable(self.cfg.source or posixpath.basename(self.cfg.input.rstrip("/").removeprefix("hf:"))
                         or "unnamed")

    def plan(self) -> list[Task]:
        cfg = self.cfg
        kind = detect_kind(cfg)
        limit = cfg.limit
        if kind == "webdataset":
            tars = fs.glob(fs.join(cfg.input, "*.tar"))
            tasks = [Task(i, [p]) for i, p in enumerate(tars)]
            if limit is None:
                return tasks
            from pipeline.runner import tar_member_bytes

            left, limited = limit, []
            for t in tasks:
                if left <= 0:
                    break
                t.max_samples = min(left, tar_member_bytes(t.inputs[0])[0])
                left -= t.max_samples
                limited.append(t)
            return limited
        if kind == "hf":
            n = len(_load_hf(cfg))
            n = min(n, limit) if limit is not None else n
            return [Task(i, [], extra={"start": s, "stop": min(s + cfg.shard_size, n)})
                    for i, s in enumerate(range(0, n, cfg.shard_size))]
        paths = folder_inputs(cfg.input)
        if limit is not None:
            paths = paths[:limit]
        return [Task(i, paths[s:s + cfg.shard_size]) for i, s in enumerate(range(0, len(paths), cfg.shard_size))]

    def items(self, task: Task) -> Iterator[Item]:
        kind = detect_kind(self.cfg)
        if kind == "hf":
            return hf_items(self.cfg, task.extra["start"], task.extra["stop"])
        if kind == "webdataset":
            items = tar_items(task.inputs[0], MemberCaps.from_config(self.cfg))
            if task.max_samples is not None:
                import itertools

                items = itertools.islice(items, task.max_samples)
            return items
        return folder_items(self.cfg.input, task.inputs, MemberCaps.from_config(self.cfg))

    def process(self, task: Task, writer: ShardWriter) -> None:
        for item in self.items(task):
            start = time.perf_counter()
            row = self.ingest_one(item, writer)
            row.seconds = time.perf_counter() - start
            writer.add_row(row)

    def ingest_one(self, item: Item, writer: ShardWriter) -> ledger.Row:
        if item.problem is not None:
            return item.problem.row()
        if item.data is None:
            return ledger.row("", item.input_id, "read_error", "no bytes")
        key, digest = content_key(item.data) if item.data else ("", "")
        try:
            _, info = decode_image(item.data, self.cfg.max_image_pixels)
        except ImageRejected as exc:
            return ledger.row(key, item.input_id, exc.reason, exc.detail)
        caption, note = decode_caption(item.caption)
        if key in writer:
            detail = json.dumps({"kept_key": key, "url": item.url, "caption": caption}, ensure_ascii=False)
            return ledger.row(key, item.input_id, "duplicate_exact", detail)
        meta: dict[str, Any] = {"key": key, "sha256": digest, "input_id": item.input_id, "source": self.source,
                                "url": item.url, "width": info.width, "height": info.height,
                                "orig_key": item.orig_key, "format": info.ext}
        if item.extra:
            meta["source_meta"] = item.extra
        writer.write(key, {info.ext: item.data, "txt": caption.encode("utf-8"), "json": dumps_json(meta)})
        return ledger.row(key, item.input_id, "", note)


STAGE = IngestStage
