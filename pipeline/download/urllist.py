"""URL lists: parquet, csv, tsv, jsonl (or json lines) and txt (one URL a line), local or fsspec URLs."""
from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from contract import fs

FORMATS = ("auto", "parquet", "csv", "tsv", "jsonl", "txt")


class UrlListError(ValueError):
    """The URL list cannot be read as asked; the message says why."""


@dataclass
class UrlRow:
    url: str
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def detect_format(path: str) -> str:
    name = posixpath.basename(str(path)).lower()
    for suffix in (".gz", ".zst", ".bz2"):
        name = name.removesuffix(suffix)
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    return {"parquet": "parquet", "csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl", "ndjson": "jsonl",
            "txt": "txt"}.get(ext, "txt")


def read_table(path: str, fmt: str = "auto") -> pa.Table:
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise UrlListError(f"unknown URL list format {fmt!r}; use one of {', '.join(FORMATS[1:])}")
    with fs.open_file(path, "rb") as fh:
        data = fh.read()
    try:
        return _parse(data, fmt, posixpath.basename(str(path)).lower().rsplit(".", 1)[-1])
    except pa.ArrowException as exc:  # malformed list, wrong format, bad compression: a clear error
        raise UrlListError(f"{path}: cannot be read as {fmt}: {exc}") from exc


def _parse(data: bytes, fmt: str, suffix: str) -> pa.Table:
    codec = {"gz": "gzip", "zst": "zstd", "bz2": "bz2"}.get(suffix)
    if codec and fmt != "parquet":
        data = pa.CompressedInputStream(pa.BufferReader(data), codec).read()
    if fmt == "parquet":
        return fs.read_parquet(data)
    if fmt in ("csv", "tsv"):
        import pyarrow.csv as pacsv

        return pacsv.read_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(use_threads=False),  # see fs.read_parquet
                              parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",",
                                                               newlines_in_values=True))
    if fmt == "jsonl":
        import pyarrow.json as pajson

        return pajson.read_json(io.BytesIO(data), read_options=pajson.ReadOptions(use_threads=False))
    lines = [line.strip() for line in data.decode("utf-8", errors="replace").splitlines()]
    return pa.table({"url": [line for line in lines if line]})


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def read_rows(path: str, fmt: str = "auto", url_col: str = "url", caption_col: str | None = None,
              extra_cols: list[str] | None = None) -> list[UrlRow]:
    """Rows of a URL list in file order. caption_col None: `caption` when the list has that column."""
    table = read_table(path, fmt)
    names = table.column_names
    if url_col not in names:
        raise UrlListError(f"{path}: no column {url_col!r} (columns: {', '.join(names)}); set --url-col")
    if caption_col is None:
        caption_col = "caption" if "caption" in names else ""
    if caption_col and caption_col not in names:
        raise UrlListError(f"{path}: no column {caption_col!r} (columns: {', '.join(names)}); set --caption-col")
    extra_cols = list(extra_cols or [])
    missing = [c for c in extra_cols if c not in names]
    if missing:
        raise UrlListError(f"{path}: no column(s) {', '.join(missing)} (columns: {', '.join(names)})")
    urls = table.column(url_col).to_pylist()
    captions = table.column(caption_col).to_pylist() if caption_col else [None] * len(urls)
    extras = {c: table.column(c).to_pylist() for c in extra_cols}
    rows = []
    for i, url in enumerate(urls):
        extra = {c: extras[c][i] for c in extra_cols}
        rows.append(UrlRow(_text(url) or "", _text(captions[i]), extra))
    return rows
