"""Where shards are and what their parts are called: `NNNNNN.tar` shards (each with its `NNNNNN.parquet`
ledger) in a folder, members named `{key}.{member}` (webdataset layout)."""
from __future__ import annotations

import posixpath
import re

from contract import fs


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


def shard_done(out_dir: str, index: int) -> bool:
    """A shard is complete when its tar exists (its ledger is always renamed first)."""
    return fs.exists(fs.join(out_dir, shard_name(index))) and fs.exists(fs.join(out_dir, shard_name(index, "parquet")))


def _split_name(name: str) -> tuple[str, str] | None:
    """`abc.caption_long.txt` -> ("abc", "caption_long.txt"); None if unsafe."""
    if not name or name.startswith("/") or "/" in name or "\\" in name or name in (".", ".."):
        return None
    key, dot, member = name.partition(".")
    if not key or not dot or not member:
        return None
    return key, member
