"""`prx-data download`: URL lists -> raw shards, through img2dataset, with one ledger row per URL.

The URL list is cut into chunks of `--shard-size`; chunk N becomes output shard N in one prx task (local or
Dask). Inside the task img2dataset's own downloader fetches the chunk into a temporary folder
(`pipeline.download.engine`), with prx's urllib opener installed (`pipeline.download.net`: user agent,
byte cap, private-address guard). prx then keys each image by the sha256 of its bytes, names the member by
the format detected from the bytes and writes the shard and its ledger. Ledger rows and tar samples are in
URL-list order, so ledger row i of shard N is URL i of chunk N, and a rerun writes the same bytes.

`--retry-failed` reruns only the URLs whose outcome is `failed` into the same folder: the shard's previous
ledger is moved to `_retry/NNNNNN.parquet`, kept samples are copied from the old tar, and the failed rows are
replaced by the new attempt's rows. An interrupted retry resumes from `_retry/` on the next run.
"""
from __future__ import annotations

import json
import posixpath
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from contract import fs, ledger
from contract.config import CommonConfig, option
from pipeline.download import engine, net
from pipeline.download.sample import content_key, decode_caption
from pipeline.download.urllist import FORMATS, UrlListError, UrlRow, read_rows
from contract.images import DEFAULT_MAX_PIXELS, ImageRejected, probe_image
from contract.shards import MemberCaps, Problem, ShardWriter, dumps_json, read_shard, shard_done, shard_name
from pipeline.stage import Stage, PrxError, Task

ledger.register_reasons({
    "incomplete_body": (ledger.FAILED, "connection closed before the announced Content-Length arrived"),
    "tls_error": (ledger.FAILED, "TLS handshake or certificate verification failed"),
})

RETRY_DIR = "_retry"
DEFAULT_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]  # img2dataset's own default list


@dataclass
class DownloadConfig(CommonConfig):
    urls: str | None = option(None, help="URL list: parquet, csv, tsv, jsonl or txt (local path or fsspec URL); "
                                         "--in is taken as the list when --urls is not given")
    source: str | None = option(None, help="source name recorded in every sample (default: the list's file name)")
    input_format: str = option("auto", choices=list(FORMATS), help="URL list format (auto: from the extension)")
    url_col: str = option("url", help="URL column")
    caption_col: str | None = option(None, help="caption column (default: 'caption' when the list has one)")
    extra_cols: list[str] = option(default_factory=list, help="comma-separated columns kept in json.source_meta")
    shard_size: int = option(1000, help="URLs per output shard", minimum=1)
    resize_mode: str = option("no", choices=["no", "keep_ratio", "center_crop", "border"],
                              help="img2dataset resize; 'no' stores the bytes as served, never re-encoded")
    image_size: int = option(256, help="target size when resizing", minimum=1)
    encode_format: str = option("jpg", choices=["jpg", "png", "webp"], help="format of resized images")
    encode_quality: int = option(95, help="quality of resized images")
    min_image_size: int = option(0, help="reject images whose shorter side is smaller (too_small)", minimum=0)
    max_image_pixels: int = option(DEFAULT_MAX_PIXELS, help="reject images whose header declares more pixels",
                                   minimum=1)
    max_image_bytes: int = option(32 * 1024 * 1024, help="refuse bodies larger than this, checked while "
                                                         "streaming (0: no cap)", minimum=0)
    disallowed_header_directives: list[str] = option(
        default_factory=lambda: list(DEFAULT_DIRECTIVES),
        help="X-Robots-Tag directives that opt an image out ('' to honour none)")
    allow_private_network: bool = option(False, help="allow private, loopback and link-local peer addresses")
    user_agent: str = option(net.DEFAULT_USER_AGENT, runtime=True, help="User-Agent sent with every request")
    processes: int | None = option(None, runtime=True, help="download processes (Dask workers; same as --workers)",
                                   minimum=1)
    threads: int = option(64, runtime=True, help="download threads per process (img2dataset thread_count)", minimum=1)
    retries: int = option(0, runtime=True, help="extra attempts per URL inside img2dataset", minimum=0)
    timeout: float = option(10.0, runtime=True, help="socket timeout in seconds (connect and each read)",
                            minimum=0.001)
    url_deadline: float = option(60.0, runtime=True, help="total seconds for one URL (connect, redirects, headers "
                                                          "and body together); past it the URL is `timeout` (0: none)",
                                minimum=0)
    retry_failed: bool = option(False, runtime=True, help="rerun only URLs whose outcome is failed, into the "
                                                          "same --out, replacing their rows")


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def url_problem(url: str) -> str | None:
    """Why a URL is not sent to the downloader at all, or None."""
    if not url:
        return "empty URL"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        return str(exc)
    if parts.scheme.lower() not in ("http", "https"):
        return f"scheme {parts.scheme or '(none)'!r}: only http and https are downloaded"
    if not parts.hostname:
        return "no host"
    return None


