"""Run img2dataset's own downloader over one chunk of URLs, inside a prx task.

We build img2dataset's `Downloader` (its thread pool, retries, X-Robots-Tag check, hashing) and `Resizer`
exactly as `img2dataset.download` does, hand it one Arrow shard of URLs and let it write a parquet shard
into a temporary folder. Two hooks, both public parameters of img2dataset's classes:

- the resizer is wrapped (`ValidatingResizer`): each downloaded image is checked from its header (pixel
  cap) and decoded by `contract.images.decode_image` in img2dataset's own result loop, so validation
  overlaps the downloads still in flight; a rejection goes back to img2dataset as its `failed_to_resize`
  error with a `[prx:CODE:KEY]` marker;
- urllib's opener (`pipeline.download.net.installed`) adds the user agent, byte cap and address guard.

With `resize_mode="no"` img2dataset's own Resizer is not used at all (the validating hook returns the
downloaded bytes untouched): the bytes it hands back are the bytes the server sent.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which calls out

import pyarrow as pa

from contract import fs
from pipeline.download import net
from pipeline.download.sample import content_key
from contract.images import ImageRejected, check_size, decode_image, probe_image

ROW_COL = "prx_row"  # the position of the URL in its chunk, carried through img2dataset as an extra column
OOM_SHARD_COUNT = 6


@dataclass
class EngineSettings:
    threads: int = 64
    timeout: float = 10
    retries: int = 0
    shard_size: int = 1000                 # img2dataset's number_sample_per_shard (sets its key width)
    resize_mode: str = "no"
    image_size: int = 256
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_image_pixels: int | None = None
    user_agent_token: str | None = "prx-data"
    disallowed_header_directives: list[str] = field(default_factory=list)
    net: net.NetPolicy = field(default_factory=net.NetPolicy)


@dataclass
class Fetched:
    """img2dataset's outcome for one URL of the chunk."""

    position: int
    status: str                 # success | failed_to_download | failed_to_resize
    error: str | None = None    # img2dataset's error_message
    data: bytes | None = None   # stored bytes (the original ones unless resizing)
    sha256: str | None = None   # img2dataset's sha256 of the original bytes
    orig_key: str = ""          # img2dataset's positional key


def _marker(exc: ImageRejected, data: bytes) -> str:
    key = content_key(data)[0] if data else ""
    return f"[prx:{exc.reason}:{key}] {exc.detail}"


class ValidatingResizer:
    """img2dataset's resizer hook: header check, optional img2dataset resize, then the shared decoder."""

    def __init__(self, inner, max_pixels: int | None, min_size: int):
        self.inner = inner
        self.max_pixels = max_pixels
        self.min_size = min_size

    def __call__(self, img_stream, blurring_bbox_list=None):
        data = img_stream.read()
        try:
            info = probe_image(data)
            check_size(info, self.max_pixels)
            if self.min_size and min(info.width, info.height) < self.min_size:
                raise ImageRejected("too_small", f"{info.width}x{info.height} < {self.min_size}")
            stored = data
            if self.inner is not None:
                img_stream.seek(0)
                out = self.inner(img_stream, blurring_bbox_list)
                if out[-1] is not None:
                    return out
                stored = out[0]
            _, final = decode_image(stored, self.max_pixels)
        except ImageRejected as exc:
            return None, None, None, None, None, _marker(exc, data)
        return stored, final.width, final.height, info.width, info.height, None


def _resizer(s: EngineSettings):
    if s.resize_mode == "no":
        return ValidatingResizer(None, s.max_image_pixels, s.min_image_size)
    from img2dataset.resizer import Resizer

    inner = Resizer(image_size=s.image_size, resize_mode=s.resize_mode, resize_only_if_bigger=False,
                    encode_quality=s.encode_quality, encode_format=s.encode_format)
    return ValidatingResizer(inner, s.max_image_pixels, s.min_image_size)


def fetch(urls: list[tuple[int, str]], shard_id: int, s: EngineSettings) -> dict[int, Fetched]:
    """Download (position, url) pairs with img2dataset; one Fetched per position."""
    import math

    from img2dataset.downloader import Downloader, compute_key
    from img2dataset.writer import ParquetSampleWriter

    out: dict[int, Fetched] = {}
    if not urls:
        return out
    tmp = tempfile.mkdtemp(prefix=f"prx-download-{shard_id}-")
    try:
        table = pa.table({"url": [u for _, u in urls], ROW_COL: pa.array([p for p, _ in urls], pa.int64())})
        arrow_path = os.path.join(tmp, "input.feather")
        with pa.OSFile(arrow_path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        downloader = Downloader(
            sample_writer_class=ParquetSampleWriter, resizer=_resizer(s), thread_count=s.threads,
            save_caption=False, extract_exif=False, output_folder=tmp, column_list=["url", ROW_COL],
            timeout=s.timeout, number_sample_per_shard=s.shard_size, oom_shard_count=OOM_SHARD_COUNT,
            compute_hash="sha256", verify_hash_type=None, encode_format=s.encode_format, retries=s.retries,
            user_agent_token=s.user_agent_token,
            disallowed_header_directives=s.disallowed_header_directives or None)
        with net.installed(s.net):
            downloader.download_shard((shard_id, arrow_path))
        result = fs.read_parquet(os.path.join(tmp, f"{shard_id:0{OOM_SHARD_COUNT}d}.parquet"))
        oom_sample = math.ceil(math.log10(max(s.shard_size, 1)))
        cols = result.to_pydict()
        for i, pos in enumerate(cols[ROW_COL]):
            out[pos] = Fetched(pos, cols["status"][i], cols["error_message"][i], cols[s.encode_format][i],
                               cols["sha256"][i], compute_key(pos, shard_id, oom_sample, OOM_SHARD_COUNT))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    missing = [p for p, _ in urls if p not in out]
    if missing:  # img2dataset logs and skips a sample whose handling raised: keep the account complete
        for p in missing:
            out[p] = Fetched(p, "failed_to_download", "img2dataset wrote no row for this URL")
    return out