def chunk_rows(cfg: DownloadConfig) -> list[list[UrlRow]]:
    """The URL list cut into shards, as every run of this config cuts it."""
    try:
        rows = read_rows(cfg.urls, cfg.input_format, cfg.url_col, cfg.caption_col, cfg.extra_cols)
    except (UrlListError, OSError) as exc:
        raise PrxError(str(exc)) from exc
    if cfg.limit is not None:
        rows = rows[:cfg.limit]
    return [rows[s:s + cfg.shard_size] for s in range(0, len(rows), cfg.shard_size)]


def _base_rows(table) -> list[ledger.Row]:
    cols = table.to_pydict()
    return [ledger.Row(key=cols["key"][i], input_id=cols["input_id"][i], outcome=cols["outcome"][i],
                       reason=cols["reason"][i], detail=cols["detail"][i], scores=dict(cols["scores"][i] or []),
                       seconds=cols["seconds"][i]) for i in range(table.num_rows)]


class DownloadStage(Stage):
    name = "download"
    help = "URL lists -> raw shards + ledger, through img2dataset (one ledger row per URL)"
    config_cls = DownloadConfig
    owned = (RETRY_DIR,)

    def input_folders(self) -> list[str]:
        return []  # the input is a URL list, recorded in the config (`urls`), not a shard folder

    def read_paths(self) -> list[str]:
        return [self.cfg.urls] if self.cfg.urls else []

    def validate(self) -> None:
        cfg = self.cfg
        if not cfg.urls and cfg.input:
            cfg.urls, cfg.input = cfg.input, None
        if not cfg.urls:
            raise PrxError("--urls is required (a parquet, csv, tsv, jsonl or txt list of URLs)")
        if not fs.exists(cfg.urls):
            raise PrxError(f"URL list {cfg.urls} does not exist")
        if cfg.processes and not cfg.workers:
            cfg.workers = cfg.processes
        cfg.disallowed_header_directives = [d.strip().lower() for d in cfg.disallowed_header_directives
                                            if d.strip()]

    @property
    def source(self) -> str:
        if self.cfg.source:
            return self.cfg.source
        name = posixpath.basename(str(self.cfg.urls).rstrip("/"))
        return name.split(".", 1)[0] or "urls"

    def settings(self) -> engine.EngineSettings:
        cfg = self.cfg
        product = cfg.user_agent.split("/", 1)[0].split()  # "name/1.0 (...)" -> X-Robots-Tag token "name"
        token = product[0].lower() if product else None
        return engine.EngineSettings(
            threads=cfg.threads, timeout=cfg.timeout, retries=cfg.retries, shard_size=cfg.shard_size,
            resize_mode=cfg.resize_mode, image_size=cfg.image_size, encode_format=cfg.encode_format,
            encode_quality=cfg.encode_quality, min_image_size=cfg.min_image_size,
            max_image_pixels=cfg.max_image_pixels or None, user_agent_token=token,
            disallowed_header_directives=list(cfg.disallowed_header_directives),
            net=net.NetPolicy(cfg.user_agent, cfg.max_image_bytes or None, cfg.allow_private_network,
                              cfg.url_deadline or None))

    # ------------------------------------------------------------------ planning and retry bookkeeping
    def plan(self) -> list[Task]:
        cfg = self.cfg
        chunks = chunk_rows(cfg)
        retry_dir = fs.join(cfg.out, RETRY_DIR)
        for i in range(len(chunks)):
            old = fs.join(retry_dir, shard_name(i, "parquet"))
            if shard_done(cfg.out, i) and fs.exists(old):
                fs.remove(old)  # the base of a retry that finished
        if cfg.retry_failed:
            for i in range(len(chunks)):
                current = fs.join(cfg.out, shard_name(i, "parquet"))
                if not shard_done(cfg.out, i):
                    continue
                outcomes = ledger.read(current).column("outcome").to_pylist()
                if ledger.FAILED in outcomes:
                    fs.makedirs(retry_dir)
                    fs.write_bytes_atomic(fs.join(retry_dir, shard_name(i, "parquet")), fs.read_bytes(current))
                    fs.remove(current)  # the shard is no longer done: the runner schedules it
        return [Task(i, [], extra={"rows": chunk}) for i, chunk in enumerate(chunks)]

    def _load_base(self, index: int, rows: list[UrlRow]):
        """(previous ledger rows, previous samples by key) of a shard being retried, or None."""
        path = fs.join(self.cfg.out, RETRY_DIR, shard_name(index, "parquet"))
        if not fs.exists(path):
            return None
        old = _base_rows(ledger.read(path))
        if len(old) != len(rows) or any(r.input_id != u.url for r, u in zip(old, rows)):
            raise PrxError(f"shard {index}: its previous ledger does not match the URL list any more; "
                             f"rerun with --overwrite")
        samples: dict[str, dict[str, bytes]] = {}
        tar = fs.join(self.cfg.out, shard_name(index))
        if fs.exists(tar):
            for item in read_shard(tar, MemberCaps.from_config(self.cfg)):
                if not isinstance(item, Problem):
                    samples[item.key] = item.members
        return old, samples

    # ------------------------------------------------------------------ one shard
    def process(self, task: Task, writer: ShardWriter) -> None:
        rows: list[UrlRow] = task.extra["rows"]
        start = time.perf_counter()
        base = self._load_base(task.index, rows)
        keep_old: dict[int, ledger.Row] = {}
        if base is not None:
            old_rows, old_samples = base
            for p, r in enumerate(old_rows):
                if r.outcome != ledger.FAILED and (r.outcome != ledger.KEPT or r.key in old_samples):
                    keep_old[p] = r
        todo = [p for p in range(len(rows)) if p not in keep_old]
        invalid = {p: url_problem(rows[p].url) for p in todo}
        fetch = [(p, rows[p].url) for p in todo if invalid[p] is None]
        fetched = engine.fetch(fetch, task.index, self.settings())
        per = (time.perf_counter() - start) / max(len(todo), 1)

        reserved = {r.key for r in keep_old.values() if r.outcome == ledger.KEPT}
        for p, urlrow in enumerate(rows):
            if p in keep_old:
                r = keep_old[p]
                if r.outcome == ledger.KEPT:
                    writer.write(r.key, base[1][r.key])
                writer.add_row(r)
                continue
            if invalid[p] is not None:
                row = ledger.row("", urlrow.url, "invalid_url", invalid[p])
            else:
                row = self._accept(fetched[p], urlrow, writer, reserved)
            row.seconds = per
            writer.add_row(row)

    def _accept(self, f: engine.Fetched, urlrow: UrlRow, writer: ShardWriter, reserved: set[str]) -> ledger.Row:
        url = urlrow.url
        if f.status != "success" or not f.data:
            reason = net.reason_for(f.error) if f.status != "success" else "empty_file"
            if reason not in ledger.REASONS:
                reason = "download_error"
            return ledger.row(net.marker_key(f.error), url, reason, net.clean_detail(f.error))
        data = bytes(f.data)
        if self.cfg.resize_mode == "no":
            key, digest = content_key(data)
        else:  # resized bytes: the key stays the hash of the bytes the server sent (ARCHITECTURE.md, Sample identity)
            digest = f.sha256 or content_key(data)[1]
            key = digest[:32]
        try:
            info = probe_image(data)  # header only: the full decode ran in img2dataset's result loop
        except ImageRejected as exc:
            return ledger.row(key, url, exc.reason, exc.detail)
        caption, note = decode_caption(urlrow.caption)
        if key in writer or key in reserved:
            detail = json.dumps({"kept_key": key, "url": url, "caption": caption}, ensure_ascii=False)
            return ledger.row(key, url, "duplicate_exact", detail)
        meta: dict[str, Any] = {"key": key, "sha256": digest, "input_id": url, "source": self.source, "url": url,
                                "width": info.width, "height": info.height, "orig_key": f.orig_key,
                                "format": info.ext}
        if self.cfg.resize_mode != "no":
            meta["resized"] = {"mode": self.cfg.resize_mode, "image_size": self.cfg.image_size}
        if urlrow.extra:
            meta["source_meta"] = _json_safe(urlrow.extra)
        writer.write(key, {info.ext: data, "txt": caption.encode("utf-8"), "json": dumps_json(meta)})
        return ledger.row(key, url, "", note)


STAGE = DownloadStage


# ------------------------------------------------------------------------------ download-report
def add_commands(sub) -> None:
    p = sub.add_parser("download-report", help="a download folder's failures by reason and by domain; "
                                               "writes the failed URLs as a ready-to-retry list")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--write", metavar="FILE", default=None,
                   help="where the failed URLs go (parquet, csv or jsonl; default DIR/_report/failed_urls.parquet)")
    p.add_argument("--top", type=int, default=20, help="domains listed (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(_func=_report_command)


def _report_command(args) -> int:
    from pipeline.download.report import format_report, report

    rep = report(args.dir, args.write, args.top, chunks=_listed_chunks(args.dir))
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0


def _listed_chunks(folder: str) -> list[list[UrlRow]] | None:
    """The URL list of a download folder cut as its run cut it (None when the list moved or changed), so the
    report can give failed URLs their caption and extra columns."""
    from contract.config import build_config
    from contract.ledger import read_stage_json

    stage = read_stage_json(folder) or {}
    values = {k: v for k, v in (stage.get("config") or {}).items() if k in DownloadConfig.__dataclass_fields__}
    try:
        cfg = build_config(DownloadConfig, values)
        return chunk_rows(cfg) if cfg.urls and fs.exists(cfg.urls) else None
    except Exception:  # noqa: BLE001 - the list moved or changed: the report falls back to the ledger's URLs
        return None
